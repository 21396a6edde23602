"""Token-level alignment of speech and text hidden states: the Alignment Path Score (APS).

Following Xiang et al. (2025), each text token j is matched to the speech position i*_j that is
most similar to it in a layer, and APS averages those best similarities over text tokens and
layers. The unconstrained argmax path is the paper's definition; the DTW path adds the
monotonic (left-to-right) constraint a real speech/transcript alignment has, and is reduced to one
speech position per text token so both variants give comparable scores.

A *path* here is always ``i_star`` [Tt]: the speech index chosen for each text token.
"""

from __future__ import annotations

import math

import dtw
import numpy as np
from dtw.stepPattern import symmetric2
from scipy import stats
from scipy.spatial.distance import cdist

try:  # dtw-python's C kernel for the accumulated cost (what ``dtw.dtw`` calls); see dtw_path
    from dtw._dtw_utils import _computeCM_wrapper as _computeCM
except ImportError:  # pragma: no cover - another dtw-python layout: dtw.dtw itself is used
    _computeCM = None

MEASURES = ("cosine", "euclidean")
PATHS = ("argmax", "dtw")

_SYM2_P = np.array(symmetric2._get_p(), dtype=np.double)
_SYM2_NROWS = np.array([symmetric2.get_n_rows()], dtype=np.int32)
# step number (1-based, as in dtw-python's direction matrix) -> (di, dj); from symmetric2's own rows
_SYM2_STEPS = {int(q): (int(di), int(dj)) for q, di, dj, _ in symmetric2.mx if di or dj}
_WINDOW = np.ones((0, 0), dtype=np.int32)


def similarity_matrix(speech, text, measure: str = "cosine") -> np.ndarray:
    """A[i, j] = similarity of speech state i [Ts, D] and text state j [Tt, D] -> [Ts, Tt].

    ``euclidean`` gives the *negative* distance, so for both measures larger means closer and
    the argmax/DTW code needs no branch. Zero vectors have cosine 0 with everything.
    """
    s = np.asarray(speech, dtype=np.float64)
    t = np.asarray(text, dtype=np.float64)
    if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"expected speech [Ts, D] and text [Tt, D], got {s.shape} and {t.shape}")
    _check_finite(s, t)
    # A is computed text-major and returned as the transposed (Fortran-order) view, so that the
    # per-text-token reductions (argmax over i) read contiguous memory instead of copying A; the
    # negate/clip run in place for the same reason: a second [Ts, Tt] array costs more than the
    # matmul for long utterances (3-4x slower end to end, see benchmarks/bench_aps.py).
    if measure == "euclidean":
        At = cdist(t, s, "euclidean")
        return np.negative(At, out=At).T
    if measure != "cosine":
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    s_norm = np.linalg.norm(s, axis=1, keepdims=True)
    t_norm = np.linalg.norm(t, axis=1, keepdims=True)
    s_unit = np.divide(s, s_norm, out=np.zeros_like(s), where=s_norm > 0)
    t_unit = np.divide(t, t_norm, out=np.zeros_like(t), where=t_norm > 0)
    At = t_unit @ s_unit.T
    return np.clip(At, -1.0, 1.0, out=At).T


def argmax_path(A) -> np.ndarray:
    """i*_j = argmax_i A[i, j] for each text token j (no monotonic constraint; ties -> lowest i)."""
    return np.argmax(np.asarray(A), axis=0)


def path_scores(A, path) -> np.ndarray:
    """A[i*_j, j] for every text token j."""
    A = np.asarray(A)
    path = np.asarray(path, dtype=np.intp)
    if path.shape != (A.shape[1],):
        raise ValueError(f"path has shape {path.shape}, expected ({A.shape[1]},) = one speech "
                         "index per text token")
    return A[path, np.arange(A.shape[1])]


def monotonicity(path) -> float:
    """Spearman rho between text position j and its speech position i*_j.

    1 means the alignment preserves word order, -1 that it reverses it. Undefined (nan) when
    the path has fewer than 2 tokens or is constant (all text tokens on one speech frame),
    because a rank correlation with a constant has no meaning.
    """
    path = np.asarray(path)
    if path.size < 2 or np.all(path == path[0]):
        return math.nan
    return float(stats.spearmanr(np.arange(path.size), path).statistic)


