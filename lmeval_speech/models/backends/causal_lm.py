"""Any text-only ``AutoModelForCausalLM``: the text twin of a task, and parity with lm-eval's ``hf`` model."""

from .base import Backend


class CausalLMBackend(Backend):
    model_types = ()  # fallback for configs that AutoModelForCausalLM knows
