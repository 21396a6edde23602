"""Qwen2.5-Omni thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): the text-output half of Qwen2.5-Omni.

What is specific to this family:

* A full ``qwen2_5_omni`` checkpoint (thinker + talker + token2wav) is loaded as its thinker only:
  transformers loads the thinker class straight from it (the weights' ``thinker.`` prefix is dropped
  by its own checkpoint conversion), so the talker and the vocoder are never built.
* The audio encoder is Whisper-like but chunked: the mel frames the feature extractor marks as real
  are cut into ``2 * n_window``-frame chunks, encoded, 2x avg-pooled and projected; its padding
  window comes from the checkpoint's feature extractor (``chunk_length``: 300 s for the released
  models), so ``max_audio_seconds`` is read from it rather than fixed at 30 s.
* The decoder uses multimodal RoPE: position ids come from the thinker's ``get_rope_index`` (3 rows,
  one per time/height/width section), computed here from the expanded ids and the attention mask
  exactly as the thinker's forward computes them.
* The processor is ``Qwen2_5OmniProcessor``, loaded whole where torchvision imports and as its audio half
  otherwise (``processor_half``: the same class without its image and video processors): its tokenizer, its
  audio token names (``audio_placeholder``), its own count (``_get_num_audio_tokens``), its chat template where
  the checkpoint ships one (rendered by transformers), and its ``WhisperFeatureExtractor`` called as its
  ``_process_audio`` calls it (``padding="max_length"``, attention mask).
"""

from __future__ import annotations

import torch

from .base import ComposedSpeechBackend, MRopeBackend, WhisperStyleBackend


class Qwen25OmniThinkerBackend(MRopeBackend, WhisperStyleBackend, ComposedSpeechBackend):
    audio_placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    # every example of the Qwen2.5-Omni-7B / -3B cards (and lmms-eval's default for the family)
    card_system_prompt = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                          "perceiving auditory and visual inputs, as well as generating text and speech.")

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        names = [getattr(processor, n, None) for n in ("audio_bos_token", "audio_token", "audio_eos_token")]
        if all(names):  # the processor's names for its audio tokens (read from the tokenizer)
            self.audio_placeholder = "".join(names)
        fe = self.feature_extractor
        self.max_audio_seconds = fe.n_samples / fe.sampling_rate  # the window the feature extractor pads to

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AutoConfig, Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

        from .processor_half import load_processor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, **kw)
        if config.model_type == "qwen2_5_omni":  # full checkpoint: build and load the thinker only
            config = config.thinker_config
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype, **kw, **load)
        processor = load_processor(Qwen2_5OmniProcessor, path, **kw)  # whole, or its audio half without torchvision
        return cls(model, processor.tokenizer, processor)

    @staticmethod
    def _output_length(frames):
        """Audio tokens for ``frames`` real mel frames: the processor module's own rule (conv stride 2, 2x avg-pool)."""
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

        return _get_feat_extract_output_lengths(frames)

    def num_audio_tokens(self, num_samples: int) -> int:
        """``Qwen2_5OmniProcessor._get_num_audio_tokens``: the processor's own count (equal to the one its
        ``__call__`` writes from the feature extractor's mask: tested)."""
        return int(self.processor._get_num_audio_tokens(int(num_samples)))

    @torch.no_grad()
    def encode_audio(self, arrays):
        feats, mask = self.mel_features(arrays)
        mask = mask.to(self.model.device)
        out = self.model.get_audio_features(feats.to(self.model.device), feature_attention_mask=mask)
        return list(out.last_hidden_state.split(self._output_length(mask.sum(-1)).tolist()))

    def _audio_seqlens(self, input_ids, attention_mask):
        """One mel length per run of audio tokens, in the order ``get_rope_index`` consumes them. It only
        uses the token count each length implies; ``4 * n`` frames give exactly ``n`` tokens."""
        is_audio = (input_ids == self.audio_token_id) & attention_mask.bool()
        lengths = []
        for row in is_audio.tolist():
            run = 0
            for flag in row + [False]:
                if flag:
                    run += 1
                elif run:
                    lengths.append(4 * run)
                    run = 0
        return torch.tensor(lengths, dtype=torch.long, device=input_ids.device) if lengths else None

    def rope_positions(self, input_ids, attention_mask):
        # Same call as Qwen2_5OmniThinkerModel.compute_3d_position_ids on a fresh forward (no cache, no vision).
        return self.model.model.get_rope_index(
            input_ids, None, None, attention_mask, False, self._audio_seqlens(input_ids, attention_mask)
        )[0]
