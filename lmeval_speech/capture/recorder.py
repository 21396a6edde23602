"""Turns one forward pass's hidden states into capture records (pooled always, tokens optionally).

Capture is a reader on the hook protocol (``lmeval_speech.hooks``): on a batch holding a request to
capture, it reads every hidden-state index (``layers``) at each captured row's positions only (never
the whole ``output_hidden_states``), bit-identical to what ``output_hidden_states`` reports. Only
the first choice of each item is captured: in a causal LM the prompt's states do not depend on
the continuation, so the other choices would store the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from lmeval_speech import twins
from lmeval_speech.layers import parse_layers

from .store import CaptureWriter


class HiddenStateCapture:
    def __init__(self, mode: str, root, n_layers: int, layers="auto", token_limit=None, rank=0, identity=None,
                 shard_size: int = 64, conditions: dict | None = None):
        if mode not in {"pooled", "tokens"}:
            raise ValueError(f"capture must be none, pooled or tokens, got {mode!r}")
        self.mode = mode
        self.token_layers = parse_layers(layers, n_layers)
        self.token_limit = token_limit
        self.n_hidden_states = n_layers + 1
        self.writer = CaptureWriter(root, rank=rank, shard_size=shard_size, identity=identity, conditions=conditions, meta={
            "mode": mode, "n_hidden_states": n_layers + 1, "token_layers": self.token_layers, "token_limit": token_limit,
        })
        # a resumed run continues the per-task count of token-level records (capture_limit)
        self._tokens_per_task: dict[str, int] = self.writer.token_counts()

    @property
    def layers(self) -> list[int]:
        """The hidden-state indices read in each pass: all of them (the pooled record has every index)."""
        return list(range(self.n_hidden_states))

    def hook_spec(self):
        from lmeval_speech.hooks import READ, HookSpec

        return HookSpec(READ, tuple(self.layers), "the sequence's speech positions (speech rows) or question span (text rows)")

    def spec(self) -> dict:
        """The capture as the run manifest records it (layers are hidden-state indices, see ``layers``;
        ``hook``: its use of the hook protocol, with each index's site)."""
        return {"mode": self.mode, "dir": str(self.writer.root), "token_layers": self.token_layers,
                "token_limit": self.token_limit, "n_hidden_states": self.n_hidden_states,
                "hook": self.hook_spec().to_dict(self.n_hidden_states - 1)}

    def wants(self, request, input_sha256: str | None = None) -> bool:
        if request is None or getattr(request, "idx", 0) != 0:
            return False
        return not self.writer.has(request.task_name, request.doc_id, input_sha256)

    def add(self, request, has_audio: bool, states: list[torch.Tensor], audio_notes,
            input_sha256: str | None = None, lens=None, lens_ids=None) -> None:
        """``states``: one [P, D] tensor per hidden-state index, at this row's captured positions. With
        token states, ``lens(states [L, P, D], indices, lens_ids)`` gives the logit lens's ranks [L, P, Q]
        of the text twin's question tokens ``lens_ids``, stored as ``lens_ranks`` beside ``lens_ids``."""
        n_positions = int(states[0].shape[0]) if states else 0
        if not n_positions:
            return
        twin = twins.twin_of(request.task_name, has_audio)
        pair, modality = twin.pair, twin.modality
        stacked = torch.stack(states)  # [L+1, P, D]
        tensors = {"pooled": stacked.float().mean(1).cpu().numpy()}
        task = request.task_name
        if self.mode == "tokens" and (self.token_limit is None or self._tokens_per_task.get(task, 0) < self.token_limit):
            tokens = stacked[self.token_layers]
            half = tokens.to(torch.float16)  # half the disk; but beyond float16's range (65504) it is inf:
            keep = half if torch.isfinite(half).all() or not torch.isfinite(tokens).all() else tokens.float()
            tensors["tokens"] = keep.cpu().numpy()  # such an item keeps float32 (large activations are real)
            self._tokens_per_task[task] = self._tokens_per_task.get(task, 0) + 1
            if lens is not None and lens_ids:
                tensors["lens_ranks"], lens_vocab = lens(tokens, self.token_layers, lens_ids)
                tensors["lens_ids"] = np.asarray(lens_ids, dtype=np.int64)
        record = {"task": task, "pair": pair, "modality": modality, "doc_id": request.doc_id,
                  "n_positions": n_positions, "token_layers": self.token_layers if "tokens" in tensors else [],
                  "audio": audio_notes, "input_sha256": input_sha256}
        if "lens_ranks" in tensors:
            record["lens_vocab"] = lens_vocab
        self.writer.add(record, {k: np.asarray(v) for k, v in tensors.items()})

    def flush(self) -> None:
        self.writer.flush()

    def is_flushed(self) -> bool:
        return not self.writer.pending
