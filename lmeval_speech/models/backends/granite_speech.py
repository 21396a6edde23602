"""Granite Speech (``GraniteSpeechForConditionalGeneration``): Conformer CTC encoder, windowed Q-Former projector, Granite LLM.

What is specific to this family:

* Features are 80-bin log-mels stacked two frames at a time (160 values per encoder frame), with
  no fixed window: the clip is encoded at its own length, and every 15 encoder frames become 3
  audio tokens (Q-Former queries). Clips are encoded one at a time, as the processor does for a
  one-audio prompt: padding a batch would change the encoder's block attention and the mel scaling.
  The encoder has no window limit and neither has the processor: clips up to 600 s are passed whole.
* ``GraniteSpeechFeatureExtractor`` needs torchaudio. Without it, ``granite_log_mel`` computes the
  same features with torch alone, op for op as torchaudio's ``MelSpectrogram`` defaults (periodic
  Hann window, centred reflect-padded STFT, power 2, HTK mel filters without norm) followed by the
  extractor's own log/scale/stack steps.
* The Granite LLM scales embeddings by ``embedding_multiplier`` inside its decoder (speech
  embeddings included, as in the model's forward) and was trained with logits divided by
  ``logits_scaling``. ``logits()`` divides, as ``GraniteForCausalLM`` does and as this model's
  forward did through transformers 4.x; transformers 5's ``GraniteSpeechForConditionalGeneration``
  applies ``lm_head`` alone (log-probabilities ``logits_scaling`` times too sharp; argmax unchanged).
* The audio placeholder id may lie outside the embedding table; like the model, it is embedded as 0.
* Released checkpoints carry a LoRA adapter for audio inputs only (the model card: do not use it for
  text). It is loaded by transformers through ``peft`` (the ``[granite]`` extra; a checkpoint that
  declares an adapter which is not loaded is an error). ``set_modality`` switches every LoRA layer on
  for a batch with audio and off for a text-only batch, through peft's layer API
  (``BaseTunerLayer.enable_adapters``), which works with the peft releases that transformers 5's
  model-level ``disable_adapters()`` refuses.
"""

from __future__ import annotations

import logging
import math

import torch

from .base import ComposedSpeechBackend

log = logging.getLogger(__name__)


