"""Test-only fault injection, installed by putting this folder on PYTHONPATH: with
``LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES=N`` the process SIGKILLs itself after N scored batches,
through ``LSLM.after_batch_hooks`` (the package itself reads no such variable)."""

import os

if os.environ.get("LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES"):
    import signal

    from lmeval_speech.models.lslm import LSLM

    _left = [int(os.environ["LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES"])]

    def _kill_after(lm, done):
        _left[0] -= 1
        if _left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    LSLM.after_batch_hooks.append(_kill_after)
