"""Gemma 4 (``Gemma4ForConditionalGeneration``), audio path: Conformer audio tower (two stride-2 convolutions, 40 ms a
token), multimodal embedder, Gemma 4 LLM (per-layer token embeddings, shared key/value layers, soft-capped logits).

What is specific to this family:

* The processor is ``Gemma4Processor``, loaded whole where torchvision imports and as its audio half otherwise
  (``processor_half``: the same class without its image and video processors). Its ``__call__`` writes one audio as
  ``boa`` + ``audio_token`` x n + ``eoa``, n from the feature extractor's mask (``replace_audio_token``), equal to its
  ``_compute_audio_num_tokens``, which ``num_audio_tokens`` calls; its chat template writes ``audio_token`` once
  (``chat_audio_token``). Clips are featurized and encoded one at a time, as the processor does for a one-audio
  prompt; the encoder's padded positions are dropped as the model's forward drops them.
* ``Gemma4AudioFeatureExtractor`` cuts audio at 30 s (``max_length=480000``, 750 tokens, the processor's
  ``audio_seq_length``): past that the planner cuts at the same point and flags the item (``audio_truncated``).
* Token embeddings are the model's own: every multimodal placeholder id is embedded as the pad token before the speech
  embeddings are scattered over it, and the decoder's *per-layer inputs* are looked up from the ids with those
  placeholders replaced by the pad id, as ``Gemma4Model.forward`` does; the decoder projects them with the embeddings
  (speech included). ``generate`` passes the prompt's per-layer inputs, used on the prefill step.
* Logits are soft-capped (``final_logit_softcapping``), as the model's head does.
* Its last layers reuse earlier layers' keys and values: not tested with prefix sharing, so every sequence runs whole.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ComposedSpeechBackend, DecoderOutput


class Gemma4Backend(ComposedSpeechBackend):
    audio_placeholder = "<|audio><|audio|><audio|>"
    chat_audio_token = "<|audio|>"
    max_audio_seconds = 30.0
    generate_needs_ids = True
    supports_prefix_cache = False

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        boa, audio, eoa = (getattr(processor, n, None) for n in ("boa_token", "audio_token", "eoa_token"))
        if boa and audio and eoa:  # the processor's names for its audio tokens (it reads them from the tokenizer)
            self.chat_audio_token = audio
            self.audio_placeholder = f"{boa}{audio}{eoa}"
        fe = getattr(processor, "feature_extractor", None)
        if fe is not None:
            import inspect

            self.sampling_rate = fe.sampling_rate
            cut = inspect.signature(type(fe).__call__).parameters["max_length"].default  # where its __call__ cuts
            self.max_audio_seconds = cut / fe.sampling_rate

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import Gemma4ForConditionalGeneration, Gemma4Processor

        from .processor_half import load_processor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        model = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw, **load)
        processor = load_processor(Gemma4Processor, path, **kw)
        return cls(model, processor.tokenizer, processor)

    # ---- structure -------------------------------------------------------------------------
    def _text_ids(self, input_ids):
        """``input_ids`` with every multimodal placeholder replaced by the pad id (``Gemma4Model.forward``)."""
        cfg = self.model.config
        placeholders = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id], device=input_ids.device)
        return torch.where(torch.isin(input_ids, placeholders), cfg.text_config.pad_token_id, input_ids)

    def embed_tokens(self, input_ids):
        return self.model.get_input_embeddings()(self._text_ids(input_ids))

    def run_decoder(self, inputs_embeds, attention_mask, input_ids, output_hidden_states=False,
                    use_cache=False) -> DecoderOutput:
        if use_cache:
            raise NotImplementedError("Gemma 4 runs whole sequences (supports_prefix_cache = False)")
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            per_layer_inputs=self._per_layer_inputs(input_ids),
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        return DecoderOutput(out.last_hidden_state, out.hidden_states if output_hidden_states else None)

    def _per_layer_inputs(self, input_ids):
        if not self.model.config.get_text_config().hidden_size_per_layer_input:
            return None
        return self.decoder.get_per_layer_inputs(self._text_ids(input_ids))

    def logits(self, hidden):
        logits = self.model.lm_head(hidden)
        cap = self.model.config.get_text_config().final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def generate(self, prompt_ids=None, **kwargs):
        """The model's ``generate`` from ``inputs_embeds`` with the prompt's per-layer inputs, which its
        ``prepare_inputs_for_generation`` passes on the prefill step only (``Gemma4Model`` would otherwise recover
        the ids from the embeddings, which speech embeddings are not). That method forwards ``inputs_embeds`` through
        ``**kwargs``, and transformers' ``generate`` refuses embeddings unless the method names the argument: it is
        named here by a wrapper for the call, nothing else changes."""
        model = self.model
        own = type(model).prepare_inputs_for_generation

        def named(input_ids, inputs_embeds=None, **kwargs):
            return own(model, input_ids, inputs_embeds=inputs_embeds, **kwargs)

        model.prepare_inputs_for_generation = named
        try:
            return model.generate(per_layer_inputs=self._per_layer_inputs(prompt_ids), **kwargs)
        finally:
            del model.prepare_inputs_for_generation

    # ---- audio -----------------------------------------------------------------------------
    def num_audio_tokens(self, num_samples: int) -> int:
        """``Gemma4Processor._compute_audio_num_tokens``: the extractor's mel framing, the two stride-2 convolutions,
        capped at ``audio_seq_length``."""
        return int(self.processor._compute_audio_num_tokens(np.zeros(int(num_samples)), self.sampling_rate))

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Per clip: the feature extractor as the processor calls it, ``get_audio_features``, its valid positions."""
        fe = self.processor.feature_extractor
        out = []
        for a in arrays:
            feats = fe([a], sampling_rate=self.sampling_rate, return_tensors="pt")
            enc = self.model.model.get_audio_features(feats["input_features"].to(self.model.device, self.model.dtype),
                                                      feats["input_features_mask"].to(self.model.device))
            out.append(enc.pooler_output[0][enc.attention_mask[0].to(enc.pooler_output.device)])
        return out
