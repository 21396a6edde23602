"""Qwen3-Omni-MoE thinker (``Qwen3OmniMoeThinkerForConditionalGeneration``): the text-output half of Qwen3-Omni
(AuT audio encoder, MoE LLM).

What is specific to this family:

* A full ``qwen3_omni_moe`` checkpoint (thinker + talker + code2wav) is loaded as its thinker only, as for
  Qwen2.5-Omni: transformers drops the weights' ``thinker.`` prefix itself, the talker is never built.
* Audio of any length in one piece: the processor calls the ``WhisperFeatureExtractor`` with
  ``padding=True, truncation=False`` (no 30 s window), and the encoder cuts the mel frames into
  ``2 * n_window``-frame chunks itself; every full chunk (1 s) gives 13 tokens. Clips are featurized one
  at a time, as the processor does for a one-audio prompt (padding a batch to its longest clip changes
  the last mel frames of the shorter ones). The processor and the encoder set no length limit; lslm
  takes up to 40 min per clip (``max_audio_seconds``, lslm's own cap), past that it cuts and flags.
* Without images or videos, the thinker's multimodal RoPE positions are the plain running positions of
  the attention mask (``get_rope_index``'s text branch, 3 identical rows); ``run_decoder`` takes them
  from ``get_rope_index`` exactly as the thinker's forward does.
* ``Qwen3OmniMoeProcessor`` is loaded whole where torchvision imports, else as its audio half
  (``processor_half``: the same class without its image and video processors), with its chat template;
  its feature extractor is called as the processor calls it, the count is the processor module's own.
"""

from __future__ import annotations

import torch

from .base import ComposedSpeechBackend, MRopeBackend


def _frames(num_samples: int, hop: int) -> int:
    return int(num_samples) // hop


class Qwen3OmniMoeThinkerBackend(MRopeBackend, ComposedSpeechBackend):
    audio_placeholder = "<|audio_start|><|audio_pad|><|audio_end|>"
    max_audio_seconds = 2400.0
    #: ``audio_kwargs`` of ``Qwen3OmniMoeProcessor``
    FEATURE_KWARGS = {"padding": True, "truncation": False, "return_attention_mask": True}

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        names = [getattr(tokenizer, n, None) for n in ("audio_bos_token", "audio_token", "audio_eos_token")]
        if all(names):  # the tokenizer's own names for its audio tokens
            self.audio_placeholder = "".join(names)

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AutoConfig, Qwen3OmniMoeProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

        from .processor_half import load_processor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, **kw)
        if config.model_type == "qwen3_omni_moe":  # full checkpoint: build and load the thinker only
            config = config.thinker_config
        model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype, **kw, **load)
        processor = load_processor(Qwen3OmniMoeProcessor, path, **kw)  # whole, or its audio half without torchvision
        return cls(model, processor.tokenizer, processor)

    @property
    def feature_extractor(self):
        return self.processor.feature_extractor

    def num_audio_tokens(self, num_samples: int) -> int:
        """``Qwen3OmniMoeProcessor``'s count: its output-length rule on the clip's mel frames."""
        from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

        frames = _frames(num_samples, self.feature_extractor.hop_length)
        return int(_get_feat_extract_output_lengths(torch.tensor(frames), self.model.config.audio_config.n_window))

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Per clip: the feature extractor as the processor calls it, then ``get_audio_features`` (the thinker's path)."""
        fe = self.feature_extractor
        out = []
        for a in arrays:
            feats = fe([a], sampling_rate=self.sampling_rate, return_tensors="pt", **self.FEATURE_KWARGS)
            x = feats["input_features"].to(self.model.device, self.model.model.audio_tower.dtype)
            mask = feats["attention_mask"].to(self.model.device)
            out.append(self.model.model.get_audio_features(x, mask).last_hidden_state)
        return out

    def rope_positions(self, input_ids, attention_mask):
        # The thinker's compute_3d_position_ids on a fresh forward with no image or video
        return self.model.model.get_rope_index(input_ids, None, None, attention_mask)[0]
