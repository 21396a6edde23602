"""Owns hidden-state capture: the recorder (one forward pass -> records) and the on-disk store."""
