"""Speech accuracy of the default model under each intervention, against no intervention.

For a fixed subset (``speech_mmlu_continuation_demo``, ``--limit`` items per subject), runs the
paired task once per configuration through lm-eval's own evaluator and compares the speech twin's
per-item correctness with the no-intervention run by a paired bootstrap (``metrics.paired_gap``:
here "gap" = intervention acc - none acc). Oracle runs use the text twin of the same run; calibrated
runs use target norms/directions saved by an oracle run on *other* subjects (the calibration set).

    python benchmarks/bench_interventions.py --limit 25 [--model mini]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TASK = "speech_mmlu_continuation_demo"
CALIBRATION_TASKS = ["speech_mmlu_continuation_high_school_biology_text", "speech_mmlu_continuation_nutrition_text"]
CONFIGS = [
    ("none", {}),
    ("angle bottom3 (oracle)", {"intervention": "angle", "critical": "bottom3"}),
    ("angle all (oracle)", {"intervention": "angle", "critical": "all"}),
    ("length bottom3 (oracle)", {"intervention": "length", "critical": "bottom3"}),
    ("length all (oracle)", {"intervention": "length", "critical": "all"}),
    ("angle bottom3 (calibrated)", {"intervention": "angle", "critical": "bottom3", "intervention_mode": "calibrated"}),
    ("angle all (calibrated)", {"intervention": "angle", "critical": "all", "intervention_mode": "calibrated"}),
    ("length bottom3 (calibrated)", {"intervention": "length", "critical": "bottom3", "intervention_mode": "calibrated"}),
    ("length all (calibrated)", {"intervention": "length", "critical": "all", "intervention_mode": "calibrated"}),
]


def speech_correct(model, tasks, limit) -> dict:
    from lm_eval.evaluator import simple_evaluate

    out = simple_evaluate(model=model, tasks=tasks, limit=limit, log_samples=True, verbosity="ERROR")
    correct = {}
    for task, rows in out["samples"].items():
        for r in rows:
            correct[(task, r["doc_id"])] = int(r["acc"])
    return correct


def main():
    import lmeval_speech.registration as registration
    from lmeval_speech.metrics import paired_gap
    from lmeval_speech.models.lslm import LSLM

    registration.register()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--limit", type=int, default=25)
    ap.add_argument("--layers", default="input", help="intervene_layers for every configuration")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calibration.safetensors")
        t0 = time.time()
        speech_correct(LSLM(pretrained=args.model, device="cpu", batch_size=8, intervention="angle",
                            intervene_layers=args.layers, save_calibration=calib), CALIBRATION_TASKS, args.limit)
        rows, base = [], None
        for name, cfg in CONFIGS:
            extra = {"intervene_layers": args.layers, **cfg}
            if cfg.get("intervention_mode") == "calibrated":
                extra["calibration"] = calib
            lm = LSLM(pretrained=args.model, device="cpu", batch_size=8, **(extra if cfg else {}))
            res = speech_correct(lm, [TASK], args.limit)
            speech = {k: v for k, v in res.items() if k[0].endswith("_speech")}
            keys = sorted(speech)
            if base is None:
                base = speech
            g = paired_gap([speech[k] for k in keys], [base[k] for k in keys], n_boot=10000, seed=0)
            edits = getattr(getattr(lm, "intervener", None), "edits", 0)
            rows.append({"config": name, "speech_acc": g["text_acc"], "delta_vs_none": g["gap"],
                         "ci_low": g["ci_low"], "ci_high": g["ci_high"], "mcnemar_p": g["mcnemar"]["p"],
                         "n": g["n"], "edited_positions": edits})
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, model={args.model}, task={TASK}, "
          f"limit={args.limit}/subject, layers={args.layers}, {time.time() - t0:.0f} s")
    print("| configuration | speech acc | Δ vs none | 95% CI | McNemar p | edited positions |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['speech_acc']:.3f} | {r['delta_vs_none']:+.3f} | "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['mcnemar_p']:.2g} | {r['edited_positions']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
