"""Audio Flamingo 3 (``AudioFlamingo3ForConditionalGeneration``): Whisper-large encoder, 2x avg-pool + LayerNorm,
2-layer MLP projector, Qwen2 LLM.

What is specific to this family:

* Long audio is the processor's own: ``AudioFlamingo3Processor`` cuts a clip into consecutive
  ``chunk_length`` windows (30 s), pads each to a full window, encodes them separately and puts all
  their audio tokens under the one ``<sound>`` placeholder, up to ``max_audio_len`` (600 s, 20 windows);
  past that it cuts with a log warning. The backend does the same windows (``segment_seconds``) and the
  same limit (``max_audio_seconds``, read from the checkpoint's processor), and past it the planner cuts
  and flags the item (``audio_truncated``) instead of a log line.
* The processor counts tokens from the summed real frames of all windows; the model keeps, per window,
  its own output length. Every window but the last is a full 3000 frames (750 tokens), so the two agree.
* The processor needs only a ``WhisperFeatureExtractor`` and the tokenizer (no torchvision); its chat
  template (released checkpoints) writes ``<sound>`` at the start of a user turn, before its text.
"""

from __future__ import annotations

import torch

from .base import ComposedSpeechBackend, WhisperStyleBackend
from .qwen2_audio import whisper_frames


class AudioFlamingo3Backend(WhisperStyleBackend, ComposedSpeechBackend):
    audio_placeholder = "<sound>"
    segment_seconds = 30.0
    max_audio_seconds = 600.0

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        if processor is not None:  # the processor's window and limit, as it applies them
            self.segment_seconds = float(self.feature_extractor.chunk_length)
            self.max_audio_seconds = float(getattr(processor, "max_audio_len", self.max_audio_seconds))
            self.audio_placeholder = getattr(processor, "audio_token", self.audio_placeholder)

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        model = AudioFlamingo3ForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw, **load)
        processor = AutoProcessor.from_pretrained(path, **kw)
        return cls(model, processor.tokenizer, processor)

    @property
    def _tower(self):
        return self.model.model.audio_tower

    def num_audio_tokens(self, num_samples: int) -> int:
        """The audio tower's output length for the real mel frames of one window."""
        frames = whisper_frames(num_samples, self.sampling_rate, self.segment_seconds)
        _, out_len = self._tower._get_feat_extract_output_lengths(torch.tensor(frames))
        return int(out_len)

    @torch.no_grad()
    def encode_audio(self, arrays):
        """``get_audio_features`` on the windows, as the processor pads them; its flat output split per window."""
        feats, mask = self.mel_features(arrays)
        tower = self._tower
        feats = feats.to(tower.device, tower.conv1.weight.dtype)
        mask = mask.to(tower.device)
        flat = self.model.get_audio_features(feats, mask).pooler_output
        _, lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        return list(flat.split(lengths.tolist()))
