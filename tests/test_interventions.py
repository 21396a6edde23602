"""Interventions on a tiny real model: exact edits where intended, bit-identical states elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import tone
from lmeval_speech.interventions.ops import angle_projection, length_normalization
from lmeval_speech.models.lslm import LSLM

Q = "What is the capital of France?"
TEXT_CTX = f"Question: {Q}\nAnswer:"
SPEECH_CTX = "Question: <audio>\nAnswer:"
AUDIO = tone(0.9, seed=5)


def requests():
    extra = {"audio": [{"array": AUDIO, "sampling_rate": 16000}]}
    return [
        Instance("loglikelihood", {"question": Q}, (SPEECH_CTX, " Paris", extra), 0, ("speech_mmlu_continuation_geo_speech", 0, 1)),
        Instance("loglikelihood", {"question": Q}, (TEXT_CTX, " Paris"), 0, ("speech_mmlu_continuation_geo_text", 0, 1)),
    ]


def record_layer_inputs(lm):
    """Pre-hooks (registered by the test, not the adapter) keep every decoder layer's input per call."""
    seen = {i: [] for i in range(len(lm.backend_impl.decoder_layers))}
    stream = lm.backend_impl.layer_output_stream  # layers that carry [streams, B, T, D] (Gemma 3n): its hidden state

    def state(h):
        return (h[stream] if stream is not None and h.dim() == 4 else h).detach().clone()

    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen[i].append(
        state(kw.get("hidden_states", a[0] if a else None))), with_kwargs=True)
        for i, layer in enumerate(lm.backend_impl.decoder_layers)]
    return seen, handles


def speech_positions(lm):
    b = lm.backend_impl
    n = b.num_audio_tokens(len(AUDIO))
    ids = lm.tok_encode(SPEECH_CTX.replace("<audio>", b.audio_placeholder))
    start = ids.index(b.audio_token_id)
    return list(range(start, start + n))


def text_positions(lm):
    """The question's tokens, by the tokenizer's character offsets, after the BOS the tokenizer adds (Gemma's)."""
    enc = lm.tokenizer(TEXT_CTX, return_offsets_mapping=True, add_special_tokens=False)
    start = TEXT_CTX.index(Q)
    offset = len(lm.tok_encode(TEXT_CTX)) - len(enc["input_ids"])
    return [i + offset for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < start + len(Q)]


def run(lm):
    seen, handles = record_layer_inputs(lm)
    res = lm.loglikelihood(requests())
    for h in handles:
        h.remove()
    speech_call = max(range(len(seen[0])), key=lambda c: seen[0][c].shape[1])
    text_call = min(range(len(seen[0])), key=lambda c: seen[0][c].shape[1])
    return res, {i: v[speech_call][0] for i, v in seen.items()}, {i: v[text_call][0] for i, v in seen.items()}


