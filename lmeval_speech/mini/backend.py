"""``lslm`` backend for the embedded mini model (same interface as the hub families)."""

from __future__ import annotations

import numpy as np
import torch

from lmeval_speech.models.backends.base import WhisperStyleBackend

from .modeling import MiniLSLMForConditionalGeneration, speech_tokens_for


class MiniProcessor:
    """Tokenizer + Whisper feature extractor, with Qwen2-Audio's calling convention."""

    def __init__(self, tokenizer, feature_extractor, count_tokens=None):
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        # tokens per clip: from its length (MLP adapter) or, for the CTC adapter, from its content
        self.count_tokens = count_tokens

    def __call__(self, text: str, audio: list[np.ndarray] | None = None, sampling_rate=16000):
        audio = audio or []
        placeholder = MiniBackend.audio_placeholder
        if text.count(placeholder) != len(audio):
            raise ValueError(f"{text.count(placeholder)} placeholders for {len(audio)} audios")
        counts = self.count_tokens(audio) if self.count_tokens and audio else [speech_tokens_for(len(a)) for a in audio]
        for n in counts:
            text = text.replace(placeholder, "\0" * n, 1)
        text = text.replace("\0", placeholder)
        out = dict(self.tokenizer(text, return_tensors="pt", add_special_tokens=False))
        if audio:
            feats = self.feature_extractor(audio, sampling_rate=sampling_rate, return_attention_mask=True,
                                           padding="max_length", return_tensors="pt")
            out["input_features"] = feats["input_features"]
            out["feature_attention_mask"] = feats["attention_mask"]
        return out


class MiniBackend(WhisperStyleBackend):
    # SmolLM2's <|endoftext|> (id 0) never occurs in prompts; reusing it keeps the text path
    # bit-identical to SmolLM2 (no vocabulary resize).
    audio_placeholder = "<|endoftext|>"
    # The CTC adapter drops blank frames and merges repeats, so a clip's number of speech tokens
    # depends on what is said: lslm must encode the audio to count them (encode_audio gives
    # [n_i, D] tensors). True for every mini model; with the MLP adapter n_i is simply length-based.
    content_dependent_audio_tokens = True
    # A clip longer than the encoder's 30 s window is encoded as consecutive 30 s windows whose
    # speech tokens are concatenated in order (the adapter was trained on clips of at most 30 s).
    segment_seconds = 30.0
    max_audio_seconds = 300.0
    # trained on raw prompts (``Question: ...\nAnswer:``), not through a chat template: no chat-template warning
    raw_prompts = True

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        model = MiniLSLMForConditionalGeneration.from_pretrained(path, dtype=dtype, **load)
        tokenizer = AutoTokenizer.from_pretrained(path)
        processor = MiniProcessor(tokenizer, WhisperFeatureExtractor.from_pretrained(path))
        backend = cls(model, tokenizer, processor)
        processor.count_tokens = lambda arrays: [int(e.shape[0]) for e in backend.encode_audio(arrays)]
        return backend

    @property
    def audio_token_id(self) -> int:
        return self.model.config.audio_token_id

    @property
    def language_model(self):
        return self.model.language_model

    def num_audio_tokens(self, num_samples: int) -> int:
        """Length-based count: exact for the MLP adapter, an upper bound for the CTC adapter
        (``content_dependent_audio_tokens``: the real count is the encoded length)."""
        return speech_tokens_for(num_samples)

    @torch.no_grad()
    def encode_audio(self, arrays):
        feats, mask = self.mel_features(arrays)
        return self.model.get_audio_features(feats.to(self.model.device), mask)
