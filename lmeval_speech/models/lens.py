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


#: ranks are exact up to here; a token outside the top RANK_CAP logits is stored as RANK_CAP
RANK_CAP = 1000
#: positions (of all hidden-state indices together) per LM-head product: large enough to read the head once
#: per many rows, small enough for the [rows x vocabulary] logits (512 x 49k float32: 100 MB)
LENS_ROWS = 512


@torch.no_grad()
def lens_ranks(backend, n_layers: int, states: torch.Tensor, indices: list[int],
               token_ids: list[int]) -> tuple[np.ndarray, int]:
    """``states`` [L, P, D] at hidden-state ``indices``; returns (int32 [L, P, Q], vocabulary size): the
    rank (0 = the top logit; ties share the better rank; capped at ``RANK_CAP``) of each of ``token_ids`` (Q)
    in the lens logits at each position."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    norm = backend.final_norm
    n_idx, n_pos = states.shape[0], states.shape[1]
    # every index's states through the norm (not the last index: already normed), then the head in chunks of
    # rows over all indices together: one read of the [vocabulary x hidden] head per chunk, not one per index
    x = torch.cat([h if index == n_layers or norm is None else norm(h) for h, index in zip(states, indices)])
    out, vocab = [], 0
    for chunk in x.split(LENS_ROWS) or (x,):
        logits = backend.logits(chunk).float()  # [rows, V]
        vocab = logits.shape[-1]
        chosen = logits[:, ids.to(logits.device)]  # [rows, Q]
        # rank = how many logits beat the token's, counted among the row's top RANK_CAP only (a partial
        # selection, not a sort of the vocabulary): exact below the cap, RANK_CAP for a token outside it
        top = logits.topk(min(RANK_CAP, vocab), dim=-1).values  # [rows, K], descending
        out.append((top[:, None, :] > chosen[:, :, None]).sum(-1).to(torch.int32).cpu())
    return torch.cat(out).reshape(n_idx, n_pos, len(ids)).numpy(), int(vocab)