@pytest.fixture(scope="module")
def plain(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    return run(lm)


@pytest.mark.parametrize("kind", ["angle", "length"])
def test_decoder_layer_edit_is_exact_and_local(tiny_qwen2_audio_dir, plain, kind):
    check_decoder_layer_edit(tiny_qwen2_audio_dir, plain, kind)


def check_decoder_layer_edit(path, plain, kind):
    """Hidden state 1 of the speech twin edited at the 2 critical positions the plain run's states
    give, exactly as the op says; everything else bit-identical; the text twin's score untouched."""
    lm = LSLM(pretrained=path, device="cpu", intervention=kind, intervene_layers="1", critical="bottom2")
    res, speech, _ = run(lm)
    p_res, p_speech, p_text = plain
    sp, tp = speech_positions(lm), text_positions(lm)
    # hidden state 1 = decoder layer 0's output is edited; layer 0's input is before the edit: bit-identical
    assert torch.equal(speech[0], p_speech[0])
    # expected critical tokens and targets, computed here from the plain run's states
    s = p_speech[1][sp]
    t = p_text[1][tp]
    A = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    path = A.argmax(0)
    on_path = sorted({int(i) for i in path}, key=lambda i: float(A[i, path == i].min()))
    critical = on_path[:2]
    edited = speech[1]
    for k, pos in enumerate(sp):
        if k in critical:
            j = [jj for jj in range(len(tp)) if int(path[jj]) == k]
            target = t[max(j, key=lambda jj: float(A[k, jj]))]
            if kind == "angle":
                assert torch.allclose(edited[pos].norm(), s[k].norm(), atol=1e-5)
                cos = torch.nn.functional.cosine_similarity(edited[pos], target, dim=0)
                assert abs(float(cos) - 1) < 1e-5
            else:
                assert torch.allclose(edited[pos].norm(), target.norm(), atol=1e-5)
                cos = torch.nn.functional.cosine_similarity(edited[pos], s[k], dim=0)
                assert abs(float(cos) - 1) < 1e-5
        else:
            assert torch.equal(edited[pos], p_speech[1][pos])
    others = [i for i in range(edited.shape[0]) if i not in sp]
    assert torch.equal(edited[others], p_speech[1][others])
    assert lm.intervener.edits == 2
    assert res[1] == p_res[1]  # the text twin is never edited
    assert res[0][0] != p_res[0][0]  # the edit reaches the score
    assert all(not layer._forward_hooks for layer in lm.backend_impl.decoder_layers)


def test_input_layer_all_tokens_take_text_norm(tiny_qwen2_audio_dir, plain):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="length", intervene_layers="input",
              critical="all")
    _, speech, _ = run(lm)
    _, p_speech, p_text = plain
    sp, tp = speech_positions(lm), text_positions(lm)
    s, t = p_speech[0][sp], p_text[0][tp]
    A = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    path = A.argmax(0)
    for k in {int(i) for i in path}:
        j = [jj for jj in range(len(tp)) if int(path[jj]) == k]
        target = t[max(j, key=lambda jj: float(A[k, jj]))]
        assert torch.allclose(speech[0][sp[k]].norm(), target.norm(), atol=1e-5)
    untouched = [sp[k] for k in range(len(sp)) if k not in {int(i) for i in path}]
    assert all(torch.equal(speech[0][p], p_speech[0][p]) for p in untouched)


def test_calibrated_mode_needs_no_text(tiny_qwen2_audio_dir, tmp_path, plain):
    calib = tmp_path / "calib.safetensors"
    LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="length", intervene_layers="1",
         save_calibration=str(calib)).loglikelihood(requests())
    assert calib.exists()
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="length", intervene_layers="1",
              intervention_mode="calibrated", calibration=str(calib), critical="bottom1")
    res = lm.loglikelihood(requests()[:1])  # speech only
    from safetensors.numpy import load_file

    norm = float(load_file(str(calib))["1.norm"][0])
    _, p_text = plain[1], plain[2]
    assert abs(norm - float(p_text[1][text_positions(lm)].norm(dim=-1).mean())) < 1e-4
    assert lm.intervener.edits == 1 and np.isfinite(res[0][0])


