"""Big checkpoints (issue 31): lm-eval's ``parallelize`` / ``device_map`` convention through ``lslm``, and hooks,
capture and interventions on a model whose decoder layers are dispatched by accelerate: on this CPU-only machine a
layer is offloaded to disk (its weights are loaded by accelerate's hook at each forward, as on a multi-GPU split),
and every number equals the run on one device."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_tokenizer, save_tiny_qwen2_audio
from test_prefix_cache import cloze_requests

from lmeval_speech.models.backends.placement import placement_kwargs
from lmeval_speech.models.lslm import LSLM


def layer_split_map(path, disk_layer=1):
    """A device map covering the model exactly: every block on the CPU, decoder layer ``disk_layer`` on disk."""
    lm = LSLM(pretrained=path, device="cpu")
    model, layers = lm.backend_impl.model, lm.backend_impl.decoder_layers
    names = {m: n for n, m in model.named_modules()}
    container = names[layers[0]].rsplit(".", 1)[0]
    out, parts = {}, container.split(".")
    for depth in range(len(parts) + 1):
        parent = ".".join(parts[:depth])
        module = model.get_submodule(parent)
        for child, _ in module.named_children():
            full = f"{parent}.{child}" if parent else child
            if depth < len(parts) and child == parts[depth]:
                continue  # expanded at the next depth
            out[full] = "cpu"
    out[f"{container}.{disk_layer}"] = "disk"
    return out


@pytest.fixture(scope="module")
def tiny_qwen2_audio_3_layers(tmp_path_factory):
    return save_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_qwen2_audio_3"), build_tokenizer(), layers=3)


def test_placement_args_follow_lm_evals_hf_convention(tmp_path):
    args = {"parallelize": "True", "max_cpu_memory": "8GB", "offload_folder": str(tmp_path), "other": 1}
    assert placement_kwargs(args) == {"device_map": "auto", "max_memory": {"cpu": "8GB"}, "offload_folder": str(tmp_path)}
    assert args == {"other": 1}  # the placement args are taken, the rest left for lslm's unknown-args check
    (tmp_path / "map.json").write_text(json.dumps({"": "cpu"}))
    assert placement_kwargs({"device_map": str(tmp_path / "map.json"), "attn_implementation": "eager"}) == {
        "device_map": {"": "cpu"}, "attn_implementation": "eager"}
    with pytest.raises(ValueError, match="need parallelize=True or device_map"):
        placement_kwargs({"offload_folder": str(tmp_path)})
    with pytest.raises(TypeError, match="unknown model_args"):
        LSLM(pretrained="mini", device="cpu", max_memory_per_gpux="1GB")


def test_a_layer_split_model_scores_captures_and_intervenes_as_on_one_device(tiny_qwen2_audio_3_layers, tmp_path):
    from lmeval_speech.capture.store import CaptureReader

    path = tiny_qwen2_audio_3_layers
    device_map = layer_split_map(path)
    split = dict(device_map=device_map, offload_folder=str(tmp_path / "offload"))
    reqs = cloze_requests(n_items=2)
    one = LSLM(pretrained=path, device="cpu", batch_size=4)
    lm = LSLM(pretrained=path, device="cpu", batch_size=4, **split)
    model = lm.backend_impl.model
    assert "disk" in model.hf_device_map.values()
    assert lm.backend_impl.decoder_layers[1].self_attn.q_proj.weight.device.type == "meta"  # loaded per forward
    np.testing.assert_allclose([r[0] for r in lm.loglikelihood(reqs)], [r[0] for r in one.loglikelihood(reqs)], atol=1e-5)
    # capture: every hidden-state index, speech and text twins
    runs = {}
    for name, kw in (("one", {}), ("split", split)):
        cap = LSLM(pretrained=path, device="cpu", batch_size=4, capture="tokens", capture_layers="all",
                   capture_dir=str(tmp_path / name), **kw)
        cap.loglikelihood(reqs)
        reader = CaptureReader(tmp_path / name)
        runs[name] = {(r["modality"], r["doc_id"]): reader.load(r)["pooled"] for r in reader.records}
    assert runs["one"].keys() == runs["split"].keys() and len(runs["one"]) == 4
    for key, pooled in runs["one"].items():
        np.testing.assert_allclose(runs["split"][key], pooled, atol=1e-5)
    # interventions at the disk-offloaded layer's output and after it
    for layers in ("1", "2"):
        args = dict(intervention="angle", intervene_layers=layers, critical="bottom2", batch_size=4)
        edited = LSLM(pretrained=path, device="cpu", **args, **split)
        ref = LSLM(pretrained=path, device="cpu", **args)
        got, expected = edited.loglikelihood(reqs), ref.loglikelihood(reqs)
        np.testing.assert_allclose([r[0] for r in got], [r[0] for r in expected], atol=1e-5)
        assert edited.intervener.edits == ref.intervener.edits > 0
        plain = [r[0] for r in one.loglikelihood(reqs)]
        assert any(abs(a[0] - b) > 1e-4 for a, b in zip(got, plain))  # the edit reached the scores


def test_attn_implementation_is_passed_through(tiny_qwen2_audio_3_layers):
    eager = LSLM(pretrained=tiny_qwen2_audio_3_layers, device="cpu", attn_implementation="eager")
    assert eager.backend_impl.model.config.get_text_config()._attn_implementation == "eager"
    sdpa = LSLM(pretrained=tiny_qwen2_audio_3_layers, device="cpu", attn_implementation="sdpa")
    assert sdpa.backend_impl.model.config.get_text_config()._attn_implementation == "sdpa"
    reqs = cloze_requests(n_items=1)
    np.testing.assert_allclose([r[0] for r in eager.loglikelihood(reqs)], [r[0] for r in sdpa.loglikelihood(reqs)],
                               atol=1e-4)
