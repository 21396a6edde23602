"""Voxtral (``VoxtralForConditionalGeneration``): Whisper encoder, frames stacked 4 by 4, 2-layer MLP, Llama/Mistral LLM.

What is specific to this family:

* Fixed-size audio tokens: each clip is zero-padded to a whole number of 30 s windows (as
  ``VoxtralProcessor`` and mistral-common do), the log-mel of the padded clip is cut into
  3000-frame windows, and every window yields exactly ``max_source_positions / 4`` tokens (375),
  however much of it is silence. The encoder takes no mask. Clips up to 30 minutes (the released
  models' documented limit at 32k context) are taken.
* A prompt's audio is ``[BEGIN_AUDIO]`` followed by the ``[AUDIO]`` tokens.
* The released checkpoints' tokenizer is Mistral's Tekken (``MistralCommonBackend``, needs
  ``mistral-common``), which encodes control tokens written in text (``[INST]``, ``[AUDIO]``...)
  as plain text. When the tokenizer does not map the placeholder to ``[AUDIO]``, it is wrapped so
  that control tokens in prompt text (the placeholder, chat-template output) become their ids
  (``_ControlTokenText``). The features come from the checkpoint's ``WhisperFeatureExtractor``
  (loadable without mistral-common), called as ``VoxtralProcessor`` calls it.
"""

from __future__ import annotations

import math
import re

import torch

from .base import ComposedSpeechBackend


class _ControlTokenText:
    """Wraps a tokenizer that encodes control tokens written in text as plain text (Tekken): ``encode``
    puts those tokens in by id and encodes the text between them; everything else is delegated."""

    def __init__(self, tokenizer, control_tokens: dict[str, int]):
        self._tok = tokenizer
        self._ids = control_tokens
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(control_tokens, key=len, reverse=True))) + ")")

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def encode(self, text, add_special_tokens=True, **kwargs):
        ids = []
        for piece in self._split.split(text):
            if piece in self._ids:
                ids.append(self._ids[piece])
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False, **kwargs))
        if add_special_tokens:  # Tekken: [BOS] + ids
            build = getattr(self._tok, "build_inputs_with_special_tokens", None)
            ids = build(ids) if build else self._tok.encode("", add_special_tokens=True, **kwargs) + ids
        return ids


def _require_mistral_common(path, revision=None) -> None:
    """A checkpoint with ``tekken.json`` is tokenized as its authors do only through mistral-common."""
    import importlib.util
    from pathlib import Path

    local = Path(path)
    has_tekken = (local / "tekken.json").is_file() if local.is_dir() else True  # hub Voxtral ships tekken.json
    if has_tekken and importlib.util.find_spec("mistral_common") is None:
        raise ImportError(
            f"{path} is a Voxtral checkpoint with a Tekken tokenizer (tekken.json): without mistral-common, "
            "transformers' conversion adds no BOS and changes the prompt. Install the extra: "
            "pip install 'lmeval-speech[voxtral]' (mistral-common needs numpy<2.4 on Python <= 3.12)")


class VoxtralBackend(ComposedSpeechBackend):
    """Mistral's tokenizer starts every prompt with ``<s>``; transformers' conversion of ``tekken.json``
    adds none, so BOS is added here (``requires_bos``) and a Tekken checkpoint needs mistral-common."""

    audio_placeholder = "[BEGIN_AUDIO][AUDIO]"
    max_audio_seconds = 1800.0
    requires_bos = True

    def __init__(self, model, tokenizer, processor=None):
        ids = tokenizer.encode(self.audio_placeholder, add_special_tokens=False)
        if ids.count(model.config.audio_token_id) != 1:  # Tekken: control tokens in text stay text
            names = {*tokenizer.all_special_tokens, "[BEGIN_AUDIO]"}
            control = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
            tokenizer = _ControlTokenText(tokenizer, {**control, "[AUDIO]": model.config.audio_token_id})
        super().__init__(model, tokenizer, processor)

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from types import SimpleNamespace

        from transformers import AutoTokenizer, VoxtralForConditionalGeneration, WhisperFeatureExtractor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        _require_mistral_common(path, revision)
        model = VoxtralForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw, **load)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        processor = SimpleNamespace(tokenizer=tokenizer, feature_extractor=WhisperFeatureExtractor.from_pretrained(path, **kw))
        return cls(model, tokenizer, processor)


    # ---- audio: whole 30 s windows, a fixed number of tokens each -------------------------
    @property
    def _window(self) -> tuple[int, int]:
        """(samples per window, audio tokens per window)."""
        enc = self.model.config.audio_config
        stack = enc.intermediate_size // enc.hidden_size  # encoder frames per audio token (4)
        return self.processor.feature_extractor.n_samples, enc.max_source_positions // stack

    def num_audio_tokens(self, num_samples: int) -> int:
        samples, tokens = self._window
        return tokens * max(1, math.ceil(num_samples / samples))

    @torch.no_grad()
    def encode_audio(self, arrays):
        """``VoxtralProcessor._retrieve_input_features`` per clip, then ``get_audio_features`` on all windows."""
        fe = self.processor.feature_extractor
        samples, tokens = self._window
        windows, counts = [], []
        for a in arrays:  # one clip at a time: each is padded to its own multiple of 30 s
            feats = fe(a, sampling_rate=self.sampling_rate, padding=True, truncation=False,
                       pad_to_multiple_of=samples, return_tensors="pt")["input_features"]
            feats = feats.reshape(fe.feature_size, -1, fe.nb_max_frames).transpose(0, 1)
            windows.append(feats)
            counts.append(feats.shape[0] * tokens)
        feats = torch.cat(windows).to(self.model.device, self.model.model.audio_tower.conv1.weight.dtype)
        return list(self.model.get_audio_features(feats).pooler_output.split(counts))