def test_oracle_without_text_twin_is_a_clear_error(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle")
    with pytest.raises(KeyError, match="speech_mmlu_continuation_geo_text"):
        lm.loglikelihood(requests()[:1])


def test_ops_strength_interpolates():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(angle_projection(s, t, 0.0), s, atol=1e-6)
    half = length_normalization(s, t, 0.5).norm(dim=-1)
    assert torch.allclose(half, (s.norm(dim=-1) * t.norm(dim=-1)).sqrt(), atol=1e-5)
    from lmeval_speech.interventions.hooks import InterventionSpec

    with pytest.raises(ValueError, match="bottomK"):
        InterventionSpec.from_args("angle", critical="worst3")


@pytest.mark.parametrize("kind", ["angle", "length"])
def test_calibrated_edit_hits_the_least_aligned_positions_with_the_stored_norm_and_direction(
        tiny_qwen2_audio_dir, tmp_path, plain, kind):
    """A hand-made calibration (hidden state 1: norm 7, direction e0): the two speech positions least
    similar to e0 are edited, angle -> direction e0 with the speech norm kept, length -> norm 7 with
    the speech direction kept; every other position is bit-identical."""
    from safetensors.numpy import save_file

    d = plain[1][1].shape[-1]
    direction = np.zeros(d, dtype=np.float32)
    direction[0] = 1.0
    calib = tmp_path / "calib.safetensors"
    save_file({"1.norm": np.array([7.0], dtype=np.float32), "1.direction": direction}, str(calib))
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention=kind, intervene_layers="1",
              intervention_mode="calibrated", calibration=str(calib), critical="bottom2")
    _, speech, _ = run(lm)
    p_speech = plain[1]
    sp = speech_positions(lm)
    s = p_speech[1][sp]
    cos = torch.nn.functional.cosine_similarity(s, torch.from_numpy(direction)[None], dim=-1)
    critical = set(torch.argsort(cos)[:2].tolist())
    for k, pos in enumerate(sp):
        got = speech[1][pos]
        if k in critical:
            if kind == "angle":
                assert torch.allclose(got.norm(), s[k].norm(), atol=1e-4)
                assert abs(float(got[0] / got.norm()) - 1) < 1e-5
            else:
                assert torch.allclose(got.norm(), torch.tensor(7.0), atol=1e-4)
                assert abs(float(torch.nn.functional.cosine_similarity(got, s[k], dim=0)) - 1) < 1e-5
        else:
            assert torch.equal(got, p_speech[1][pos])
    assert lm.intervener.edits == 2


def test_oracle_references_are_freed_once_the_speech_twin_is_scored(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle", intervene_layers="1")
    lm.loglikelihood(requests())
    assert lm.intervener.edits > 0 and lm.intervener.text_states == {}


def test_an_oracle_leaves_the_prior_controls_unedited(tiny_qwen2_audio_dir):
    """The shuffled control hears another item's audio; an oracle edit would write *this* item's text
    states into it, handing the control the question (hearing = speech - control would shrink). The
    controls score as the plain model scores them; the speech twin is edited."""
    other = {"audio": [{"array": tone(1.4, seed=9), "sampling_rate": 16000}]}
    control = Instance("loglikelihood", {"question": Q}, (SPEECH_CTX, " Paris", other), 0,
                       ("speech_mmlu_continuation_geo_shuffled", 0, 1))
    reqs = requests() + [control]
    plain = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu").loglikelihood(reqs)
    edited = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle", intervene_layers="1",
                  critical="all").loglikelihood(reqs)
    assert abs(edited[0][0] - plain[0][0]) > 1e-4  # the speech twin is edited
    assert edited[1][0] == plain[1][0] and edited[2][0] == plain[2][0]  # text and control are not


@pytest.mark.parametrize("controls_first", [False, True])
def test_a_control_hearing_another_items_audio_never_shares_that_items_edited_pass(tiny_qwen2_audio_dir, controls_first):
    """Found by a review: sequences with the same prompt and audio shared one forward pass, with the
    hooks set from the group's first sequence. The shuffled control of item 0 hears item 1's audio
    under item 1's speech prompt: speech twins first, the control got item 1's oracle edit; controls
    first, item 1's speech twin was not edited at all (a zero intervention effect, exit code 0)."""
    qs = ["What is the capital of France?", "What is the capital of Spain?"]
    audio = [{"audio": [{"array": tone(0.9, seed=5), "sampling_rate": 16000}]},
             {"audio": [{"array": tone(1.3, 300, seed=7), "sampling_rate": 16000}]}]
    pairs = []
    for d in (0, 1):
        pairs.append(Instance("loglikelihood", {"question": qs[d]}, (SPEECH_CTX, " Paris", audio[d]), 0,
                              ("speech_mmlu_continuation_geo_speech", d, 1)))
        pairs.append(Instance("loglikelihood", {"question": qs[d]}, (f"Question: {qs[d]}\nAnswer:", " Paris"), 0,
                              ("speech_mmlu_continuation_geo_text", d, 1)))
    controls = [Instance("loglikelihood", {"question": qs[d]}, (SPEECH_CTX, " Paris", audio[1 - d]), 0,
                         ("speech_mmlu_continuation_geo_shuffled", d, 1)) for d in (0, 1)]
    reqs = controls + pairs if controls_first else pairs + controls
    for prefix_cache in (True, False):
        plain = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", prefix_cache=prefix_cache).loglikelihood(reqs)
        edited = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", prefix_cache=prefix_cache, intervention="angle",
                      intervene_layers="1", critical="all").loglikelihood(reqs)
        role = [r.task_name.rsplit("_", 1)[1] for r in reqs]
        for name, p, e in zip(role, plain, edited):
            if name == "speech":
                assert abs(e[0] - p[0]) > 1e-5, (controls_first, prefix_cache)  # every speech twin is edited
            else:
                assert e[0] == p[0], (name, controls_first, prefix_cache)  # text twins and controls never