def dtw_path(A) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic DTW path (i_idx, j_idx) from (0, 0) to (Ts-1, Tt-1) through similarity A.

    The cost is ``A.max() - A`` under dtw-python's default ``symmetric2`` step pattern, where every
    path carries the same total step weight (Ts + Tt - 1), so a constant shift changes no path: this
    is the same path as cost = 1 - cosine or cost = distance, kept non-negative as dtw-python's local
    distances are meant to be. The accumulated cost matrix comes from dtw-python's own C kernel
    (the function ``dtw.dtw`` calls), so the path is ``dtw.dtw``'s, equal index for index (tested);
    only its Python wrapper is skipped: it allocates three full-size arrays per call and backtracks
    with ``list.insert(0, ...)``, which together cost more than the kernel (``bench_aps.py``).
    """
    cost = np.subtract(np.max(A), A, dtype=np.float64, order="C")
    if _computeCM is None or cost.ndim != 2 or cost.size == 0:  # a dtw-python without the kernel
        alignment = dtw.dtw(cost)
        return alignment.index1, alignment.index2
    n, m = cost.shape
    acc = np.empty_like(cost)
    acc.fill(np.nan)
    acc[0, 0] = cost[0, 0]
    out = _computeCM(_ones_int32(n, m), cost, _SYM2_NROWS, _SYM2_P, acc)
    if not np.isfinite(out["costMatrix"][n - 1, m - 1]):
        raise ValueError(f"no DTW path through a {n} x {m} cost matrix (non-finite similarities?)")
    return _backtrack_symmetric2(out["directionMatrix"], n - 1, m - 1)


def _ones_int32(n: int, m: int) -> np.ndarray:
    """dtw-python's window mask for "no window" (all cells allowed), cached for the last shape."""
    global _WINDOW
    if _WINDOW.shape != (n, m):
        _WINDOW = np.ones((n, m), dtype=np.int32)
    return _WINDOW


