"""Make the plain ``lm_eval`` command see the ``lslm`` model and this package's tasks.

lm-eval 0.4.13 reads no plugin entry points, so ``lmeval_speech.pth`` imports this module at
interpreter start. It must stay cheap: it imports nothing heavy, it only puts a finder on
``sys.meta_path`` that waits for two lm-eval modules to be *executed* and then patches them:

* ``lm_eval.api.registry``: import ``lm_eval.models`` first (registering before it would leave the
  registry non-empty, so lm-eval would never import its built-ins), then register ``lslm`` lazily.
* ``lm_eval.tasks.manager``: every ``TaskManager`` also indexes ``lmeval_speech/tasks``, so
  ``--include_path`` stays free for the user's own path.

Set ``LMEVAL_SPEECH_NO_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_TARGETS = ("lm_eval.api.registry", "lm_eval.tasks.manager")


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, name: str):
        self._wrapped = wrapped
        self._name = name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        from lmeval_speech import registration

        if self._name == "lm_eval.api.registry":
            registration.register_model_lazily(module)
        else:
            registration.patch_task_manager(module)

    def __getattr__(self, item):  # get_code, get_source, ... for tools that ask
        return getattr(self._wrapped, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, fullname)
        return spec


def install() -> None:
    if os.environ.get("LMEVAL_SPEECH_NO_AUTOLOAD"):
        return
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PostImportFinder())
    # Already imported (e.g. the .pth ran late): patch in place.
    if "lm_eval.api.registry" in sys.modules or "lm_eval.tasks.manager" in sys.modules:
        from lmeval_speech import registration

        if "lm_eval.api.registry" in sys.modules:
            registration.register_model_lazily(sys.modules["lm_eval.api.registry"])
        if "lm_eval.tasks.manager" in sys.modules:
            registration.patch_task_manager(sys.modules["lm_eval.tasks.manager"])


install()
