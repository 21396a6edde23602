"""Input-side defects of the speech twins (review of the audio path): a float recording named by the
clock, espeak-ng voice typos heard as another voice, run-wide settings failing item by item, and the
silence control lost under noise. Real files, real espeak-ng, the tiny Qwen2-Audio checkpoint."""

from __future__ import annotations

import re
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import tone
from lm_eval.api.instance import Instance

from lmeval_speech.audio import (
    AudioCache,
    AudioError,
    TTSSpec,
    get_audio,
    recorded,
    resolve_audio,
    spoken,
)
from lmeval_speech.audio.noise import snr_db

SENTENCE = "Which planet is known as the red planet?"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "default-cache"))


def req(context, audio, doc_id=0, task="t_speech"):
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, " x", {"audio": audio}), idx=0,
                    metadata=(task, doc_id, 1))


# ------------------------------------------------------------------ 2. a recording's name is its content

def test_a_float_recording_has_one_name_whatever_the_time(tmp_path):
    """A float array was stored as a float WAV and named by the WAV's SHA-256, but libsndfile writes
    the time into a float WAV's PEAK chunk: the same recording got another name every second (other
    noise for the speech and cascade twins, no --use_cache or capture resume, the cache growing)."""
    from lmeval_speech.audio.cache import _recorded_path

    sine = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    first = recorded(sine, 16000, cache_dir=tmp_path)
    time.sleep(1.1)
    second = recorded(sine, 16000, cache_dir=tmp_path)
    assert first == second
    assert _recorded_path(first["recorded"], tmp_path) == _recorded_path(second["recorded"], tmp_path)
    assert len([p for p in (tmp_path / "recorded").rglob("*") if p.is_file()]) == 1
    # named by the samples the model hears (float32) and their rate, not by the Python object
    assert recorded(sine.astype(np.float64), 16000, cache_dir=tmp_path) == first
    assert recorded(sine, 8000, cache_dir=tmp_path) != first
    assert recorded(sine[:-1], 16000, cache_dir=tmp_path) != first
    audio, rate, info = resolve_audio(first, cache_dir=tmp_path)
    assert rate == 16000 and info["source"] == "recorded"
    np.testing.assert_array_equal(audio, sine)
    # a stereo recording keeps its channels, and integer PCM its scale
    stereo = np.stack([sine, 0.5 * sine], axis=1)
    np.testing.assert_allclose(resolve_audio(recorded(stereo, 16000, cache_dir=tmp_path), cache_dir=tmp_path)[0],
                               0.75 * sine, atol=1e-7)
    pcm = np.round(sine * 32767).astype(np.int16)
    np.testing.assert_allclose(resolve_audio(recorded(pcm, 16000, cache_dir=tmp_path), cache_dir=tmp_path)[0],
                               pcm / 32768, atol=1e-7)


def test_a_recording_cached_as_a_float_wav_by_an_earlier_version_is_still_read(tmp_path):
    """References made before (the SHA-256 of a float WAV's bytes) still resolve from the cache."""
    import hashlib
    import io

    from lmeval_speech.audio.cache import _recorded_path

    sine = (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, sine, 8000, format="WAV", subtype="FLOAT")
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    path = _recorded_path(digest, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(buf.getvalue())
    audio, rate, info = resolve_audio({"recorded": digest}, cache_dir=tmp_path)
    assert rate == 16000 and info["fixes"] == ["resampled 8000->16000 Hz"] and len(audio) == 16000


# ------------------------------------------------------------------ 3. espeak-ng voices

def test_an_espeak_voice_or_variant_it_does_not_have_is_refused_before_synthesis(tmp_path):
    """espeak-ng exits 0 for a voice it does not have and speaks another one: en-uss was bit-identical
    to en-gb, en-us+zz and en-us+f33 to en-us. The manifest and the sweep table named the typed voice."""
    from lmeval_speech.audio.tts import EspeakEngine, render

    for bad in ("en-uss", "en-u", "en-us+zz", "en-us+f33", "en-us+M3", "en-us+Auntie", "English_(America)"):
        spec = TTSSpec(voice=bad)
        with pytest.raises(ValueError, match=re.escape(f"espeak-ng has no voice {bad!r}")):
            get_audio(SENTENCE, spec, cache_dir=tmp_path)
        with pytest.raises(ValueError, match="espeak-ng --voices"):
            render(SENTENCE, spec)
        with pytest.raises(ValueError, match="espeak-ng has no voice"):
            EspeakEngine().synthesize(SENTENCE, spec)
    assert not list(tmp_path.rglob("*.pcm"))  # nothing was synthesized or cached
    # a file cached under a bad voice's key (by an earlier version) is not served either
    spec = TTSSpec(voice="en-uss")
    AudioCache._store(AudioCache(tmp_path).path_for(SENTENCE, spec), np.ones(1600, np.int16), 16000)
    with pytest.raises(ValueError, match="espeak-ng has no voice 'en-uss'"):
        get_audio(SENTENCE, spec, cache_dir=tmp_path)


def test_an_mbrola_voice_without_mbrola_is_refused_before_synthesis(tmp_path, monkeypatch):
    """espeak-ng lists its mbrola voices whether or not mbrola is installed; without it every item failed
    (exit 1 per item), and a run that also had recorded-audio tasks ended with exit 0."""
    import shutil

    from lmeval_speech.audio.tts import TTSSpecError

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "mbrola" else real_which(name, *a, **k))
    with pytest.raises(TTSSpecError, match="needs mbrola"):
        get_audio(SENTENCE, TTSSpec(voice="mb-en1"), cache_dir=tmp_path)