def _backtrack_symmetric2(direction: np.ndarray, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk dtw-python's direction matrix back from (i, j) to (0, 0); symmetric2 has three one-cell
    steps (1 = diagonal, 2 = along j, 3 = along i), so the path is every visited cell."""
    ii, jj = [i], [j]
    item = direction.item
    while i or j:
        step = item(i, j)
        di, dj = _SYM2_STEPS[step]
        i -= di
        j -= dj
        ii.append(i)
        jj.append(j)
    return np.array(ii[::-1], dtype=np.intp), np.array(jj[::-1], dtype=np.intp)


def per_token_path(A, i_idx, j_idx) -> np.ndarray:
    """Reduce a (DTW) path to one speech index per text token: the best-scoring i aligned to j.

    Makes APS-DTW comparable to the argmax APS (same 1/Tt average). Ties -> lowest i.
    """
    A = np.asarray(A)
    i_idx = np.asarray(i_idx, dtype=np.intp)
    j_idx = np.asarray(j_idx, dtype=np.intp)
    dj, di = np.diff(j_idx), np.diff(i_idx)
    if j_idx.size and dj.min(initial=0) >= 0 and di.min(initial=0) >= 0:
        # a monotonic path (DTW's): each token's cells are one run with i increasing, so the run's
        # first cell holding the run's best score is the lowest i among equal scores; no sort needed
        if j_idx[0] != 0 or j_idx[-1] != A.shape[1] - 1 or dj.max(initial=0) > 1:
            raise ValueError("the path must visit every text token (column) of A")
        scores = A[i_idx, j_idx]
        if np.isnan(scores).any():  # NaN never equals a run's max: the sort below skips it correctly
            return _per_token_sorted(A, i_idx, j_idx)
        starts = np.flatnonzero(dj) + 1
        starts = np.concatenate(([0], starts))
        lengths = np.diff(starts, append=scores.size)
        hits = np.flatnonzero(scores == np.repeat(np.maximum.reduceat(scores, starts), lengths))
        return i_idx[hits[np.searchsorted(hits, starts)]]
    if not np.array_equal(np.unique(j_idx), np.arange(A.shape[1])):
        raise ValueError("the path must visit every text token (column) of A")
    return _per_token_sorted(A, i_idx, j_idx)


def _per_token_sorted(A, i_idx, j_idx) -> np.ndarray:
    order = np.lexsort((i_idx, -A[i_idx, j_idx], j_idx))  # by j, then best score, then lowest i
    first = np.unique(j_idx[order], return_index=True)[1]
    return i_idx[order][first]


def _token_path(A: np.ndarray, path: str) -> np.ndarray:
    if path == "argmax":
        return argmax_path(A)
    if path == "dtw":
        return per_token_path(A, *dtw_path(A))
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def alignment_path_score(layers_speech, layers_text, measure: str = "cosine",
                         path: str = "argmax") -> dict:
    """APS = (1/L) sum_l (1/Tt) sum_j A_l[i*_j, j] over layers' [Ts, D] / [Tt, D] states.

    Returns ``aps``, ``per_layer`` [L], ``monotonicity`` [L] (Spearman rho of each layer's path)
    and ``paths`` (one i_star [Tt] per layer, usable with :func:`critical_tokens`).
    """
    if len(layers_speech) != len(layers_text) or len(layers_speech) == 0:
        raise ValueError(f"need the same, non-zero number of layers, got {len(layers_speech)} "
                         f"speech and {len(layers_text)} text")
    same_shapes = len({np.shape(x) for x in layers_speech}) == 1 and len({np.shape(x) for x in layers_text}) == 1
    if measure == "cosine" and same_shapes and path in PATHS:
        At = _cosine_all_layers(layers_speech, layers_text)  # one batched matmul for every layer
        if path == "argmax":
            return _aps_argmax(At)
        layers = (A_t.T for A_t in At)  # [Ts, Tt] views of the one array
    else:
        layers = (similarity_matrix(speech, text, measure) for speech, text in zip(layers_speech, layers_text))
    per_layer, mono, paths = [], [], []
    for A in layers:
        i_star = _token_path(A, path)
        per_layer.append(path_scores(A, i_star).mean())
        mono.append(_spearman_rows(i_star[None, :])[0])
        paths.append(i_star)
    per_layer = np.asarray(per_layer)
    return {"aps": float(per_layer.mean()), "per_layer": per_layer,
            "monotonicity": np.asarray(mono), "paths": paths}


def _check_finite(speech: np.ndarray, text: np.ndarray) -> None:
    """A NaN or inf state would become a zero unit vector (cosine 0 with everything) and an APS computed
    as if that frame were silent: an error instead (the report leaves such items out and counts them)."""
    for name, x in (("speech", speech), ("text", text)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} hidden states hold {int(np.count_nonzero(~np.isfinite(x)))} non-finite "
                             "values (NaN/inf): no cosine similarity")


def _cosine_all_layers(layers_speech, layers_text) -> np.ndarray:
    """Cosine similarities of every layer at once, text-major: At [L, Tt, Ts] (each text token's row
    contiguous). float64, as :func:`similarity_matrix` (float32 would be faster but moves a perfect APS
    of 1 to 1 - 6e-8)."""
    s = np.asarray(layers_speech, dtype=np.float64)
    t = np.asarray(layers_text, dtype=np.float64)
    if s.ndim != 3 or t.ndim != 3 or s.shape[2] != t.shape[2]:
        raise ValueError(f"expected speech [L, Ts, D] and text [L, Tt, D], got {s.shape} and {t.shape}")
    _check_finite(s, t)
    s_norm, t_norm = np.linalg.norm(s, axis=2, keepdims=True), np.linalg.norm(t, axis=2, keepdims=True)
    s = np.divide(s, s_norm, out=np.zeros_like(s), where=s_norm > 0)
    t = np.divide(t, t_norm, out=np.zeros_like(t), where=t_norm > 0)
    At = np.matmul(t, s.transpose(0, 2, 1))
    return np.clip(At, -1.0, 1.0, out=At)


def _aps_argmax(At: np.ndarray) -> dict:
    """The argmax APS of all layers at once from At [L, Tt, Ts]: the per-token max and argmax, and
    Spearman's rho from ranks, with no Python loop over layers."""
    i_star = At.argmax(axis=2)  # [L, Tt]
    best = np.take_along_axis(At, i_star[:, :, None], axis=2)[:, :, 0]
    per_layer = best.mean(axis=1)
    return {"aps": float(per_layer.mean()), "per_layer": per_layer, "monotonicity": _spearman_rows(i_star),
            "paths": list(i_star)}


def _spearman_rows(paths: np.ndarray) -> np.ndarray:
    """Spearman rho of (j, path[j]) for each row; nan for a constant row or fewer than 2 tokens."""
    L, n = paths.shape
    if n < 2:
        return np.full(L, np.nan)
    r = _average_ranks(paths)  # average ranks for ties, as spearmanr
    r -= r.mean(axis=1, keepdims=True)
    j = np.arange(n, dtype=np.float64) - (n - 1) / 2
    denom = np.sqrt((r ** 2).sum(axis=1) * (j ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (r @ j) / denom
    rho[denom == 0] = np.nan
    return rho


def _average_ranks(rows: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(rows, axis=1)`` (average ranks for ties), for rows of speech indices in one
    sort of the whole array (rows offset so they do not mix): rankdata sorts row by row, which costs
    more than a whole small APS call. Non-integer rows go to rankdata."""
    rows = np.asarray(rows)
    L, n = rows.shape
    if not np.issubdtype(rows.dtype, np.integer) or rows.size == 0 or rows.min() < 0:
        return stats.rankdata(rows, axis=1)
    offset = np.arange(L, dtype=np.int64)[:, None]
    _, inverse, counts = np.unique((rows + offset * (int(rows.max()) + 1)).ravel(),
                                   return_inverse=True, return_counts=True)
    before = np.cumsum(counts) - counts  # cells of smaller keys, earlier rows included
    return (before[inverse] + (counts[inverse] + 1) / 2).reshape(L, n) - offset * n


def critical_tokens(A, path, k: int | None = 3) -> np.ndarray:
    """Speech positions on ``path`` that align worst with their text token (Bottom-k).

    A speech position shared by several text tokens counts with its lowest score. Positions are
    unique and ordered from worst score up (ties -> lower position); ``k=None`` returns all of
    them. Interventions target these as the frames where the speech representation fails.
    """
    path = np.asarray(path, dtype=np.intp)
    scores = path_scores(A, path)
    order = np.lexsort((path, scores))
    positions, first = np.unique(path[order], return_index=True)
    ranked = positions[np.argsort(first, kind="stable")]
    return ranked if k is None else ranked[:k]
