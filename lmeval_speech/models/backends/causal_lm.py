"""Any text-only ``AutoModelForCausalLM``: the text twin of a task, and parity with lm-eval's ``hf`` model."""

from .base import Backend


class CausalLMBackend(Backend):
    """Everything is the base class: token embeddings, decoder, LM head, no audio."""
