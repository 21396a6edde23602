"""Owns ``lslm``'s devices and data parallel: the device choice, and rank / world size / gather / barrier under
``accelerate launch -m lm_eval`` (as lm-eval's ``hf`` model), as a mixin of ``LSLM``."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("lmeval_speech.models.lslm")


class DataParallel:
    @staticmethod
    def _pick_device(device) -> torch.device:
        """``auto`` picks CUDA when present; lm-eval's CLI default ``cuda`` falls back to CPU with a warning."""
        if device in (None, "", "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            log.warning("device=%s requested but CUDA is not available: running on CPU", device)
            return torch.device("cpu")
        return dev

    def _init_data_parallel(self):
        """Under ``accelerate launch -m lm_eval`` (as lm-eval's ``hf`` model): rank and world size."""
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from accelerate import Accelerator

        acc = Accelerator(cpu=not torch.cuda.is_available())  # gloo across CPU processes
        self._rank, self._world_size = acc.process_index, acc.num_processes
        return acc

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor.to(self.device))

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=out, dst=dst)
        return out

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

