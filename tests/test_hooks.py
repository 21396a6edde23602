"""One hook protocol (issue 17): capture, interventions and the oracle's references all read or
edit the decoder's states through ``lmeval_speech.hooks``, at the sites of the hidden-state indices.
A reader gets exactly what ``output_hidden_states`` reports (bit for bit, on every tiny backend
and the embedded model);
capture no longer asks the decoder for all of them; an edit at the last index acts after the final
norm; hooks never outlive their pass; the manifest records the protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_backends import tiny_granite_dir, tiny_omni_dir, tiny_voxtral_dir  # noqa: F401 (fixtures)
from test_capture import SPEECH_CTX as CAP_SPEECH_CTX, TEXT_CTX as CAP_TEXT_CTX, mc_requests
from test_interventions import requests as twin_requests, speech_positions, text_positions
from conftest import tone
from lmeval_speech.capture.store import CaptureReader
from lmeval_speech.models.lslm import LSLM

BACKENDS = ["tiny_llama_dir", "tiny_qwen2_audio_dir", "tiny_omni_dir", "tiny_voxtral_dir", "tiny_granite_dir"]


def hook_count(b) -> int:
    mods = [*b.decoder_layers, b.decoder.norm]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def text_batch(lm):
    rows = [lm.tok_encode("Question: which city is the capital of France?\nAnswer:"), lm.tok_encode("Answer: Paris")]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), lm._pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return rows, ids, mask


@pytest.mark.parametrize("fixture", [*BACKENDS, "mini"])
def test_reader_sites_are_output_hidden_states_bit_for_bit(fixture, request):
    """Index 0 = layer 0's input, i = layer i's output, n = the final norm's output: the very tensors
    transformers reports, on right-padded rows of different lengths; the final norm is the backend's."""
    from lmeval_speech.hooks import PositionReader, hooked

    lm = LSLM(pretrained="mini" if fixture == "mini" else request.getfixturevalue(fixture), device="cpu")
    b = lm.backend_impl
    assert b.final_norm is b.decoder.norm
    n = len(b.decoder_layers)
    rows, ids, mask = text_batch(lm)
    reader = PositionReader(range(n + 1), [(k, list(range(len(r)))) for k, r in enumerate(rows)])
    with torch.no_grad():  # transformers installs its own recording hooks on first use, for good
        b.run_decoder(b.embed_tokens(ids), mask, ids, output_hidden_states=True)
    before = hook_count(b)
    with torch.no_grad(), hooked(b.decoder_layers, b.final_norm, [reader.tap]):
        out = b.run_decoder(b.embed_tokens(ids), mask, ids, output_hidden_states=True)
    assert hook_count(b) == before
    assert len(out.hidden_states) == n + 1
    for k, r in enumerate(rows):
        got = reader.states(k)
        for i in range(n + 1):
            assert torch.equal(got[i], out.hidden_states[i][k, : len(r)]), (fixture, k, i)
        assert torch.equal(got[n], out.last_hidden[k, : len(r)])


def test_hooks_are_removed_after_the_pass_even_on_error_and_editors_run_before_readers(tiny_qwen2_audio_dir):
    from lmeval_speech.hooks import EDIT, READ, Tap, hooked

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    b = lm.backend_impl
    n = len(b.decoder_layers)
    _, ids, mask = text_batch(lm)
    before = hook_count(b)

    def boom(i, h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with hooked(b.decoder_layers, b.final_norm, [Tap(READ, [0, 1, n], boom)]):
            b.run_decoder(b.embed_tokens(ids), mask, ids)
    assert hook_count(b) == before

    seen = {}
    reader = Tap(READ, [0, 1, n], lambda i, h: seen.__setitem__(i, h))
    editor = Tap(EDIT, [0, 1, n], lambda i, h: torch.full_like(h, float(i + 1)))
    with torch.no_grad(), hooked(b.decoder_layers, b.final_norm, [reader, editor]):  # reader given first
        out = b.run_decoder(b.embed_tokens(ids), mask, ids)
    assert all(bool((seen[i] == i + 1).all()) for i in (0, 1, n))  # the reader saw the edited state
    assert bool((out.last_hidden == n + 1).all())  # the head reads the edited final state
    assert hook_count(b) == before
    with pytest.raises(ValueError, match="out of range"):
        with hooked(b.decoder_layers, b.final_norm, [Tap(READ, [n + 1], lambda i, h: None)]):
            pass


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_capture_is_a_reader_equal_to_output_hidden_states_and_never_asks_for_them(
        tiny_qwen2_audio_dir, tmp_path, prefix_cache):
    extra = {"audio": [{"array": tone(1.3, seed=3), "sampling_rate": 16000}]}
    reqs = mc_requests("speech_mmlu_continuation_geo_speech", CAP_SPEECH_CTX, 7, extra) \
        + mc_requests("speech_mmlu_continuation_geo_text", CAP_TEXT_CTX, 7)
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", batch_size=1, capture="pooled",
              capture_dir=str(tmp_path / "c"), prefix_cache=prefix_cache)
    b = lm.backend_impl
    asked, seen, got = [], [], []
    real_run, real_row = b.run_decoder, lm._capture_row

    def run(*a, **k):  # the test (not the adapter) asks transformers for every state, to compare
        asked.append(bool(k.get("output_hidden_states")))
        out = real_run(*a, **{**k, "output_hidden_states": True})
        seen.append(out.hidden_states)
        return out

    b.run_decoder = run
    lm._capture_row = lambda s, states: got.append((len(seen) - 1, s, states)) or real_row(s, states)
    lm.loglikelihood(reqs)
    assert asked and not any(asked)
    assert len(got) == 2
    reader = CaptureReader(tmp_path / "c")
    for call, s, states in got:
        pos = lm._capture_positions(s)
        expected = [h[0, pos] for h in seen[call]]  # batch_size=1: the captured row is row 0
        assert len(states) == len(expected) == len(b.decoder_layers) + 1
        assert all(torch.equal(a, e) for a, e in zip(states, expected))
        (rec,) = [r for r in reader.records if r["task"] == s.request.task_name]
        np.testing.assert_array_equal(reader.load(rec)["pooled"], torch.stack(expected).float().mean(1).numpy())


