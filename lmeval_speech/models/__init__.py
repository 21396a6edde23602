"""Owns the model side: the ``lslm`` class, the request planner, chat rendering, and one backend per family."""
