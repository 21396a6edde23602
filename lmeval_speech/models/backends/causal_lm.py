"""Any text-only ``AutoModelForCausalLM``: the text twin of a task, and parity with lm-eval's ``hf`` model."""

from __future__ import annotations

import torch

from .base import Backend


def final_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What a family's own ``forward`` does to ``lm_head``'s output (transformers 5): Granite divides by
    ``logits_scaling``, HyperCLOVA X multiplies by it, Cohere multiplies by ``logit_scale``, Falcon-H1 by
    ``lm_head_multiplier``, Gemma 2/3 soft-cap at ``final_logit_softcapping``. A family not listed here
    that transforms its logits, or its embeddings (Falcon-H1's ``embedding_multiplier``, which the
    scoring path does not apply: real Falcon-H1 checkpoints stop there), is caught by
    :meth:`CausalLMBackend.check_logits` at load."""
    model_type = getattr(config, "model_type", "") or ""
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    elif model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None):
        logits = logits * config.logits_scaling
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if model_type.startswith("falcon_h1") and getattr(config, "lm_head_multiplier", None):
        logits = logits * config.lm_head_multiplier
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class CausalLMBackend(Backend):
    """Token embeddings, decoder and LM head of the base class, plus the family's final logit transform."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return final_logits(self.language_model.config, super().logits(hidden))

    @torch.no_grad()
    def check_logits(self, text: str = "The capital of France is Paris.") -> None:
        """The decoder + ``logits`` path lslm scores with must give the model's own ``forward`` logits;
        a family whose forward transforms them in a way :func:`final_logits` does not know stops the
        run here (its log-likelihoods would be silently off by that transform)."""
        lm = self.language_model
        device = next(lm.parameters()).device
        ids = torch.tensor([self.tokenizer.encode(text)[:16] or [0, 1, 2]], device=device)
        mask = torch.ones_like(ids)
        own = lm(input_ids=ids, attention_mask=mask).logits.float()
        ours = self.logits(self.run_decoder(self.embed_tokens(ids), mask, ids).last_hidden).float()
        tol = 1e-3 if next(lm.parameters()).dtype == torch.float32 else 1e-2  # same kernels on both paths
        diff = float((own.log_softmax(-1) - ours.log_softmax(-1)).abs().max())
        if diff > tol:
            raise ValueError(f"lslm's scoring path does not reproduce {type(lm).__name__}'s own logits (max |d log p| "
                             f"= {diff:.3g}): its forward transforms its embeddings or its LM head's output in a way "
                             "lslm does not know (lmeval_speech.models.backends.causal_lm.final_logits lists the "
                             "ones it does); its log-likelihoods would be wrong")