def _htk_mel_filters(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """``torchaudio.functional.melscale_fbanks(n_freqs, 0, sample_rate // 2, n_mels, sample_rate)`` (HTK,
    no norm), from ``transformers.audio_utils`` (equal to torchaudio's to 1e-5)."""
    from transformers.audio_utils import mel_filter_bank

    return torch.from_numpy(mel_filter_bank(
        num_frequency_bins=n_freqs, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=float(sample_rate // 2),
        sampling_rate=sample_rate, norm=None, mel_scale="htk")).float()


def granite_log_mel(audio, *, sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=80):
    """``GraniteSpeechFeatureExtractor`` input features ``[1, frames // 2, 2 * n_mels]`` for one clip, without torchaudio."""
    audio = torch.as_tensor(audio, dtype=torch.float32).reshape(1, -1)
    spec = torch.stft(audio, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                      window=torch.hann_window(win_length), center=True, pad_mode="reflect",
                      normalized=False, onesided=True, return_complex=True).abs().pow(2.0)
    mel = torch.matmul(spec.transpose(-1, -2), _htk_mel_filters(n_fft // 2 + 1, n_mels, sample_rate)).transpose(-1, -2)
    logmel = mel.transpose(-1, -2).clip_(min=1e-10).log10_()
    logmel = torch.maximum(logmel, logmel.amax(dim=(-2, -1), keepdim=True) - 8.0).div_(4).add_(1)
    if logmel.shape[1] % 2 == 1:
        logmel = logmel[:, :-1]
    return logmel.reshape(1, -1, 2 * logmel.shape[-1])


class _TorchGraniteFeatures:
    """The extractor's settings read as ``GraniteSpeechFeatureExtractor.__init__`` reads them."""

    def __init__(self, path, **kw):
        from transformers.feature_extraction_utils import FeatureExtractionMixin

        cfg, _ = FeatureExtractionMixin.get_feature_extractor_dict(path, **kw)
        self.kwargs = dict(sample_rate=cfg.get("sampling_rate", 16000), n_fft=cfg.get("n_fft", 512),
                           win_length=cfg.get("win_length", 400), hop_length=cfg.get("hop_length", 160),
                           n_mels=cfg.get("n_mels", 80))
        self.window = cfg.get("projector_window_size", 15)
        self.downsample = cfg.get("projector_downsample_rate", 5)

    def features(self, array):
        return granite_log_mel(array, **self.kwargs)

    def num_tokens(self, num_samples):  # GraniteSpeechFeatureExtractor._get_num_audio_features
        encoder_frames = (num_samples // self.kwargs["hop_length"] + 1) // 2
        return math.ceil(encoder_frames / self.window) * (self.window // self.downsample)


class _RealGraniteFeatures:
    def __init__(self, path, **kw):
        from transformers import GraniteSpeechFeatureExtractor

        self.fe = GraniteSpeechFeatureExtractor.from_pretrained(path, **kw)

    def features(self, array):
        return self.fe(torch.as_tensor(array, dtype=torch.float32), device="cpu")["input_features"]

    def num_tokens(self, num_samples):
        return self.fe._get_num_audio_features([num_samples])[0]


class GraniteSpeechBackend(ComposedSpeechBackend):
    audio_placeholder = "<|audio|>"
    # the granite-speech-3.3 cards' system turn, date included: the Granite template's own default writes
    # the day of the run ("Today's Date: " + strftime_now), so a rerun on another day had another prompt
    card_system_prompt = ("Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
                          "You are Granite, developed by IBM. You are a helpful AI assistant")
    max_audio_seconds = 600.0
    modality_dependent = True
    #: the transformers class this family loads (Granite Speech Plus: the same backend, another projector input)
    model_class: str = "GraniteSpeechForConditionalGeneration"

    def generate(self, **kwargs):
        # GraniteSpeechForConditionalGeneration.generate switches the adapter off when it gets no
        # input_features (always, here: speech arrives as inputs_embeds) through the model-level API
        # that needs peft >= 0.22; set_modality has set the state for this batch, so go around it.
        return super(type(self.model), self.model).generate(**kwargs)

    def set_modality(self, has_audio: bool) -> None:
        if not getattr(self.model, "_hf_peft_config_loaded", False):
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(has_audio)

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        import transformers
        from transformers import AutoTokenizer
        from transformers.utils import is_torchaudio_available

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype, **kw, **load)
        if model.config.has_lora_adapter and not getattr(model, "_hf_peft_config_loaded", False):
            import importlib.util

            why = ("peft is not installed: pip install 'lmeval-speech[granite]'" if importlib.util.find_spec("peft") is None
                   else "the checkpoint has no adapter_config.json / adapter_model.safetensors")
            raise ImportError(f"{path} declares a speech LoRA adapter (has_lora_adapter) that is not loaded ({why}); "
                              "its speech scores would be wrong")
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        features = (_RealGraniteFeatures if is_torchaudio_available() else _TorchGraniteFeatures)(path, revision=revision)
        return cls(model, tokenizer, features)

    def embed_tokens(self, input_ids):
        return self.model.get_input_embeddings()(input_ids.masked_fill(input_ids == self.audio_token_id, 0))

    def logits(self, hidden):
        return self.model.lm_head(hidden) / self.model.config.text_config.logits_scaling

    def num_audio_tokens(self, num_samples: int) -> int:
        return self.processor.num_tokens(num_samples)

    @torch.no_grad()
    def encode_audio(self, arrays):
        out = []
        for a in arrays:
            feats = self.processor.features(a).to(self.model.device, self.model.dtype)
            out.append(self.model.get_audio_features(feats).pooler_output[0])
        return out


class GraniteSpeechPlusBackend(GraniteSpeechBackend):
    """Granite Speech Plus (``GraniteSpeechPlusForConditionalGeneration``): Granite Speech whose projector reads the
    encoder's last hidden states concatenated with some intermediate ones (``cat_hidden_layers``); the features, the
    token count, the speech LoRA and the Granite LLM's head are Granite Speech's, so is everything here."""

    model_class = "GraniteSpeechPlusForConditionalGeneration"
