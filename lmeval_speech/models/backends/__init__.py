"""Backend choice by the checkpoint's ``config.model_type`` (no guessing from names)."""

from __future__ import annotations

from importlib import import_module

# model_type -> "module:Class"; imported only when chosen.
SPEECH_BACKENDS = {
    "qwen2_audio": "lmeval_speech.models.backends.qwen2_audio:Qwen2AudioBackend",
    "qwen2_5_omni": "lmeval_speech.models.backends.qwen2_5_omni:Qwen25OmniThinkerBackend",
    "qwen2_5_omni_thinker": "lmeval_speech.models.backends.qwen2_5_omni:Qwen25OmniThinkerBackend",
    "voxtral": "lmeval_speech.models.backends.voxtral:VoxtralBackend",
    "granite_speech": "lmeval_speech.models.backends.granite_speech:GraniteSpeechBackend",
    "granite_speech_plus": "lmeval_speech.models.backends.granite_speech:GraniteSpeechPlusBackend",
    "audioflamingo3": "lmeval_speech.models.backends.audioflamingo3:AudioFlamingo3Backend",
    "gemma3n": "lmeval_speech.models.backends.gemma3n:Gemma3nBackend",
    "gemma4": "lmeval_speech.models.backends.gemma4:Gemma4Backend",
    "qwen3_omni_moe": "lmeval_speech.models.backends.qwen3_omni_moe:Qwen3OmniMoeThinkerBackend",
    "qwen3_omni_moe_thinker": "lmeval_speech.models.backends.qwen3_omni_moe:Qwen3OmniMoeThinkerBackend",
    "phi4_multimodal": "lmeval_speech.models.backends.phi4_multimodal:Phi4MultimodalBackend",
    "nemotron_h_omni": "lmeval_speech.models.backends.nemotron_h_omni:NemotronHOmniBackend",
    "lmeval_speech_mini": "lmeval_speech.mini.backend:MiniBackend",
}
TEXT_BACKEND = "lmeval_speech.models.backends.causal_lm:CausalLMBackend"
#: checkpoints known by name (``pretrained=NAME``): "module:function" giving the backend (``dtype=``) or the
#: path to load, imported only when named. The embedded model is a plugin of this package's models: its
#: package (``mini/``) imports ``models``, never the other way (``tests/test_structure.py``).
NAMED_BACKENDS = {"mini": "lmeval_speech.mini.build:load_mini_backend"}
NAMED_PATHS = {"mini-base": "lmeval_speech.mini.build:smollm2_fp32_dir"}
#: modules that register model types with transformers' Auto classes, imported before a config is read
PLUGINS = ("lmeval_speech.mini.modeling",)


class UnsupportedModelError(ValueError):
    pass


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


resolve = _load


def load_plugins() -> None:
    for module in PLUGINS:
        import_module(module)


def backend_for_config(config) -> type:
    """The backend class for a loaded ``PretrainedConfig``; a clear error for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type in SPEECH_BACKENDS:
        return _load(SPEECH_BACKENDS[model_type])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return _load(TEXT_BACKEND)
    raise UnsupportedModelError(
        f"lslm does not support model_type {model_type!r}. Speech LLMs supported: "
        f"{', '.join(sorted(SPEECH_BACKENDS))}; text-only causal LMs run the text twin of a task."
    )
