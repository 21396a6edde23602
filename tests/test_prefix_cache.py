"""Prefix sharing (issue 18): all choices of an item scored from one decoder pass over their shared
context (audio + question), each continuation extending its key/value cache. Same numbers as
running every choice whole (``prefix_cache=False``), on every backend, with capture and
interventions reading/editing that one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import tone
from test_backends import (  # noqa: F401 (fixtures)
    tiny_af3_dir, tiny_gemma3n_dir, tiny_granite_dir, tiny_omni_dir, tiny_phi4_dir, tiny_qwen3_omni_dir, tiny_voxtral_dir,
)
from lmeval_speech.capture.store import CaptureReader
from lmeval_speech.models.lslm import LSLM

QUESTION = "Which city is the capital of France?"
CHOICES = [" Paris", " Rome in Italy", " Madrid, the capital of Spain", " Berlin"]


def cloze_requests(n_items=3, twins=("speech", "text")):
    """``n_items`` four-choice cloze items, each as a speech twin (a distinct clip) and a text twin;
    the continuations have 1 to 7 tokens, so each item needs a continuation pass."""
    out = []
    for doc in range(n_items):
        audio = {"audio": [{"array": tone(0.8 + 0.4 * doc, 180 + 50 * doc, seed=doc), "sampling_rate": 16000}]}
        for twin in twins:
            question = f"{QUESTION} (item {doc})"
            ctx = f"Question: {'<audio>' if twin == 'speech' else question}\nAnswer:"
            for i, choice in enumerate(CHOICES):
                args = (ctx, choice, audio) if twin == "speech" else (ctx, choice)
                out.append(Instance("loglikelihood", {"question": question}, args, i,
                                    (f"speech_mmlu_continuation_geo_{twin}", doc, 1)))
    return out


def count_calls(lm):
    calls = {"prefix": 0, "continuation": 0, "packed": 0}
    b = lm.backend_impl
    real_dec, real_cont, real_packed = b.run_decoder, b.run_continuation, b.run_packed
    b.run_decoder = lambda *a, **k: calls.__setitem__("prefix", calls["prefix"] + 1) or real_dec(*a, **k)
    b.run_continuation = lambda *a, **k: calls.__setitem__("continuation", calls["continuation"] + 1) or real_cont(*a, **k)
    b.run_packed = lambda *a, **k: calls.__setitem__("packed", calls["packed"] + 1) or real_packed(*a, **k)
    return calls


BACKENDS = ["tiny_qwen2_audio_dir", "tiny_omni_dir", "tiny_voxtral_dir", "tiny_granite_dir", "tiny_af3_dir",
            "tiny_qwen3_omni_dir", "tiny_phi4_dir"]


@pytest.mark.parametrize("fixture", BACKENDS)
def test_prefix_cache_gives_the_same_loglikelihoods_with_one_pass_per_item(fixture, request):
    """In float64 the two paths agree exactly; in float32 to rounding (the whole-sequence path itself
    moves by ~1e-5 between batch sizes)."""
    path = request.getfixturevalue(fixture)
    reqs = cloze_requests()
    precisions = ((torch.float64, 1e-9, 0), (torch.float32, 1e-5, 1e-6))
    if fixture == "tiny_qwen3_omni_dir":  # its MoE grouped matmul has no float64 kernel
        precisions = precisions[1:]
    for dtype, atol, rtol in precisions:
        whole = LSLM(pretrained=path, device="cpu", batch_size=2, prefix_cache=False, dtype=dtype)
        whole_calls = count_calls(whole)
        expected = whole.loglikelihood(reqs)
        for bs, pack in ((1, True), (3, True), (3, False)) if dtype == torch.float64 or len(precisions) == 1 \
                else ((3, True),):
            lm = LSLM(pretrained=path, device="cpu", batch_size=bs, dtype=dtype)
            lm.pack_tails = pack  # the continuations packed one row per prefix (run_packed), or one row each
            calls = count_calls(lm)
            got = lm.loglikelihood(reqs)
            np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=atol, rtol=rtol)
            assert [g for _, g in got] == [g for _, g in expected]
            # one pass over each of the 6 contexts (3 items x speech/text twin), in batches of bs
            n_prefix = sum(-(-k // bs) for k in ((3, 3) if lm.backend_impl.modality_dependent else (6,)))
            assert calls["prefix"] == n_prefix
            # packed: one continuation pass per prefix batch; else chunks of bs rows of the 12 per batch's items
            assert (calls["packed"], calls["continuation"] > 0) == ((n_prefix, False) if pack else (0, True))
        # the old path ran each choice whole: 4 passes per context (all continuations differ)
        assert whole_calls["prefix"] == sum(-(-k // 2) for k in ((12, 12) if whole.backend_impl.modality_dependent else (24,)))
        assert whole_calls["continuation"] == 0


def test_a_backend_without_prefix_sharing_runs_whole_sequences(tiny_gemma3n_dir):
    lm = LSLM(pretrained=tiny_gemma3n_dir, device="cpu", batch_size=3)
    assert not lm.backend_impl.supports_prefix_cache
    calls = count_calls(lm)
    reqs = cloze_requests(n_items=1)
    got = lm.loglikelihood(reqs)
    assert calls["continuation"] == 0 and calls["prefix"] == -(-8 // 3)  # 8 distinct sequences
    expected = LSLM(pretrained=tiny_gemma3n_dir, device="cpu", batch_size=3, prefix_cache=False).loglikelihood(reqs)
    assert got == expected


def test_text_only_model_and_one_token_choices(tiny_llama_dir):
    """A text-only LM; one-token choices need no continuation pass at all."""
    reqs = [r for r in cloze_requests(twins=("text",))]
    reqs += [Instance("loglikelihood", {}, ("Question: 2+2?\nAnswer:", c), i, ("x", 9, 1)) for i, c in enumerate([" A", " B"])]
    expected = LSLM(pretrained=tiny_llama_dir, device="cpu", batch_size=4, prefix_cache=False).loglikelihood(reqs)
    for pack in (True, False):
        lm = LSLM(pretrained=tiny_llama_dir, device="cpu", batch_size=4)
        lm.pack_tails = pack
        calls = count_calls(lm)
        got = lm.loglikelihood(reqs)
        np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=1e-5, rtol=0)
        assert [g for _, g in got] == [g for _, g in expected]
        assert calls["prefix"] == 1  # 4 contexts in one batch of 4
        # packed: the 9 multi-token choices (3 items x 3) in one pass of 4 rows; else 9 rows in chunks of 4
        assert (calls["packed"], calls["continuation"]) == ((1, 0) if pack else (0, 3))


@pytest.mark.slow
def test_embedded_model_prefix_cache_matches_whole_sequences():
    """In float64, so the comparison is exact (in float32 the old path itself moves by 1.7e-5
    between batch sizes 1 and 4 on these sums of up to 7 token log-probabilities of -27)."""
    reqs = cloze_requests(n_items=2)
    args = dict(pretrained="mini", device="cpu", batch_size=4, dtype=torch.float64)
    expected = LSLM(prefix_cache=False, **args).loglikelihood(reqs)
    got = LSLM(**args).loglikelihood(reqs)
    np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=1e-9, rtol=0)
    assert [g for _, g in got] == [g for _, g in expected]


def test_capture_reads_the_prefix_pass_exactly(tiny_qwen2_audio_dir, tmp_path):
    reqs = cloze_requests(n_items=2)
    stored = {}
    for prefix in (False, True):
        d = tmp_path / f"cap{prefix}"
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, capture="tokens", capture_dir=str(d),
             capture_layers="all", prefix_cache=prefix).loglikelihood(reqs)
        reader = CaptureReader(d)
        stored[prefix] = {(r["task"], r["doc_id"]): reader.load(r) for r in reader.records}
    assert stored[True].keys() == stored[False].keys() and len(stored[True]) == 4
    for key, arrays in stored[False].items():
        assert arrays.keys() == stored[True][key].keys()
        for name, a in arrays.items():
            np.testing.assert_allclose(stored[True][key][name], a, atol=1e-5, rtol=0, err_msg=f"{key} {name}")


@pytest.mark.parametrize("kind, layers", [("angle", "1"), ("length", "input")])
def test_interventions_edit_the_prefix_pass_once(tiny_qwen2_audio_dir, kind, layers):
    reqs = cloze_requests(n_items=2)
    args = dict(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3, intervention=kind,
                intervene_layers=layers, critical="bottom2")
    expected = LSLM(prefix_cache=False, **args).loglikelihood(reqs)
    got = LSLM(**args).loglikelihood(reqs)
    plain = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=3).loglikelihood(reqs)
    np.testing.assert_allclose([g for g, _ in got], [e for e, _ in expected], atol=1e-5, rtol=0)
    speech = [i for i, r in enumerate(reqs) if "speech" in r.task_name]
    # the edit changed the speech twins' scores (so the comparison above is not vacuous)
    assert max(abs(got[i][0] - plain[i][0]) for i in speech) > 1e-3
