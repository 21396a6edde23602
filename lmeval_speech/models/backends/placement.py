"""Owns where a checkpoint's weights go: lm-eval's ``parallelize=True`` convention for models that do not fit one
device (accelerate's ``device_map``, ``max_memory_per_gpu``, ``max_cpu_memory``, ``offload_folder``, as lm-eval's
``hf`` model takes them) and the ``from_pretrained`` arguments that pass through unchanged (``attn_implementation``).

With a device map, transformers dispatches the model through accelerate: every placed module moves its inputs to its
own device, so the backends' direct calls (embeddings, encoder, decoder, head) and the hooks of capture and
interventions (which read and write the tensors a layer gives, on that layer's device) need nothing else. The
adapter's inputs go to the device of the input embeddings.
"""

from __future__ import annotations

import json

import torch

#: lslm model args this module takes (lm-eval's ``hf`` names; ``device_map_option`` is its alias of ``device_map``)
PLACEMENT_ARGS = ("parallelize", "device_map", "device_map_option", "max_memory_per_gpu", "max_cpu_memory",
                  "offload_folder", "attn_implementation")


def placement_kwargs(model_args: dict) -> dict:
    """Pops the placement args from ``model_args`` (lslm's remaining keyword args) and returns the ``from_pretrained``
    keyword args they mean. ``device_map``: ``auto`` / ``balanced`` / ``sequential``, a dict (Python API), or the path
    of a JSON file holding one; ``parallelize=True`` alone means ``device_map=auto``."""
    args = {k: model_args.pop(k) for k in PLACEMENT_ARGS if k in model_args}
    out = {}
    if args.get("attn_implementation"):
        out["attn_implementation"] = str(args["attn_implementation"])
    device_map = args.get("device_map", args.get("device_map_option"))
    if str(args.get("parallelize", False)).lower() in ("true", "1", "yes") and device_map in (None, ""):
        device_map = "auto"
    placing = {k: args[k] for k in ("max_memory_per_gpu", "max_cpu_memory", "offload_folder") if args.get(k) not in (None, "")}
    if device_map in (None, ""):
        if placing:
            raise ValueError(f"{sorted(placing)} need parallelize=True or device_map=...")
        return out
    if isinstance(device_map, str) and device_map.endswith(".json"):
        with open(device_map, encoding="utf-8") as f:
            device_map = json.load(f)
    out["device_map"] = device_map
    max_memory = {}
    if "max_memory_per_gpu" in placing:
        max_memory.update({i: placing["max_memory_per_gpu"] for i in range(torch.cuda.device_count())})
    if "max_cpu_memory" in placing:
        max_memory["cpu"] = placing["max_cpu_memory"]
    if max_memory:
        out["max_memory"] = max_memory
    if "offload_folder" in placing:
        out["offload_folder"] = str(placing["offload_folder"])
    return out


def place(model, device) -> torch.device:
    """The model in eval mode on ``device``, or where its device map put it; returns the device the adapter's inputs
    go to (that of the input embeddings when the model is dispatched)."""
    model.eval()
    if not getattr(model, "hf_device_map", None):
        model.to(device)
        return device
    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)  # offloaded: its hook's execution device
    return torch.device(getattr(hook, "execution_device", None) or "cpu")