def final_states(lm):
    """The final norm's output of the speech and the text pass (whole sequences: one pass each)."""
    seen = []
    h = lm.backend_impl.decoder.norm.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    try:
        res = lm.loglikelihood(twin_requests())
    finally:
        h.remove()
    assert len(seen) == 2
    speech, text = sorted(seen, key=lambda t: -t.shape[0])
    return res, speech, text


def test_an_edit_at_the_last_index_acts_after_the_final_norm(tiny_qwen2_audio_dir):
    """Changed by issue 17: ``last`` is the final norm's output (what capture stores and the head
    reads), so a length edit sets exactly the text twin's post-norm norm there. Before, it edited the
    last layer's output before the norm, which rescaled it again (RMSNorm undoes a length edit) and
    the text references were read after the norm by capture but before it by the oracle."""
    def uneven_norm(lm):  # the tiny model's norm weight is all ones: a length edit would commute with it
        w = lm.backend_impl.decoder.norm.weight
        with torch.no_grad():
            w.copy_(torch.linspace(0.25, 2.0, w.shape[0]))
        return lm

    args = dict(pretrained=tiny_qwen2_audio_dir, device="cpu", prefix_cache=False)
    p_res, p_speech, p_text = final_states(uneven_norm(LSLM(**args)))
    lm = uneven_norm(LSLM(intervention="length", intervene_layers="last", critical="all", **args))
    res, speech, _ = final_states(lm)
    sp, tp = speech_positions(lm), text_positions(lm)
    s, t = p_speech[sp], p_text[tp]
    A = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    path = A.argmax(0)
    on_path = {int(i) for i in path}
    for k in on_path:
        j = [jj for jj in range(len(tp)) if int(path[jj]) == k]
        target = t[max(j, key=lambda jj: float(A[k, jj]))]
        assert torch.allclose(speech[sp[k]].norm(), target.norm(), atol=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(speech[sp[k]], s[k], dim=0)) - 1) < 1e-5
    others = [i for i in range(speech.shape[0]) if i not in {sp[k] for k in on_path}]
    assert torch.equal(speech[others], p_speech[others])
    assert lm.intervener.edits == len(on_path)
    # nothing reads a speech position's final state but capture (the head reads the last context
    # token; keys and values come from layer inputs): an edit at the last index changes no score
    assert res == p_res


def test_capture_under_an_intervention_stores_the_edited_state(tiny_qwen2_audio_dir, tmp_path):
    """Editors run before readers at a site: capture stores what the next layer receives (the
    oracle's text pass runs first, so this does not depend on which hooks were installed first)."""
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle", intervene_layers="1",
              critical="bottom2", capture="pooled", capture_dir=str(tmp_path / "c"))
    inputs = []
    h = lm.backend_impl.decoder_layers[1].register_forward_pre_hook(
        lambda m, a, kw: inputs.append((kw.get("hidden_states", a[0] if a else None)).detach().clone()), with_kwargs=True)
    try:
        lm.loglikelihood(twin_requests())
    finally:
        h.remove()
    assert lm.intervener.edits == 2
    speech_in = max(inputs, key=lambda x: x.shape[1])[0]
    reader = CaptureReader(tmp_path / "c")
    (rec,) = [r for r in reader.records if r["modality"] == "speech"]
    expected = speech_in[speech_positions(lm)].float().mean(0).numpy()
    np.testing.assert_allclose(reader.load(rec)["pooled"][1], expected, atol=1e-6, rtol=0)


def test_manifest_records_the_hook_protocol(tiny_qwen2_audio_dir, tmp_path):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="tokens", capture_dir=str(tmp_path / "c"),
              capture_layers="0/last", intervention="angle", intervene_layers="1/last")
    n = len(lm.backend_impl.decoder_layers)
    hooks = json.loads(json.dumps(lm.get_model_info()["lmeval_speech"]["hooks"]))
    cap = hooks["capture"]["hook"]
    assert (cap["kind"], cap["layers"]) == ("read", list(range(n + 1)))
    assert cap["sites"] == {"0": "input of decoder layer 0", **{str(i): f"output of decoder layer {i - 1} (0-based)"
                                                                for i in range(1, n)},
                            str(n): "output of the decoder's final norm"}
    assert "speech positions" in cap["positions"] and "question span" in cap["positions"]
    edit, read = hooks["intervention"]["hooks"]["edit"], hooks["intervention"]["hooks"]["read"]
    assert (edit["kind"], edit["layers"], read["kind"], read["layers"]) == ("edit", [1, n], "read", [1, n])
    assert "bottom3" in edit["positions"] and "question span" in read["positions"]
