"""Owns the adapter's training files: the resumable checkpoint (weights, optimizer, both RNGs and the loop's
state in one safetensors file with JSON metadata, never a pickle), the shippable adapter, and growing an
adapter into one with more layers. Every file is written with ``fileio.atomic_write``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lmeval_speech.fileio import atomic_write

CKPT_NAME = "ckpt.safetensors"
LEGACY_CKPT = "ckpt.pt"


def save_checkpoint(ckpt_dir: Path, module, opt, state: dict, rng: random.Random) -> None:
    """One safetensors file (written atomically): the module's weights, the optimizer's tensors, torch's
    RNG state, and as JSON metadata the optimizer's param groups, ``state`` and the Python RNG state.
    Never a pickle: ``--resume`` reads it back without running code from the file."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(val).detach().clone().contiguous()
    tensors["torch_rng"] = torch.get_rng_state()
    version, internal, gauss = rng.getstate()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(osd["param_groups"]),
            "rng": json.dumps([version, list(internal), gauss])}
    atomic_write(Path(ckpt_dir) / CKPT_NAME, save(tensors, metadata=meta))


def load_checkpoint(ckpt_dir: Path) -> dict | None:
    """What :func:`save_checkpoint` wrote (None when there is none): ``model`` and ``optimizer`` state
    dicts, ``state``, ``rng`` (for ``random.Random.setstate``) and ``torch_rng``. An old pickle
    checkpoint (``ckpt.pt``) is refused, not loaded: unpickling runs code from the file."""
    from safetensors import safe_open

    path = Path(ckpt_dir) / CKPT_NAME
    if not path.exists():
        if (Path(ckpt_dir) / LEGACY_CKPT).exists():
            raise SystemExit(f"{Path(ckpt_dir) / LEGACY_CKPT} is a pickle checkpoint of an older version; it is not "
                             f"loaded (unpickling runs code from the file). Start without --resume, or from the "
                             f"shipped weights.")
        return None
    model, optim = {}, {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            if key.startswith("model."):
                model[key[len("model."):]] = t
            elif key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim.setdefault(int(idx), {})[name] = t
            elif key == "torch_rng":
                torch_rng = t
    version, internal, gauss = json.loads(meta["rng"])
    return {"model": model, "optimizer": {"state": optim, "param_groups": json.loads(meta["param_groups"])},
            "state": json.loads(meta["state"]), "rng": (version, tuple(internal), gauss), "torch_rng": torch_rng}


def restore_checkpoint(ckpt: dict, module, opt, rng: random.Random) -> dict:
    """Put what :func:`load_checkpoint` read back into the module, optimizer and both RNGs; returns the
    loop's state (step, schedule clock, curves)."""
    module.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    rng.setstate(ckpt["rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    state = ckpt["state"]
    print(f"resumed at step {state['step']} ({state.get('train_seconds', 0.0) / 60:.1f} min trained)", flush=True)
    return state


def init_layers(state: dict) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("layers.")})


def grow_from(proj, state: dict) -> None:
    """Load an adapter's weights into ``proj``, which may have more Transformer layers: the extra
    layers (after the loaded ones) start as the identity (attention output and second feed-forward
    projections zero; both are residual branches of a pre-norm layer), so step 0 is the loaded model."""
    n = init_layers(state)
    if n > len(proj.layers):
        raise SystemExit(f"the --init adapter has {n} layers, more than --layers {len(proj.layers)}")
    missing, unexpected = proj.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("layers.") or int(k.split(".")[1]) < n for k in missing):
        raise SystemExit(f"--init adapter does not fit this adapter: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in proj.layers[n:]:
            for lin in (layer.self_attn.out_proj, layer.linear2):
                lin.weight.zero_()
                lin.bias.zero_()


def save_adapter(proj, stats: dict | None, out_dir: Path, temperature: float | None = None,
                 name: str = "adapter.safetensors") -> None:
    """``name`` (+ ``ctc_temperature`` when given, as :func:`.build.set_adapter_temperature` stores it)
    and, with ``stats``, ``training.json`` into ``out_dir``, each written atomically."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in proj.state_dict().items()}
    if temperature is not None:
        state["ctc_temperature"] = torch.tensor(float(temperature))
    atomic_write(out_dir / name, save(state))
    if stats is not None:
        atomic_write(out_dir / "training.json", json.dumps(stats, indent=1))
