"""Owns interventions: the paper's edits (ops) and the hooks that apply them during a forward pass."""
