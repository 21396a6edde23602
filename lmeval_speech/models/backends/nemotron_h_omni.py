"""Nemotron-H Omni (``NemotronH_Omni_Reasoning_V3``, ``model_type: nemotron_h_omni``), audio path: Parakeet (Fast
Conformer) sound encoder, 2-layer ReLU² projector (``embed_audio``), Nemotron-H LLM (a hybrid of Mamba-2, attention
and MLP/MoE blocks).

What is specific to this family:

* The processor is ``NemotronH_Omni_Reasoning_V3Processor``, loaded whole where torchvision imports and as its audio
  half otherwise (``processor_half``: the same class without its image and video processors). Its ``__call__`` writes
  one audio as ``<so_start>`` + ``<so_embedding>`` x n + ``<so_end>``; n is its own ``_estimate_audio_num_embeddings``
  (mel frames ``1 + L // hop``, then the encoder's stride-2 stages), which ``num_audio_tokens`` calls; its chat
  template's audio token is the processor's ``audio_token`` (``chat_audio_token``). Clips are featurized by the
  processor's own ``_process_audio`` and encoded one at a time, as the processor does for a one-audio prompt; the
  model's ``get_audio_features`` keeps each clip's real positions.
* The decoder is ``language_model.model`` (``NemotronHModel``): its final norm is ``norm_f``, its head ``lm_head``.
* **No prefix sharing** (``supports_prefix_cache = False``): a Mamba layer's cache is a recurrent state taken after
  the last token of a pass, not one entry per position, so one cached prefix cannot be cut per row at different
  lengths and extended by each continuation as a key/value cache can (``select_rows`` only copies key/value layers).
  Every sequence runs whole, context + continuation, as the model's own forward runs it. Batches are right-padded:
  the Mamba mixers zero padded positions and are causal, so a row's scores do not depend on its batch (tested).
* Neither the processor nor the encoder sets a length limit; lslm takes a clip up to the encoder's positional range
  (``audio_config.max_position_embeddings`` encoder frames: 400 s for the default config), past it cuts and flags.
"""

from __future__ import annotations

import torch

from .base import Backend, DecoderOutput


class NemotronHOmniBackend(Backend):
    audio_placeholder = "<so_start><so_embedding><so_end>"
    chat_audio_token = "<so_embedding>"
    max_audio_seconds = 400.0
    supports_prefix_cache = False

    def __init__(self, model, tokenizer, processor=None):
        super().__init__(model, tokenizer, processor)
        if processor is not None:  # the processor's names for its audio tokens and its audio settings
            self.chat_audio_token = processor.audio_token
            self.audio_placeholder = processor.audio_start_token + processor.audio_token + processor.audio_end_token
            self.sampling_rate = processor.audio_sampling_rate
            audio = model.config.audio_config
            if audio is not None:
                frames = audio.max_position_embeddings * processor.audio_subsampling_factor
                self.max_audio_seconds = frames * processor.audio_hop_length / self.sampling_rate

    @classmethod
    def from_pretrained(cls, path, *, dtype, revision=None, trust_remote_code=False, **load):
        from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3Processor

        from .processor_half import load_processor

        kw = dict(revision=revision, trust_remote_code=trust_remote_code)
        model = NemotronH_Omni_Reasoning_V3.from_pretrained(path, dtype=dtype, **kw, **load)
        if model.audio_tower is None:
            raise ValueError(f"{path}: its config has no audio_config, so the model has no audio branch")
        processor = load_processor(NemotronH_Omni_Reasoning_V3Processor, path, **kw)
        return cls(model, processor.tokenizer, processor)

    # ---- structure -------------------------------------------------------------------------
    @property
    def audio_token_id(self) -> int:
        return self.model.config.audio_token_id

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def final_norm(self):
        return self.decoder.norm_f

    def run_decoder(self, inputs_embeds, attention_mask, input_ids, output_hidden_states=False,
                    use_cache=False) -> DecoderOutput:
        if use_cache:
            raise NotImplementedError("Nemotron-H runs whole sequences (supports_prefix_cache = False: Mamba state)")
        return super().run_decoder(inputs_embeds, attention_mask, input_ids, output_hidden_states)

    def generate(self, prompt_ids=None, **kwargs):
        """The whole model's ``generate`` from ``inputs_embeds``: the LLM's own (``NemotronHForCausalLM``) refuses
        embeddings (its ``prepare_inputs_for_generation`` does not name them); the multimodal class's forwards them
        to the LLM with the hybrid cache transformers' ``generate`` builds for it."""
        return self.model.generate(**kwargs)

    # ---- audio -----------------------------------------------------------------------------
    def num_audio_tokens(self, num_samples: int) -> int:
        """The count the processor's ``__call__`` writes: ``max(1, _estimate_audio_num_embeddings)``."""
        return max(1, int(self.processor._estimate_audio_num_embeddings(int(num_samples))))

    @torch.no_grad()
    def encode_audio(self, arrays):
        """Per clip: the processor's ``_process_audio`` (its feature extractor call), ``get_audio_features``."""
        out = []
        for a in arrays:
            feats, mask, _ = self.processor._process_audio([a], {"sampling_rate": self.sampling_rate})
            enc = self.model.get_audio_features(feats.to(self.model.device, self.model.dtype),
                                                None if mask is None else mask.to(self.model.device))
            out.append(enc.pooler_output)
        return out