def test_the_voices_espeak_ng_has_are_accepted_and_differ():
    """The embedded model's training voices, espeak's own spellings (file, name, +N variants), all
    accepted; each variant is heard (not the plain voice)."""
    from lmeval_speech.audio.tts import render
    from lmeval_speech.mini.features import VOICES

    heard = {}
    for voice in [*VOICES, "en-gb", "EN-GB", "gmw/en-US", "English (America)", "en-us+3", "en-us+13", "en",
                  "en-us+aunty", "en-us+Alex"]:
        heard[voice] = render(SENTENCE, TTSSpec(voice=voice))
        assert heard[voice].size > 8000, voice
    assert np.array_equal(heard["en-us+3"], heard["en-us+m3"])
    assert np.array_equal(heard["en-us+13"], render(SENTENCE, TTSSpec(voice="en-us+f3")))
    assert np.array_equal(heard["gmw/en-US"], heard["en-us"]) and np.array_equal(heard["EN-GB"], heard["en-gb"])
    for variant in ("en-us+m3", "en-us+f2", "en-us+aunty", "en-us+Alex"):
        assert not np.array_equal(heard[variant], heard["en-us"]), variant


# ------------------------------------------------------------------ 4. a run-wide setting stops the run

@pytest.mark.parametrize("args, match", [
    ({"tts_voice": "xx"}, "espeak-ng has no voice 'xx'"),  # espeak-ng exits 1: each item failed
    ({"tts_voice": "en-uss"}, "espeak-ng has no voice 'en-uss'"),
    ({"tts_rate": 60}, "no slower than 80"),  # the task's engine is only known at its items
])
def test_a_bad_tts_setting_stops_the_run_instead_of_failing_each_speech_item(tiny_qwen2_audio_dir, args, match,
                                                                              caplog):
    """With a recorded-audio task in the same call, every TTS item failed on its own (a warning each),
    the recorded items were scored, and the run ended with exit 0 and no speech-twin accuracy."""
    from lmeval_speech.models.lslm import LSLM

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", **args)
    reqs = [req("Q: <audio>\nA:", [{"array": tone(1.0), "sampling_rate": 16000}], 0, "t_recorded"),
            req("Q: <audio>\nA:", [spoken(SENTENCE)], 0, "t_speech")]
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match=match) as err:
        lm.loglikelihood(reqs)
    assert "nothing was scored" in str(err.value) and "every audio" not in str(err.value)
    assert not [r for r in caplog.records if "recorded per item" in r.getMessage()]  # one error, not one per item


def test_a_bad_voice_with_its_engine_named_stops_at_load(tiny_qwen2_audio_dir, tmp_path):
    from lmeval_speech.models.lslm import LSLM

    with pytest.raises(ValueError, match="espeak-ng has no voice 'en-us\\+f33'"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", tts_engine="espeak-ng", tts_voice="en-us+f33")
    with pytest.raises(AudioError, match="piper voice file not found"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", tts_engine="piper", tts_voice=str(tmp_path / "no.onnx"))


def test_a_missing_asr_stops_the_run_instead_of_failing_each_cascade_item(tiny_qwen2_audio_dir, monkeypatch):
    """Without faster-whisper, every cascade item failed on its own while the speech twin scored:
    exit 0 and no cascade accuracy."""
    from lmeval_speech.audio import asr
    from lmeval_speech.models.lslm import LSLM
    from lmeval_speech.tasks.prompts import ASR

    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import faster_whisper -> ImportError
    asr._model.cache_clear()
    try:
        lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
        speech = spoken(SENTENCE)
        reqs = [req("Q: <audio>\nA:", [speech], 0, "t_speech"),
                req("Q: <audio>\nA:", [{"transcribe": speech, "asr": ASR}], 0, "t_cascade")]
        with pytest.raises(asr.ASRMissing, match="pip install 'lmeval-speech\\[asr\\]'.*nothing was scored"):
            lm.loglikelihood(reqs)
    finally:
        asr._model.cache_clear()


# ------------------------------------------------------------------ 6. the silence control under noise

@pytest.mark.parametrize("kind", ["white", "babble"])
def test_the_silence_control_under_noise_hears_the_speech_twins_noise_alone(tiny_qwen2_audio_dir, kind):
    """A silence item resolved to zeros and ``mix`` refused a silent clip: every silence item of a noisy
    sweep condition failed, and the "what priors alone give" control vanished from it."""
    from lmeval_speech.models.lslm import LSLM
    from lmeval_speech.models.plan import audio_key

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", noise=kind, snr_db=5)
    speech = spoken(SENTENCE)
    silence = {"silence_like": speech}
    status = lm.audio.resolve({audio_key(speech): speech, audio_key(silence): silence})
    assert status[audio_key(silence)].error == ""
    noisy, _ = lm.audio.load(speech)
    control, notes = lm.audio.load(silence)
    clean, _ = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu").audio.load(speech)
    assert notes["source"] == "silence" and notes["noise"] == lm.audio_settings.noise.to_dict()
    assert control.shape == clean.shape and control.any()
    np.testing.assert_allclose(control, noisy - clean, atol=1e-6)  # the noise the speech twin heard, alone
    assert abs(snr_db(clean, clean + control) - 5) < 0.1
    res = lm.loglikelihood([req("Q: <audio>\nA:", [silence], 0, "t_silence")])
    assert np.isfinite(res[0][0]) and not getattr(res[0][0], "failed", "")
