"""Audio resolution lives in ``audio/resolver.py`` and the planner deals with tokens and spans (issue 30, item 2):
each clip is loaded once per run (it was loaded once to count its tokens and again for the encoder), the
cascade substitution is one function, and the planner is built from a tokenizer and the resolver, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tone
from lm_eval.api.instance import Instance

from lmeval_speech.audio import resolver as resolver_module
from lmeval_speech.audio.resolver import AudioRequestError, AudioResolver, AudioSettings, AudioStatus, audio_key


def req(context, cont, audio, doc_id=0, idx=0):
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, cont, {"audio": audio}), idx=idx,
                    metadata=("t_speech", doc_id, 1))


def _spy_loads(monkeypatch):
    calls = []
    real = resolver_module.resolve_audio

    def spy(item, *a, **kw):
        calls.append(audio_key(item))
        return real(item, *a, **kw)

    monkeypatch.setattr(resolver_module, "resolve_audio", spy)
    return calls


def test_each_clip_is_loaded_once_per_run(tiny_qwen2_audio_dir, monkeypatch):
    """Three items of four choices each: three loads (the old planner loaded each clip twice: to count its tokens,
    then again for the encoder), and the scores equal those of a run that loads every clip again."""
    from lmeval_speech.models.lslm import LSLM

    clips = [{"array": tone(s, f), "sampling_rate": 16000} for s, f in ((1.0, 220), (1.7, 330), (0.6, 440))]
    reqs = [req("<audio> Answer:", f" {c}", [clip], doc_id=d, idx=j) for d, clip in enumerate(clips)
            for j, c in enumerate("ABCD")]
    calls = _spy_loads(monkeypatch)
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=2)
    once = lm.loglikelihood(reqs)
    assert sorted(calls) == sorted(audio_key(c) for c in clips)
    assert dict(lm.audio.loads) == {audio_key(c): 1 for c in clips}

    calls.clear()
    again = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=2)
    again.audio.budget = 0  # nothing kept: every clip loaded again for the encoder, and counted
    twice = again.loglikelihood(reqs)
    assert len(calls) == 6 and set(again.audio.loads.values()) == {2}
    assert [float(a) for a, _ in once] == [float(b) for b, _ in twice]


def test_the_clip_budget_drops_the_oldest_clips_first():
    r = AudioResolver(AudioSettings(), budget=3 * 4000)  # three float32 clips of 1,000 samples
    for k in "abcd":
        r._keep(k, np.zeros(1000, np.float32))
    assert list(r._clips) == ["b", "c", "d"]
    assert r.clip("c", {"array": np.ones(5, np.float32), "sampling_rate": 16000}).tolist() == [0.0] * 1000  # kept
    assert "c" not in r._clips  # handed over once: the encoder's embeddings are cached by key
    assert r._clip_bytes == 2 * 4000  # the running total follows what is kept


def test_the_cascade_substitution_is_one_function():
    r = AudioResolver(AudioSettings())
    r.status.update({"a": AudioStatus(transcript="what is two plus two"), "b": AudioStatus(transcript="four"),
                     "s": AudioStatus(n_tokens=3)})
    assert r.heard_as_text("Q: <audio> A: <audio>", ["a", "b"]) == \
        ("Q: what is two plus two A: four", [], "what is two plus two | four")
    assert r.heard_as_text("Q: <audio>", ["s"]) == ("Q: <audio>", ["s"], "")  # a speech twin: unchanged
    with pytest.raises(AudioRequestError, match="one <audio> marker per transcribed audio"):
        r.heard_as_text("Q: <audio>", ["a", "b"])


def test_the_planner_needs_a_tokenizer_and_the_resolver_not_the_model(tokenizer):
    """A planner built from a plain tokenizer places, expands and cuts exactly as lslm's (the same text twin and
    speech twin tokens), with no model object."""
    from lmeval_speech.models.plan import Planner, PromptTokens

    placeholder = "<|AUDIO|>"
    tok = PromptTokens(
        tokenizer=tokenizer, encode=lambda s, add_special_tokens=None: tokenizer.encode(s, add_special_tokens=False),
        encode_pair=lambda c, x: (tokenizer.encode(c, add_special_tokens=False),
                                  tokenizer.encode(x, add_special_tokens=False)),
        special_token_kwargs=lambda s: {"add_special_tokens": False}, prefix_token_id=tokenizer.eos_token_id,
        max_length=64, audio_placeholder=placeholder, audio_token_id=tokenizer.convert_tokens_to_ids(placeholder))
    audio = AudioResolver(AudioSettings())
    audio.status["k"] = AudioStatus(n_tokens=5)
    planner = Planner(tok, audio)
    seq = planner.build(0, "<audio> Answer:", " B", ["k"])
    assert seq.audio == [(0, "k", 5)] and seq.speech_positions == [0, 1, 2, 3, 4]
    assert seq.tokens[:5] == [tok.audio_token_id] * 5 and seq.cont == tokenizer.encode(" B", add_special_tokens=False)
    audio.status["k"] = AudioStatus(n_tokens=70)  # longer than max_length: the audio would be cut
    with pytest.raises(AudioRequestError, match="exceeds max_length=64 inside the audio"):
        planner.build(0, "<audio> Answer:", " B", ["k"])


class _CountingEncoder:
    """A backend stub whose ``encode`` gives each clip ``len(clip) // 100`` positions of width 4, and counts clips."""

    def __init__(self):
        self.clips = 0

    def encode(self, arrays):
        self.clips += len(arrays)
        return [torch.zeros(len(a) // 100, 4) for a in arrays]


def test_a_demo_sized_run_encodes_each_clip_once():
    """The demo has 382 distinct clips (200 questions, 182 more heard by the shuffled control); the embedded model
    encodes each to count its tokens, and the scoring batches (in another order) need them again: with the old
    256-clip LRU, 126+ clips were encoded a second time (16% of the demo's time in a py-spy profile)."""
    import inspect

    from lmeval_speech.models.lslm import LSLM
    from lmeval_speech.models.runner import SpeechEmbeddings

    enc = _CountingEncoder()
    cache = SpeechEmbeddings(enc, inspect.signature(LSLM).parameters["audio_cache_size"].default)
    clips = {f"k{i}": np.zeros(1000 + i, np.float32) for i in range(382)}
    assert [cache.count(k, a) for k, a in clips.items()][:2] == [10, 10]
    for lo in range(0, 382, 8):  # the scoring order: longest first
        keys = sorted(clips, key=lambda k: -len(clips[k]))[lo : lo + 8]
        cache.get(keys, lambda k: clips[k])
    assert enc.clips == 382 and cache.encoded == 382


def test_the_embedding_cache_is_bounded_in_bytes(monkeypatch):
    from lmeval_speech.models.runner import SpeechEmbeddings

    monkeypatch.setattr(SpeechEmbeddings, "BUDGET", 3 * 10 * 4 * 4)  # three clips of 10 positions x 4 floats
    cache = SpeechEmbeddings(_CountingEncoder(), 1000)
    for i in range(5):
        cache.count(f"k{i}", np.zeros(1000, np.float32))
    assert list(cache._lru) == ["k2", "k3", "k4"] and cache._bytes == 3 * 160


def test_missing_clips_are_synthesized_in_parallel_before_they_are_read(tmp_path, monkeypatch):
    """espeak-ng runs as a process: one clip at a time left a core idle while the run prepared its audio. The
    cache misses are now rendered one process per core first; each clip is rendered once, and the resolved
    audio is the same as rendering in order."""
    import threading

    from lmeval_speech.audio import cache as cache_module
    from lmeval_speech.audio import spoken

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "tts"))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads, rendered, real = set(), [], cache_module.render

    def render(text, spec):
        threads.add(threading.get_ident())
        rendered.append(text)
        return real(text, spec)

    monkeypatch.setattr(cache_module, "render", render)
    texts = [f"Question number {i}: which planet is red?" for i in range(6)]
    items = {audio_key(spoken(t)): spoken(t) for t in texts}
    items["silence"] = {"silence_like": spoken(texts[0])}
    status = AudioResolver(AudioSettings()).resolve(items)
    assert sorted(rendered) == sorted(texts)  # each once, the silence control's partner included
    assert len(threads - {threading.get_ident()}) >= 1  # rendered off the main thread
    ordered = AudioResolver(AudioSettings())
    for t in texts:  # read back from the cache: the samples rendered in order
        monkeypatch.setattr(cache_module, "render", real)
        a, _ = ordered.load(spoken(t))
        b = real(t, cache_module.TTSSpec.from_dict(spoken(t)["tts"]))
        assert np.array_equal(a, np.clip(np.round(b * 32768), -32768, 32767).astype(np.int16) / np.float32(32768))
    assert all(s.error == "" for s in status.values())
