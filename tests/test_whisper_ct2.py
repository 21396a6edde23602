"""The CTranslate2 -> transformers conversion of Whisper tiny.en matches CTranslate2 itself."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

ctranslate2 = pytest.importorskip("ctranslate2")
faster_whisper = pytest.importorskip("faster_whisper")

from transformers import WhisperFeatureExtractor  # noqa: E402

from lmeval_speech.audio.whisper_ct2 import (  # noqa: E402
    find_tiny_en_dir, load_tokenizer, load_whisper_from_ct2, read_ct2_variables)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back tomorrow morning.",
    "It is raining in the city today.",
]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def model_dir():
    return find_tiny_en_dir()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """espeak-ng speech, resampled to 16 kHz mono float32."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required to synthesize the test speech")
    out = []
    for i, text in enumerate(SENTENCES):
        wav = tmp_path_factory.mktemp("tts") / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        out.append(resample_poly(audio.mean(axis=1), 16000, rate).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_whisper_from_ct2(model_dir)


@pytest.fixture(scope="module")
def features(clips):
    extractor = WhisperFeatureExtractor()
    return extractor(clips, sampling_rate=16000, return_tensors="np").input_features


@pytest.mark.slow
def test_transcripts_match_faster_whisper(model_dir, clips, hf_model, features):
    fw = faster_whisper.WhisperModel(str(model_dir), device="cpu", compute_type="float32")
    tokenizer = load_tokenizer(model_dir)
    with torch.no_grad():  # prompt <|startoftranscript|><|notimestamps|>: no language token in .en
        ids = hf_model.generate(torch.from_numpy(features), return_timestamps=False,
                                num_beams=1, do_sample=False)
    hf_texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for audio, hf_text, reference in zip(clips, hf_texts, SENTENCES):
        # faster-whisper pads the log-mel of a short clip with zeros, HF pads the waveform to 30 s;
        # on ambiguous espeak audio that alone flips words ("round-fark" vs "roundfire"), so give
        # faster-whisper the 30 s waveform too: both front-ends then agree to ~2e-5.
        padded = np.pad(audio, (0, 30 * 16000 - len(audio)))
        # temperature=0 disables faster-whisper's sampling fallback: pure greedy like HF.
        segments, _ = fw.transcribe(padded, beam_size=1, temperature=0.0, language="en",
                                    without_timestamps=True, condition_on_previous_text=False,
                                    vad_filter=False)
        fw_text = "".join(s.text for s in segments)
        assert _normalize(hf_text) == _normalize(fw_text)
        heard = set(_normalize(hf_text).split())  # tiny.en mishears some espeak words
        assert len(heard & set(_normalize(reference).split())) >= len(reference.split()) // 2


def test_encoder_matches_ctranslate2(model_dir, hf_model, features):
    ct2 = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.no_grad():
        got = hf_model.get_encoder()(torch.from_numpy(features)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (len(SENTENCES), 1500, 384)
    # Both run fp32 arithmetic on the same fp16-stored weights, so only summation order and
    # kernel approximations differ (measured: 3.4e-5 at a scale of 12.6, i.e. 3e-6 relative).
    # 1e-4 of the scale leaves a 40x margin yet is 3x tighter than merely rounding the output
    # to fp16, while any mis-mapped weight (swapped q/k, missing bias) moves outputs by O(1).
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


def test_truncated_model_bin_names_the_path(model_dir, tmp_path):
    data = (model_dir / "model.bin").read_bytes()
    broken = tmp_path / "model.bin"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        read_ct2_variables(broken)
    assert str(broken) in str(err.value)
