"""Turns one forward pass's hidden states into capture records (pooled always, tokens optionally).

The adapter asks for ``output_hidden_states`` only on batches holding a request to capture, and
only the first choice of each item is captured: in a causal LM the prompt's states do not depend on
the continuation, so the other choices would store the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from .positions import pair_and_modality
from .store import CaptureWriter


def parse_layers(spec, n_layers: int) -> list[int]:
    """Hidden-state indices (0 = embeddings, i = output of decoder layer i) for token-level capture."""
    total = n_layers + 1
    if spec in (None, "", "auto"):
        return sorted({round(i * n_layers / 7) for i in range(8)})
    if spec == "all":
        return list(range(total))
    layers = sorted({int(x) % total for x in str(spec).replace(";", ",").split(",") if x.strip()})
    if not layers:
        raise ValueError(f"capture_layers={spec!r} names no layer")
    return layers


class HiddenStateCapture:
    def __init__(self, mode: str, root, n_layers: int, layers="auto", token_limit=None, rank=0, meta=None,
                 shard_size: int = 64):
        if mode not in {"pooled", "tokens"}:
            raise ValueError(f"capture must be none, pooled or tokens, got {mode!r}")
        self.mode = mode
        self.token_layers = parse_layers(layers, n_layers)
        self.token_limit = token_limit
        self._tokens_per_task: dict[str, int] = {}
        self.writer = CaptureWriter(root, rank=rank, shard_size=shard_size, meta={
            **(meta or {}), "mode": mode, "n_hidden_states": n_layers + 1, "token_layers": self.token_layers,
            "token_limit": token_limit,
        })

    def wants(self, request, has_audio: bool) -> bool:
        if request is None or getattr(request, "idx", 0) != 0:
            return False
        return not self.writer.has(request.task_name, request.doc_id)

    def add(self, request, has_audio: bool, states: list[torch.Tensor], positions: list[int], audio_notes) -> None:
        """``states``: one [T, D] tensor per hidden-state index for this row."""
        if not positions:
            return
        pair, modality = pair_and_modality(request.task_name, has_audio)
        idx = torch.tensor(positions, device=states[0].device)
        stacked = torch.stack([h.index_select(0, idx) for h in states])  # [L+1, P, D]
        tensors = {"pooled": stacked.float().mean(1).cpu().numpy()}
        task = request.task_name
        if self.mode == "tokens" and (self.token_limit is None or self._tokens_per_task.get(task, 0) < self.token_limit):
            tensors["tokens"] = stacked[self.token_layers].to(torch.float16).cpu().numpy()
            self._tokens_per_task[task] = self._tokens_per_task.get(task, 0) + 1
        record = {"task": task, "pair": pair, "modality": modality, "doc_id": request.doc_id,
                  "n_positions": len(positions), "token_layers": self.token_layers if "tokens" in tensors else [],
                  "audio": audio_notes}
        self.writer.add(record, {k: np.asarray(v) for k, v in tensors.items()})

    def flush(self) -> None:
        self.writer.flush()

    def is_flushed(self) -> bool:
        return not self.writer.pending
