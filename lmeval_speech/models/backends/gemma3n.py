"""Gemma 3n (``Gemma3nForConditionalGeneration``), audio path only: USM Conformer encoder, multimodal embedder,
Gemma 3n LLM (AltUp streams, per-layer token embeddings, final logit soft-capping).

What is specific to this family:

* Fixed-size audio: ``Gemma3nProcessor`` writes every audio as ``\\n\\n<start_of_audio>`` + 188
  ``<audio_soft_token>`` + ``<end_of_audio>\\n\\n`` (``audio_soft_tokens_per_image``), whatever its length;
  the encoder gives at most that many soft tokens, and the model fills the rest (and encoder positions
  that are padding) with the embedding of the last audio-vocabulary token. Clips are encoded one at a
  time, as the processor does for a one-audio prompt (the encoder's output length follows the batch's
  longest clip). ``Gemma3nAudioFeatureExtractor`` cuts audio at 30 s (``max_length=480000``): past that
  the planner cuts at the same point and flags the item (``audio_truncated``).
* Token embeddings are the model's own: ids in the vision and audio vocabularies (``<end_of_audio>``,
  the placeholders) are embedded by ``embed_vision`` / ``embed_audio``; the decoder also takes
  *per-layer inputs* looked up from the token ids (zero for ids outside its table, e.g. audio), so
  ``run_decoder`` computes them from the ids, as the model's forward does.
* The decoder's layers carry ``altup_num_inputs`` streams (``[streams, B, T, D]``); the hidden state of
  a layer, for capture and interventions, is its active stream (``altup_active_idx``;
  ``layer_output_stream``), the one the embeddings enter as.
* Logits are soft-capped (``final_logit_softcapping``), as the model's head does.
* Released checkpoints' vision tower is a ``timm`` model (which needs torchvision); it is not built here
  (audio path only): ``from_pretrained`` puts an empty module in its place and its weights are skipped.
* Generation passes the prompt's per-layer inputs for the prefill step (``generate`` with ``prompt_ids``);
  later steps get them from the generated ids inside the model.
"""

from __future__ import annotations

import contextlib

import torch

from .base import ComposedSpeechBackend, DecoderOutput


@contextlib.contextmanager
def without_vision_tower():
    """Build ``Gemma3nModel`` with an empty module for its (timm) vision tower; every other part is the real one."""
    from transformers.models.gemma3n import modeling_gemma3n

    real = modeling_gemma3n.AutoModel

    class _AudioOnly:
        @staticmethod
        def from_config(config, **kwargs):
            if getattr(config, "model_type", None) == "gemma3n_vision":
                return torch.nn.Module()
            return real.from_config(config, **kwargs)

    modeling_gemma3n.AutoModel = _AudioOnly
    try:
        yield
    finally:
        modeling_gemma3n.AutoModel = real


