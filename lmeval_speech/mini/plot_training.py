"""Plot the adapter's training log (``weights/training.json``): stage 1's CTC loss and validation token
error rate, and stage 2's distillation KL when the log has one.

    python -m lmeval_speech.mini.plot_training [--log weights/training.json] [--out weights/training.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .build import WEIGHTS_DIR


def plot(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = json.loads(log.read_text())
    loss = stats["loss_curve_every50"]
    valid = stats.get("valid_token_error_rate", [])
    stage2 = stats.get("stage2")
    fig, ax = plt.subplots(1, 3 if stage2 else 2, figsize=(15 if stage2 else 10, 3.6))
    ax[0].plot([50 * (i + 1) for i in range(len(loss))], loss)
    ax[0].set(xlabel="step (batch 16)", ylabel="CTC loss (mean of 50 steps)", yscale="log", title="training loss")
    if valid:
        ax[1].plot([v["minutes"] for v in valid], [v["ter"] for v in valid], marker=".")
    ax[1].set(xlabel="CPU minutes (1 thread)", ylabel="greedy token error rate", ylim=(0, 1.05),
              title="held-out sentences, espeak-ng en-us 160")
    if stage2:
        kl = stage2["loss_curve_every10"]
        ax[2].plot([10 * (i + 1) for i in range(len(kl))], kl, alpha=0.5, label="training batches (mean of 10)")
        v = stage2["valid_kl"]
        ax[2].plot([x["step"] for x in v], [x["kl"] for x in v], marker=".", label="held-out sentences, en-us 160")
        ax[2].set(xlabel=f"stage-2 step (batch {stage2['batch']})", ylabel="KL(text teacher || speech student), nats",
                  title="stage 2: distillation through the LLM")
        ax[2].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", type=Path, default=WEIGHTS_DIR / "training.json")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "training.png")
    args = ap.parse_args(argv)
    plot(args.log, args.out)


if __name__ == "__main__":
    main()
