"""Phi-4-multimodal (``Phi4MultimodalForCausalLM``), audio path: Conformer encoder, 2-layer speech projector, Phi-4-mini
LLM, and a speech LoRA.

What is specific to this family:

* The speech LoRA: released checkpoints carry it in ``speech-lora/`` (``adapter_config.json`` +
  ``adapter_model.safetensors``), and their authors apply it to inputs with audio only (text-only inputs
  run the base model; transformers' docs load it with ``load_adapter(..., subfolder="speech-lora")``).
  It is injected here through peft's layer API (``inject_adapter_in_model``; the ``[phi4]`` extra:
  transformers 5.24's ``load_adapter`` would want peft >= 0.22), every weight of the
  file must land on the model (else an error), and ``set_modality`` switches it on for batches with
  audio and off for text-only ones (batches never mix the two). A checkpoint without ``speech-lora/``
  is run as it is, with one warning.
* Audio tokens: the feature extractor's own count (``audio_embed_sizes``: 80-bin log-mel frames,
  compressed 8x), one ``<|endoftext11|>``-style audio token each (the token whose id is the config's
  ``audio_token_id``); the speech embeddings are the model's own ``audio_embed`` on those features in
  "speech" projection mode. Clips are featurized one at a time (a batch is padded to its longest clip).
  Neither the feature extractor nor the encoder sets a length limit; lslm takes up to 30 min per clip
  (its own cap), past that it cuts and flags.
* The processor is ``Phi4MultimodalProcessor``, loaded whole where torchvision imports and as its audio half
  otherwise (``processor_half``: the same class without its image processor): its tokenizer, its audio token
  (``audio_placeholder``: its ``__call__`` repeats it ``audio_embed_sizes`` times), its chat template where the
  checkpoint ships one (rendered by transformers), and its audio processor (``Phi4MultimodalFeatureExtractor``).
"""

from __future__ import annotations

import logging

import torch

from .base import Backend

log = logging.getLogger(__name__)

SPEECH_ADAPTER = "speech"


def load_speech_lora(model, adapter_dir) -> None:
    """Inject the LoRA saved in ``adapter_dir`` (peft's format) as adapter ``speech``; every weight must load."""
    from pathlib import Path

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    inject_adapter_in_model(config, model, adapter_name=SPEECH_ADAPTER)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=SPEECH_ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    lora_params = {n for n, _ in model.named_parameters() if f"lora_A.{SPEECH_ADAPTER}." in n or f"lora_B.{SPEECH_ADAPTER}." in n}
    missing = [k for k in getattr(result, "missing_keys", []) if k in lora_params]
    if unexpected or missing or len(state) != len(lora_params):
        raise ValueError(f"the speech LoRA in {adapter_dir} does not fit the model: {len(state)} weights in the file, "
                         f"{len(lora_params)} LoRA weights injected, unexpected {unexpected[:3]}, missing {missing[:3]}")


def set_adapters(model, on: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(on)


class Phi4MultimodalBackend(Backend):
    max_audio_seconds = 1800.0
    modality_dependent = True

    def __init__(self, model, tokenizer, processor=None, has_speech_lora: bool = False):
        super().__init__(model, tokenizer, processor)
        token = getattr(processor, "audio_token", None)  # the processor's name for it (read from the tokenizer)
        if not token or tokenizer.convert_tokens_to_ids(token) != self.audio_token_id:
            token = tokenizer.convert_ids_to_tokens(self.audio_token_id)
        self.audio_placeholder = token
        self.has_speech_lora = has_speech_lora
        self._audio_mode = True  # peft injects adapters switched on

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from pathlib import Path

        from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor
        from transformers.utils import cached_file

        from .processor_half import load_processor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=dtype, **kw, **load)
        found = cached_file(path, "adapter_config.json", subfolder="speech-lora", revision=revision,
                            _raise_exceptions_for_missing_entries=False)
        if found:
            cached_file(path, "adapter_model.safetensors", subfolder="speech-lora", revision=revision)
            load_speech_lora(model, Path(found).parent)
        else:
            log.warning("%s has no speech-lora/ adapter: speech twins run the base model, not the speech LoRA "
                        "its authors apply to audio inputs", path)
        processor = load_processor(Phi4MultimodalProcessor, path, **kw)  # whole, or its audio half without torchvision
        backend = cls(model, processor.tokenizer, processor, has_speech_lora=bool(found))
        if found:  # hashed into the run's model identity: runs with and without the LoRA never look alike
            backend.adapter_file = str(Path(found).parent / "adapter_model.safetensors")
        return backend

    @property
    def audio_token_id(self) -> int:
        return self.model.config.audio_config.audio_token_id

    def set_modality(self, has_audio: bool) -> None:
        if self.has_speech_lora:
            set_adapters(self.model, has_audio)
        self._audio_mode = has_audio

    # ---- audio -----------------------------------------------------------------------------
    @property
    def audio_processor(self):
        """The processor's ``Phi4MultimodalFeatureExtractor`` (its ``audio_processor``)."""
        return self.processor.audio_processor

    def num_audio_tokens(self, num_samples: int) -> int:
        """``Phi4MultimodalFeatureExtractor``'s ``audio_embed_sizes`` for a clip of ``num_samples``."""
        fe = self.audio_processor
        frames = ((int(num_samples) - fe.win_length) // fe.hop_length + 1) * fe.audio_feat_stride
        return int(fe._compute_audio_embed_size(torch.tensor([frames]))[0])

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Per clip: the features and sizes as the processor gets them, then the model's ``audio_embed``
        ("speech" projection) over that many audio-token positions, in the model's speech state (an
        adapter that reaches the encoder is on, whatever the batch before was)."""
        switch = self.has_speech_lora and not self._audio_mode
        if switch:
            set_adapters(self.model, True)
        try:
            return [self._encode_one(a) for a in arrays]
        finally:
            if switch:
                set_adapters(self.model, False)

    def _encode_one(self, array):
        feats = self.audio_processor([array], sampling_rate=self.sampling_rate, return_tensors="pt")
        n = int(feats["audio_embed_sizes"][0])
        ids = torch.full((1, n), self.audio_token_id, device=self.model.device)
        slots = torch.zeros((1, n, self.model.config.hidden_size), device=self.model.device, dtype=self.model.dtype)
        return self.model.model.embed_tokens_extend.audio_embed(
            ids, slots, audio_input_features=feats["audio_input_features"].to(self.model.device),
            audio_embed_sizes=feats["audio_embed_sizes"], audio_attention_mask=None, audio_projection_mode="speech")[0]