# ---------------------------------------------------------------- same-size random controls (issue 28)


def test_random_controls_are_edits_of_the_same_size_in_a_random_direction():
    from lmeval_speech.interventions.ops import random_angle, random_length

    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(64, 32, generator=g), 3 * torch.randn(64, 32, generator=g)
    real = angle_projection(h_s, h_t)
    ctrl = random_angle(h_s, h_t, generator=torch.Generator().manual_seed(1))
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(ctrl.norm(dim=-1), h_s.norm(dim=-1))  # the norm kept, as the real edit keeps it
    torch.testing.assert_close(cos(ctrl, h_s, dim=-1), cos(real, h_s, dim=-1), atol=1e-5, rtol=0)  # same angle
    # ... but not towards the text state: the real edit lands on it, the control does not
    assert float(cos(real, h_t, dim=-1).min()) > 0.9999 and float(cos(ctrl, h_t, dim=-1).abs().mean()) < 0.5
    torch.testing.assert_close(ctrl, random_angle(h_s, h_t, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(ctrl, random_angle(h_s, h_t, generator=torch.Generator().manual_seed(2)))
    # length: the same |log norm change| in a random direction (up or down), the direction of h_s kept
    lreal, lctrl = length_normalization(h_s, h_t), random_length(h_s, h_t, generator=torch.Generator().manual_seed(3))
    change = (lctrl.norm(dim=-1) / h_s.norm(dim=-1)).log()
    torch.testing.assert_close(change.abs(), (lreal.norm(dim=-1) / h_s.norm(dim=-1)).log().abs(), atol=1e-5, rtol=0)
    assert (change > 0).any() and (change < 0).any()
    torch.testing.assert_close(cos(lctrl, h_s, dim=-1), torch.ones(64), atol=1e-5, rtol=0)


def test_random_angle_control_runs_through_lslm_on_the_same_positions(tiny_qwen2_audio_dir, plain):
    """The control edits exactly the positions the real edit would (the critical tokens), each rotated by
    the real edit's angle, deterministically across reruns; nothing else changes."""
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="random_angle", intervene_layers="1",
              critical="bottom2")
    res, speech, _ = run(lm)
    real = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="angle", intervene_layers="1",
                critical="bottom2")
    _, real_speech, _ = run(real)
    p_res, p_speech, _ = plain
    sp = speech_positions(lm)
    changed = [p for p in sp if not torch.equal(speech[1][p], p_speech[1][p])]
    assert changed == [p for p in sp if not torch.equal(real_speech[1][p], p_speech[1][p])] and len(changed) == 2
    cos = torch.nn.functional.cosine_similarity
    for p in changed:
        assert torch.allclose(speech[1][p].norm(), p_speech[1][p].norm(), atol=1e-4)
        assert abs(float(cos(speech[1][p], p_speech[1][p], dim=0) - cos(real_speech[1][p], p_speech[1][p], dim=0))) < 1e-4
        assert not torch.allclose(speech[1][p], real_speech[1][p], atol=1e-3)
    assert res[1] == p_res[1] and lm.intervener.edits == 2
    again = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="random_angle", intervene_layers="1",
                 critical="bottom2")
    assert run(again)[0] == res