class Gemma3nBackend(ComposedSpeechBackend):
    audio_placeholder = "\n\n<start_of_audio><audio_soft_token><end_of_audio>\n\n"
    #: what the processor's chat template writes for one audio (the processor expands it to the above)
    chat_audio_token = "<audio_soft_token>"
    max_audio_seconds = 30.0
    generate_needs_ids = True
    # its decoder needs per-layer inputs from the token ids and shares key/value caches across layers:
    # not tested with prefix sharing, so every sequence runs whole
    supports_prefix_cache = False

    @property
    def final_norm(self):
        """None: Gemma 3n's ``output_hidden_states`` end with the last layer's output (its active AltUp
        stream), not the final norm's, so the last hidden-state index reads and edits that."""
        return None

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        boa, audio, eoa = (getattr(tokenizer, n, None) for n in ("boa_token", "audio_token", "eoa_token"))
        if boa and audio and eoa:  # the tokenizer's own names for the audio tokens (Gemma3nProcessor reads them)
            self.chat_audio_token = audio
            self.audio_placeholder = f"\n\n{boa}{audio}{eoa}\n\n"
        fe = getattr(processor, "feature_extractor", None)
        self.sampling_rate = getattr(fe, "sampling_rate", self.sampling_rate)

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import AutoProcessor, Gemma3nForConditionalGeneration

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        with without_vision_tower():
            model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw, **load)
        processor = AutoProcessor.from_pretrained(path, **kw)
        return cls(model, processor.tokenizer, processor)

    # ---- structure -------------------------------------------------------------------------
    @property
    def layer_output_stream(self) -> int:
        return self.model.config.text_config.altup_active_idx

    def embed_tokens(self, input_ids):
        """``Gemma3nModel.forward``'s embedding of ``input_ids`` (text table, then vision and audio vocabularies)."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids)
        for embedder, upper in ((inner.embed_vision, inner.embed_audio.vocab_offset), (inner.embed_audio, None)):
            mask = input_ids >= embedder.vocab_offset
            if upper is not None:
                mask &= input_ids < upper
            if mask.any():
                dummy = embedder.vocab_offset + embedder.vocab_size - 1
                hard = embedder(input_ids=torch.where(mask, input_ids, dummy)).to(embeds.dtype)
                embeds = torch.where(mask[..., None], hard, embeds)
        return embeds

    def run_decoder(self, inputs_embeds, attention_mask, input_ids, output_hidden_states=False,
                    use_cache=False) -> DecoderOutput:
        if use_cache:
            raise NotImplementedError("Gemma 3n runs whole sequences (supports_prefix_cache = False)")
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            per_layer_inputs=self.decoder.get_per_layer_inputs(input_ids),
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        hidden = None
        if output_hidden_states:
            s = self.layer_output_stream
            hidden = tuple(h[s] if h.dim() == 4 else h for h in out.hidden_states)
        return DecoderOutput(out.last_hidden_state, hidden)

    def logits(self, hidden):
        logits = self.model.lm_head(hidden)
        cap = self.model.config.text_config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def generate(self, prompt_ids=None, **kwargs):
        """The model's ``generate`` from ``inputs_embeds``, with the prompt's per-layer inputs on the prefill step."""
        text = self.decoder
        prompt_len = kwargs["inputs_embeds"].shape[1]

        def prefill(module, args, kw):
            embeds = kw.get("inputs_embeds")
            if prompt_ids is not None and kw.get("per_layer_inputs") is None and embeds is not None \
                    and embeds.shape[1] == prompt_len:
                kw["per_layer_inputs"] = text.get_per_layer_inputs(prompt_ids.to(embeds.device))
            return args, kw

        handle = text.register_forward_pre_hook(prefill, with_kwargs=True)
        try:
            return self.model.generate(**kwargs)
        finally:
            handle.remove()

    # ---- audio -----------------------------------------------------------------------------
    def num_audio_tokens(self, num_samples: int) -> int:
        return int(self.model.config.audio_soft_tokens_per_image)

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Per clip: the feature extractor as the processor calls it, ``get_audio_features``, then the
        model's padding of encoder padding positions and of the rest of the fixed-size slot."""
        fe = self.processor.feature_extractor
        inner = self.model.model
        n = self.num_audio_tokens(0)
        pad = inner.embed_audio(input_ids=torch.tensor([[inner.vocab_size - 1]], device=self.model.device))
        out = []
        for a in arrays:
            feats = fe([a], sampling_rate=self.sampling_rate, return_tensors="pt")
            x = feats["input_features"].to(self.model.device, self.model.dtype)
            valid = feats["input_features_mask"].to(self.model.device)
            enc = inner.get_audio_features(x, ~valid)
            emb = torch.where(enc.audio_mel_mask[..., None], pad.to(enc.pooler_output.dtype), enc.pooler_output)[0]
            out.append(torch.cat([emb, pad[0].expand(n - emb.shape[0], -1).to(emb.dtype)]))
        return out
