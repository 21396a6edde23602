"""The embedded default model: Whisper encoder -> 2-layer FC adapter (5x frame stacking) -> LLM.

This is the seed paper's own LSLM recipe at the smallest size that runs on a laptop CPU:
Whisper tiny.en's encoder (4 layers, d=384), a trained adapter that stacks 5 encoder frames
(50 -> 10 per second) and maps them through Linear-GELU-Linear into SmolLM2-135M-Instruct's
embedding space, and the frozen instruction-tuned LLM.

It is a ``transformers`` ``PreTrainedModel`` with its own registered ``model_type``, so it saves,
loads and runs through the same ``lslm`` code path as Qwen2-Audio (``pretrained=DIR``), and its
``forward(input_ids, input_features, feature_attention_mask, ...)`` mirrors Qwen2-Audio's.

One deliberate difference: the encoder runs on the clip's real length (mel frames rounded up to a
multiple of 10) instead of a zero-padded 30 s window, like whisper.cpp's ``audio_ctx``. On a CPU that
is 3-6x cheaper for typical 5-10 s questions, and the adapter is trained on exactly these outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, WhisperConfig
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

MODEL_TYPE = "lmeval_speech_mini"
FRAMES_PER_TOKEN = 10  # mel frames (10 ms) per speech token: conv stride 2 x stacking 5
MAX_MEL_FRAMES = 3000  # one Whisper window (30 s)


def ctc_collapse(best: list[int], blank: int) -> list[int]:
    """Greedy CTC decoding of per-frame best classes: runs merged, blanks dropped."""
    return [c for j, c in enumerate(best) if c != blank and (j == 0 or c != best[j - 1])]


def mel_frames_for(num_samples: int, hop: int = 160) -> int:
    """Frames WhisperFeatureExtractor marks as real for a clip (capped at one 30 s window)."""
    return min(math.ceil(num_samples / hop), MAX_MEL_FRAMES)


def speech_tokens_for(num_samples: int) -> int:
    return max(1, math.ceil(mel_frames_for(num_samples) / FRAMES_PER_TOKEN))


class MiniLSLMConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"audio_config": WhisperConfig, "text_config": AutoConfig}

    def __init__(self, audio_config=None, text_config=None, stack=5, audio_token_id=0, adapter_type="mlp",
                 ctc_layers=2, ctc_vocab_size=0, ctc_temperature=1.0, ctc_residual=False, **kwargs):
        if isinstance(audio_config, dict):
            audio_config = WhisperConfig(**audio_config)
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.audio_config = audio_config
        self.text_config = text_config
        self.stack = stack
        self.audio_token_id = audio_token_id
        # "mlp": the adapter output is the speech embedding (the first shipped adapter).
        # "ctc": a CTC recognizer over the LLM's own vocabulary; the LLM receives posterior-weighted
        # token embeddings (LegoSLM), blank frames dropped and repeats merged.
        self.adapter_type = adapter_type
        self.ctc_layers = ctc_layers
        self.ctc_vocab_size = ctc_vocab_size
        self.ctc_temperature = ctc_temperature  # posteriors = softmax(logits / T) for the LLM's input
        # a learned correction added to each posterior-weighted embedding, from the adapter's output
        # averaged over the same frames (trained by distillation through the LLM, zero at its start)
        if ctc_residual:  # set only when on: configs (and so model identities) of adapters without it are unchanged
            self.ctc_residual = True
        super().__init__(**kwargs)


class MiniLSLMProjector(nn.Module):
    """Stack ``stack`` consecutive encoder frames, then Linear -> GELU -> Linear into the LLM width."""

    def __init__(self, config: MiniLSLMConfig):
        super().__init__()
        self.stack = config.stack
        d_audio, d_text = config.audio_config.d_model, config.text_config.hidden_size
        self.linear1 = nn.Linear(d_audio * self.stack, d_text)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(d_text, d_text)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [B, T, d_audio] with T % stack == 0
        b, t, d = frames.shape
        stacked = frames.reshape(b, t // self.stack, d * self.stack)
        return self.linear2(self.act(self.linear1(stacked)))


class MiniCTCProjector(nn.Module):
    """Stacked encoder frames -> Linear-GELU -> small Transformer -> Linear: one vector per 100 ms.

    Trained with CTC whose logits are the output's dot products with the LLM's frozen input
    embeddings of a vocabulary subset (``vocab_ids``, the tokens of the training text) plus one
    learned blank logit. :meth:`speech_embeddings` turns the posteriors into what the LLM reads:
    frames whose best class is blank are dropped, runs of the same best token are merged (their
    posteriors averaged), and each remaining position is the posterior-weighted average of the
    token embeddings (LegoSLM, arXiv 2505.11352).
    """

    def __init__(self, config: MiniLSLMConfig):
        super().__init__()
        self.stack = config.stack
        d_audio, d_text = config.audio_config.d_model, config.text_config.hidden_size
        self.linear1 = nn.Linear(d_audio * self.stack, d_text)
        self.act = nn.GELU()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_text, nhead=8, dim_feedforward=2 * d_text, dropout=0.1, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.ctc_layers))
        self.norm = nn.LayerNorm(d_text)
        self.linear2 = nn.Linear(d_text, d_text)
        self.blank = nn.Linear(d_text, 1)
        self.residual = nn.Linear(d_text, d_text) if getattr(config, "ctc_residual", False) else None
        self.register_buffer("vocab_ids", torch.zeros(config.ctc_vocab_size, dtype=torch.long))
        self.temperature = float(getattr(config, "ctc_temperature", 1.0))
        self._vocab_cache: tuple | None = None

    def vocab_embeddings(self, emb_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``emb_weight[vocab_ids]`` in ``dtype``, kept while that weight and ``vocab_ids`` are unchanged
        (same storage and in-place version): gathering the 32k x 576 rows cost more per clip than the
        adapter itself (``benchmarks/estimate_full_run.py``). Not kept when gradients flow into the weight."""
        if torch.is_grad_enabled() and emb_weight.requires_grad:
            return emb_weight[self.vocab_ids].to(dtype)
        key = (emb_weight.data_ptr(), emb_weight._version, emb_weight.dtype, emb_weight.device, dtype,
               self.vocab_ids.data_ptr(), self.vocab_ids._version)
        if self._vocab_cache is None or self._vocab_cache[0] != key:
            self._vocab_cache = (key, emb_weight[self.vocab_ids].to(dtype))
        return self._vocab_cache[1]

    def forward(self, frames: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, d_audio]`` (T % stack == 0) -> ``[B, T / stack, d_text]``; pad_mask True = padding."""
        b, t, d = frames.shape
        x = self.act(self.linear1(frames.reshape(b, t // self.stack, d * self.stack)))
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad_mask)
        return self.linear2(self.norm(x))

    def ctc_logits(self, h: torch.Tensor, emb_weight: torch.Tensor | None = None,
                   vocab_emb: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., V' + 1]`` float logits: dot products with the vocabulary subset's embeddings, blank last.

        ``vocab_emb`` (the subset's rows, e.g. pre-cast to bfloat16 for fast CPU training) replaces
        ``emb_weight[vocab_ids]``; the product is computed in its dtype."""
        if vocab_emb is None:
            vocab_emb = self.vocab_embeddings(emb_weight, h.dtype)
        scores = (h.to(vocab_emb.dtype) @ vocab_emb.T).float()
        return torch.cat([scores, self.blank(h).float()], dim=-1)

    def speech_embeddings(self, h: torch.Tensor, emb_weight: torch.Tensor) -> torch.Tensor:
        """``[T, d]`` adapter output of one clip -> ``[n, d]`` posterior-weighted embeddings (n >= 1)."""
        post = torch.softmax(self.ctc_logits(h, emb_weight).float() / self.temperature, dim=-1)
        best = post.argmax(-1)
        blank = post.shape[-1] - 1
        keep = best != blank
        if not bool(keep.any()):
            keep = torch.zeros_like(keep)
            keep[post[:, blank].argmin()] = True
        idx = keep.nonzero().squeeze(-1)
        # merge runs of the same best token over consecutive kept frames
        new_run = torch.ones_like(idx, dtype=torch.bool)
        new_run[1:] = (best[idx[1:]] != best[idx[:-1]]) | (idx[1:] != idx[:-1] + 1)
        run = torch.cumsum(new_run.long(), 0) - 1
        tok = post[idx, :blank]
        summed = torch.zeros(int(run[-1]) + 1, blank, dtype=tok.dtype, device=tok.device).index_add_(0, run, tok)
        probs = summed / summed.sum(-1, keepdim=True)
        out = probs @ self.vocab_embeddings(emb_weight, torch.float32)
        if self.residual is not None:  # the adapter's output averaged over each position's frames
            hs = torch.zeros(out.shape[0], h.shape[-1], dtype=h.dtype, device=h.device).index_add_(0, run, h[idx])
            counts = torch.bincount(run, minlength=out.shape[0]).to(h.dtype)[:, None]
            out = out + self.residual(hs / counts).float()
        return out.to(emb_weight.dtype)


class MiniLSLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = MiniLSLMConfig
    base_model_prefix = "mini"
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer"]

    def __init__(self, config: MiniLSLMConfig):
        super().__init__(config)
        self.audio_tower = WhisperEncoder(config.audio_config)
        is_ctc = getattr(config, "adapter_type", "mlp") == "ctc"
        self.multi_modal_projector = MiniCTCProjector(config) if is_ctc else MiniLSLMProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def encode_frames(self, input_features: torch.Tensor) -> torch.Tensor:
        """Whisper encoder over a cropped window ``[B, n_mels, T]`` (T a multiple of 10, <= 3000)."""
        tower = self.audio_tower
        x = nn.functional.gelu(tower.conv1(input_features.to(tower.conv1.weight.dtype)))
        x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
        x = x + tower.embed_positions.weight[: x.shape[1]]
        for layer in tower.layers:
            x = layer(x, attention_mask=None)
            x = x[0] if isinstance(x, tuple) else x
        return tower.layer_norm(x)

    def adapter_outputs(self, input_features, feature_attention_mask) -> list[torch.Tensor]:
        """The adapter's output per clip, ``[T_i, hidden]``: each clip encoded on its own length."""
        out = []
        for feats, mask in zip(input_features, feature_attention_mask, strict=True):
            frames = min(int(mask.sum()), feats.shape[-1])
            n_tok = max(1, math.ceil(frames / FRAMES_PER_TOKEN))
            window = feats[:, : n_tok * FRAMES_PER_TOKEN]
            if window.shape[-1] < n_tok * FRAMES_PER_TOKEN:  # pad the last partial token with silence
                window = nn.functional.pad(window, (0, n_tok * FRAMES_PER_TOKEN - window.shape[-1]), value=float(feats.min()))
            out.append(self.multi_modal_projector(self.encode_frames(window[None]))[0])
        return out

    def get_audio_features(self, input_features, feature_attention_mask) -> list[torch.Tensor]:
        """Speech token embeddings per clip, ``[n_i, hidden]``: each clip encoded on its own length."""
        out = self.adapter_outputs(input_features, feature_attention_mask)
        if isinstance(self.multi_modal_projector, MiniCTCProjector):
            emb = self.get_input_embeddings().weight
            out = [self.multi_modal_projector.speech_embeddings(h, emb) for h in out]
        return out

    def transcribe(self, input_features, feature_attention_mask) -> list[list[int]]:
        """Greedy CTC transcript per clip as LLM token ids (CTC adapter only): a diagnostic that
        separates recognition errors from what the posterior-weighted embeddings lose; the LLM
        never reads it."""
        proj = self.multi_modal_projector
        if not isinstance(proj, MiniCTCProjector):
            raise TypeError("only the CTC adapter has a transcript")
        emb = self.get_input_embeddings().weight
        return [proj.vocab_ids[ctc_collapse(proj.ctc_logits(h, emb).argmax(-1).tolist(), proj.vocab_ids.numel())].tolist()
                for h in self.adapter_outputs(input_features, feature_attention_mask)]

    def forward(
        self,
        input_ids=None,
        input_features=None,
        feature_attention_mask=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if input_features is not None and input_ids.shape[1] != 1:
                speech = torch.cat(self.get_audio_features(input_features, feature_attention_mask))
                mask = (input_ids == self.config.audio_token_id).unsqueeze(-1)
                if int(mask.sum()) != speech.shape[0]:
                    raise ValueError(f"{int(mask.sum())} audio tokens in input_ids but {speech.shape[0]} speech embeddings")
                inputs_embeds = inputs_embeds.masked_scatter(mask, speech.to(inputs_embeds.dtype))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


AutoConfig.register(MODEL_TYPE, MiniLSLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniLSLMConfig, MiniLSLMForConditionalGeneration, exist_ok=True)
