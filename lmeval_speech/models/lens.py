"""Owns the logit lens on captured states: a hidden state read through the decoder's final norm and LM
head (``nostalgebraist``'s logit lens), as ranks of given token ids.

The last hidden-state index is the final norm's output already (``lmeval_speech.hooks``), so only the
head is applied there: at that index the lens *is* the model's own next-token logits. Ranks are
invariant to the monotone maps some families apply after the head (Gemma's soft-capping, Granite's
``logits_scaling``), so those are not applied.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def lens_ranks(backend, n_layers: int, states: torch.Tensor, indices: list[int],
               token_ids: list[int]) -> tuple[np.ndarray, int]:
    """``states`` [L, P, D] at hidden-state ``indices``; returns (int32 [L, P, Q], vocabulary size): the
    rank (0 = the top logit; ties share the better rank) of each of ``token_ids`` (Q) in the lens logits
    at each position."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    norm = backend.final_norm
    out = []
    for h, index in zip(states, indices):
        x = h if index == n_layers or norm is None else norm(h)
        logits = backend.logits(x).float()  # [P, V]
        chosen = logits[:, ids.to(logits.device)]  # [P, Q]
        # rank = how many logits beat the token's: a comparison per (position, token), in chunks of tokens
        # ([P, 8, V] booleans at a time); 5-10x faster than sorting each row of the vocabulary
        greater = torch.cat([(logits[:, None, :] > chosen[:, q:q + 8, None]).sum(-1)
                             for q in range(0, chosen.shape[1], 8)], dim=1)
        out.append(greater.to(torch.int32).cpu())
    return torch.stack(out).numpy(), int(logits.shape[-1])
