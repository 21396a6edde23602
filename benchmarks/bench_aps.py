"""Time the Alignment Path Score (one layer) against baselines measured in the same run.

* argmax APS vs a plain-NumPy reference that loops over text tokens (one column at a time);
* DTW APS vs calling dtw-python directly on the 1 - cosine cost (our overhead: similarity
  matrix, per-token reduction, Spearman monotonicity).

Run: ``python benchmarks/bench_aps.py``. Times are the best of 5 repeats, per call. BLAS is
pinned to one thread (unless set otherwise) so the timings compare algorithms, not how many idle
cores the machine happens to have: on a shared 2-core box a 2-thread matmul ran 3-4x slower
than a 1-thread one whenever another process held a core.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import timeit  # noqa: E402

import dtw  # noqa: E402
import numpy as np  # noqa: E402

from lmeval_speech.metrics import (  # noqa: E402
    alignment_path_score,
    argmax_path,
    path_scores,
    similarity_matrix,
)

SIZES = [(100, 20), (500, 60), (1500, 200)]
D = 64
LAYERS = 8


def reference_aps(speech: np.ndarray, text: np.ndarray) -> float:
    """The straightforward version: for each text token, cosine with every speech frame."""
    speech_norm = np.linalg.norm(speech, axis=1)
    total = 0.0
    for j in range(text.shape[0]):
        sims = speech @ text[j] / (speech_norm * np.linalg.norm(text[j]))
        total += sims.max()
    return total / text.shape[0]


def aps_core(speech: np.ndarray, text: np.ndarray) -> float:
    """The package's argmax APS without the monotonicity bookkeeping."""
    A = similarity_matrix(speech, text)
    return path_scores(A, argmax_path(A)).mean()


def dtw_direct(speech: np.ndarray, text: np.ndarray):
    return dtw.dtw(1.0 - similarity_matrix(speech, text))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f}"


def best_time(fn) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=number)) / number


def main() -> None:
    rng = np.random.default_rng(0)
    rows, prev = [], None
    for ts, tt in SIZES:
        speech, text = rng.normal(size=(ts, D)), rng.normal(size=(tt, D))
        assert np.isclose(reference_aps(speech, text), aps_core(speech, text))

        t = {
            "ref": best_time(lambda: reference_aps(speech, text)),
            "core": best_time(lambda: aps_core(speech, text)),
            "argmax": best_time(lambda: alignment_path_score([speech], [text], path="argmax")),
            "dtw_direct": best_time(lambda: dtw_direct(speech, text)),
            "dtw": best_time(lambda: alignment_path_score([speech], [text], path="dtw")),
        }
        growth = "" if prev is None else (
            f"cells x{ts * tt / prev[0]:.1f}: ref x{t['ref'] / prev[1]['ref']:.1f}, "
            f"APS full x{t['argmax'] / prev[1]['argmax']:.1f}, "
            f"APS dtw x{t['dtw'] / prev[1]['dtw']:.1f}")
        rows.append((f"{ts}x{tt}", t, growth))
        prev = (ts * tt, t)

    print(f"one layer, D={D}; times in ms (best of 5); ratio = time / baseline in this run")
    print(f"{'Ts x Tt':>9} | {'ref loop':>9} {'APS core':>9} {'ratio':>6} {'APS full':>9} {'ratio':>6} | "
          f"{'dtw-py':>9} {'APS dtw':>9} {'ratio':>6} | growth vs previous size")
    for size, t, growth in rows:
        print(f"{size:>9} | {ms(t['ref'])} {ms(t['core'])} {t['core'] / t['ref']:6.2f} "
              f"{ms(t['argmax'])} {t['argmax'] / t['ref']:6.2f} | {ms(t['dtw_direct'])} "
              f"{ms(t['dtw'])} {t['dtw'] / t['dtw_direct']:6.2f} | {growth}")
    print("APS core = similarity_matrix + argmax_path + path_scores; APS full = "
          "alignment_path_score (adds Spearman monotonicity); dtw-py = dtw.dtw(1 - cosine) alone")

    # All layers of an item at once, as the report computes them (the issue's goal: >= 10x the loop).
    print(f"\n{LAYERS} layers, D={D}: plain NumPy loop over layers and tokens vs alignment_path_score (batched)")
    print(f"{'Ts x Tt':>9} | {'ref loop':>9} {'APS all':>9} {'speed-up':>8}")
    for ts, tt in SIZES:
        speech = [rng.normal(size=(ts, D)) for _ in range(LAYERS)]
        text = [rng.normal(size=(tt, D)) for _ in range(LAYERS)]
        ref = np.mean([reference_aps(s, t) for s, t in zip(speech, text)])
        assert np.isclose(ref, alignment_path_score(speech, text)["aps"])
        t_ref = best_time(lambda: [reference_aps(s, t) for s, t in zip(speech, text)])
        t_all = best_time(lambda: alignment_path_score(speech, text))
        print(f"{ts}x{tt:>5} | {ms(t_ref)} {ms(t_all)} {t_ref / t_all:7.1f}x")


if __name__ == "__main__":
    main()
