"""Paired text/speech task YAMLs for lm-eval (indexed by every TaskManager; see README.md here)."""
