"""Registration of the ``lslm`` model and the package's task folder with lm-eval (no torch import)."""

from __future__ import annotations

import functools
from pathlib import Path

MODEL_NAME = "lslm"
MODEL_TARGET = "lmeval_speech.models.lslm:LSLM"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def register_model_lazily(registry_module) -> None:
    """Register ``lslm`` as a lazy placeholder, after lm-eval's own models."""
    import lm_eval.models  # noqa: F401  -- built-ins first, or get_model() would skip them

    reg = registry_module.model_registry
    if MODEL_NAME not in reg:
        reg.register(MODEL_NAME, target=MODEL_TARGET)


def patch_task_manager(manager_module) -> None:
    """Make every TaskManager index ``lmeval_speech/tasks`` besides its own paths."""
    import lm_eval.api.task

    from lmeval_speech import own_tasks

    own_tasks.patch(lm_eval.api.task)  # a user's own tasks are twins too (failed items never scored)
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_lmeval_speech", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, include_path=None, **kwargs):
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        if not any(Path(p).resolve() == TASKS_DIR for p in paths):
            paths.insert(0, str(TASKS_DIR))
        original(self, *args, include_path=paths, **kwargs)

    __init__._lmeval_speech = True
    cls.__init__ = __init__


def register() -> None:
    """Explicit registration for programs that import lm-eval with the start-up hook disabled."""
    import lm_eval.api.registry as registry
    import lm_eval.tasks.manager as manager

    register_model_lazily(registry)
    patch_task_manager(manager)
