"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): Whisper-large encoder, 2x avg-pool, linear projector."""

from __future__ import annotations

import torch

from .base import ComposedSpeechBackend, WhisperStyleBackend


def whisper_frames(num_samples: int, sampling_rate: int = 16000, max_seconds: float = 30.0) -> int:
    """Mel frames the Whisper feature extractor marks as real (hop 160) for a clip, capped at one window."""
    return -(-min(int(num_samples), int(max_seconds * sampling_rate)) // 160)


class Qwen2AudioBackend(WhisperStyleBackend, ComposedSpeechBackend):
    """A clip longer than the encoder's 30 s window is encoded as consecutive 30 s windows whose
    embeddings are concatenated in order under the one ``<|AUDIO|>`` placeholder (Qwen2-Audio's
    processor would cut it at 30 s; for a question whose options are spoken last, that drops
    options the text twin keeps). 300 s (7,500 audio positions) is the most one prompt takes."""

    audio_placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    segment_seconds = 30.0
    max_audio_seconds = 300.0

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        model = Qwen2AudioForConditionalGeneration.from_pretrained(
            path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, **load
        )
        processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        return cls(model, processor.tokenizer, processor)

    def num_audio_tokens(self, num_samples: int) -> int:
        """The audio tower's own output-length rule applied to the mel frames of one window."""
        frames = whisper_frames(num_samples, self.sampling_rate, self.segment_seconds)
        _, out_len = self.model.model.audio_tower._get_feat_extract_output_lengths(torch.tensor(frames))
        return int(out_len)

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Same computation as ``Qwen2AudioModel.forward``'s audio branch, per clip, cropped to its length."""
        from transformers.masking_utils import create_bidirectional_mask

        feats, feat_mask = self.mel_features(arrays)
        inner = self.model.model
        tower = inner.audio_tower
        feats = feats.to(tower.device, tower.conv1.weight.dtype)
        feat_mask = feat_mask.to(tower.device)
        feat_lengths, out_lengths = tower._get_feat_extract_output_lengths(feat_mask.sum(-1))
        max_len = (feats.shape[-1] - 2) // 2 + 1
        mask_2d = (torch.arange(max_len, device=feats.device)[None, :] < feat_lengths[:, None]).long()
        dummy = torch.zeros((feats.shape[0], max_len, 1), dtype=feats.dtype, device=feats.device)
        attn = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
        hidden = tower(feats, attention_mask=attn).last_hidden_state
        projected = inner.multi_modal_projector(hidden)
        return [projected[i, : int(n)] for i, n in enumerate(out_lengths.tolist())]