# ---------------------------------------------------------------- issue 28: steering vectors
def _steer_file(path, d, items=(), index=1, scale=0.5):
    from lmeval_speech.interventions.steer import write

    v = np.linspace(-1, 1, d).astype(np.float32) * scale
    write(path, {0: np.zeros(d, np.float32), index: v}, [list(i) for i in items], {}, "test")
    return torch.from_numpy(v)


@pytest.mark.parametrize("kind", ["steer", "random_steer"])
def test_steer_adds_the_vector_and_its_control_a_random_one_of_the_same_norm(tiny_qwen2_audio_dir, tmp_path, plain, kind):
    """Hidden state 1 of every speech position gets + strength * v (steer) or + strength * |v| * a random unit
    vector (random_steer, the same in a rerun); layer 0's input and the text twin are untouched."""
    d = plain[1][1].shape[-1]
    v = _steer_file(tmp_path / "v.safetensors", d)
    args = dict(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention=kind, intervene_layers="1",
                critical="all", calibration=str(tmp_path / "v.safetensors"), strength=2.0)
    res, speech, _ = run(LSLM(**args))
    p_res, p_speech, _ = plain
    sp = speech_positions(LSLM(**args))
    delta = speech[1][sp] - p_speech[1][sp]
    if kind == "steer":
        assert torch.allclose(delta, 2.0 * v.expand_as(delta), atol=1e-5)
    else:
        assert torch.allclose(delta.norm(dim=-1), torch.full((len(sp),), 2.0 * float(v.norm())), atol=1e-4)
        cos = torch.nn.functional.cosine_similarity(delta, v[None], dim=-1)
        assert cos.abs().max() < 0.9  # not the steering direction
        _, again, _ = run(LSLM(**args))
        assert torch.equal(again[1], speech[1])  # seeded per item and layer
    others = [i for i in range(speech[1].shape[0]) if i not in sp]
    assert torch.equal(speech[1][others], p_speech[1][others]) and torch.equal(speech[0], p_speech[0])
    assert res[1] == p_res[1] and res[0][0] != p_res[0][0]


def test_steer_refuses_a_vector_estimated_on_the_evaluated_items(tiny_qwen2_audio_dir, tmp_path, plain):
    d = plain[1][1].shape[-1]
    _steer_file(tmp_path / "v.safetensors", d, items=[("speech_mmlu_continuation_geo", 0)])
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="steer", intervene_layers="1",
              calibration=str(tmp_path / "v.safetensors"))
    with pytest.raises(ValueError, match="estimated on 1 of the items"):
        lm.loglikelihood(requests())
    with pytest.raises(ValueError, match="needs calibration=FILE"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", intervention="steer")


def test_steer_vector_is_the_mean_text_minus_speech_state(tmp_path):
    """estimate() on a hand-written capture store: the mean over items with both twins of text - speech
    pooled states; an item with one twin only is left out; the file records the items."""
    from lmeval_speech.capture.store import CaptureWriter
    from lmeval_speech.interventions.steer import estimate, load, write

    rng = np.random.default_rng(0)
    w = CaptureWriter(tmp_path / "cap")
    states = {}
    for doc in range(3):
        for modality in ("text", "speech") if doc < 2 else ("text",):
            x = rng.normal(size=(3, 4)).astype(np.float32)
            states[(doc, modality)] = x
            w.add({"task": f"p_{modality}", "pair": "p", "modality": modality, "doc_id": doc}, {"pooled": x})
    w.flush()
    vectors, items, _ = estimate(tmp_path / "cap")
    want = np.mean([states[(d, "text")] - states[(d, "speech")] for d in (0, 1)], axis=0)
    assert items == [["p", 0], ["p", 1]]
    assert all(np.allclose(vectors[i], want[i], atol=1e-6) for i in range(3))
    write(tmp_path / "v.safetensors", vectors, items, {}, "cap")
    loaded, used = load(tmp_path / "v.safetensors")
    assert used == {("p", 0), ("p", 1)} and np.allclose(loaded[2], want[2], atol=1e-6)
