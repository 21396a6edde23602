"""Speech accuracy of the default model under each intervention, against no intervention and against
a same-size random edit.

For a fixed subset (``--task``, ``--limit`` items per task), runs the paired task once per
configuration through lm-eval's own evaluator and compares the speech twin's per-item correctness with
the no-intervention run by a paired bootstrap (``metrics.paired_gap``: here "gap" = intervention acc -
none acc). Oracle runs use the text twin of the same run; calibrated runs use target norms/directions
saved by an oracle run on *other* subjects (the calibration set, MMLU demo only). Every oracle edit has
its control (``--controls``): ``random_angle``/``random_length``, an edit of the same size on the same
positions in a random direction; "vs control" is the edit's accuracy minus the control's, paired.

    python benchmarks/bench_interventions.py --limit 25 [--model mini]                  # the MMLU demo, as before
    python benchmarks/bench_interventions.py --task speech_arc_easy --limit 100 --layers input,8,16,24 \
        --configs oracle --controls --json benchmarks/interventions_arc.json
    python benchmarks/bench_interventions.py --task speech_arc_easy --limit 200 --layers 8,16 \
        --steer benchmarks/steer_arc_challenge.safetensors --strengths 1 --controls --json benchmarks/interventions_arc_steer.json

``--steer`` rows add a steering vector (the mean text - speech state of *other* items, ``lmeval-speech steer``)
at every speech position, beside ``random_steer`` (a random direction of the same norm).
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


CONTROL_OF = {"angle": "random_angle", "length": "random_length", "steer": "random_steer"}


def main():
    import lmeval_speech.registration as registration
    from lmeval_speech.metrics import paired_gap
    from lmeval_speech.models.lslm import LSLM

    registration.register()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini")
    ap.add_argument("--limit", type=int, default=25)
    ap.add_argument("--layers", default="input", help="intervene_layers, one set of runs per comma-separated value")
    ap.add_argument("--task", default=TASK)
    ap.add_argument("--configs", choices=["all", "oracle"], default="all", help="oracle: skip the calibrated rows")
    ap.add_argument("--critical", default="bottom3,all", help="critical-token settings to run (comma-separated)")
    ap.add_argument("--controls", action="store_true", help="add each oracle edit's same-size random control")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--steer", default=None, help="a steering vector file (lmeval-speech steer), estimated on other "
                    "items: adds steer rows (critical=all) at each of --strengths, instead of the oracle/calibrated rows")
    ap.add_argument("--strengths", default="1", help="steer strengths (comma-separated)")
    args = ap.parse_args()
    configs = [(n, c) for n, c in CONFIGS if (args.configs == "all" or c.get("intervention_mode") != "calibrated")
               and (not c or c["critical"] in args.critical.split(","))]
    if args.steer:
        configs = [("none", {})] + [(f"steer all x{s}", {"intervention": "steer", "critical": "all", "strength": float(s),
                                                         "calibration": args.steer})
                                    for s in args.strengths.split(",")]
    if args.controls:
        configs += [(f"{CONTROL_OF[c['intervention']]} {c['critical']}"
                     f"{' x' + str(c['strength']) if 'strength' in c else ''} (control)",
                     {**c, "intervention": CONTROL_OF[c["intervention"]]})
                    for _, c in configs if c and c.get("intervention_mode") != "calibrated"]
    t0 = time.time()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calibration.safetensors")
        if any(c.get("intervention_mode") == "calibrated" for _, c in configs):
            speech_correct(LSLM(pretrained=args.model, device="cpu", batch_size=8, intervention="angle",
                                intervene_layers=args.layers, save_calibration=calib), CALIBRATION_TASKS, args.limit)
        for layers in args.layers.split(","):
            results = {}
            for name, cfg in configs:
                if not cfg and base is not None:
                    continue  # one run without intervention serves every layer
                extra = {"intervene_layers": layers, **cfg}
                if cfg.get("intervention_mode") == "calibrated":
                    extra["calibration"] = calib
                lm = LSLM(pretrained=args.model, device="cpu", batch_size=8, **(extra if cfg else {}))
                res = speech_correct(lm, [args.task], args.limit)
                speech = {k: v for k, v in res.items() if k[0].endswith("_speech")}
                keys = sorted(speech)
                if base is None:
                    base = speech
                results[name] = speech
                g = paired_gap([speech[k] for k in keys], [base[k] for k in keys], n_boot=10000, seed=0)
                edits = getattr(getattr(lm, "intervener", None), "edits", 0)
                row = {"config": name, "layers": layers if cfg else "-", "speech_acc": g["text_acc"],
                       "delta_vs_none": g["gap"], "ci_low": g["ci_low"], "ci_high": g["ci_high"],
                       "mcnemar_p": g["mcnemar"]["p"], "n": g["n"], "edited_positions": edits}
                real = [n for n, c in configs if c and CONTROL_OF.get(c["intervention"]) == cfg.get("intervention")
                        and c["critical"] == cfg.get("critical") and c.get("strength") == cfg.get("strength")
                        and c.get("intervention_mode") != "calibrated"]
                if real:  # a control row: the real edit (run before it) minus the control, item by item
                    v = paired_gap([results[real[0]][k] for k in keys], [speech[k] for k in keys], n_boot=10000, seed=0)
                    row["edit_minus_control"] = {"edit": real[0], "gap": v["gap"], "ci_low": v["ci_low"],
                                                 "ci_high": v["ci_high"], "mcnemar_p": v["mcnemar"]["p"]}
                rows.append(row)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, model={args.model}, task={args.task}, "
          f"limit={args.limit}/task, layers={args.layers}, {time.time() - t0:.0f} s")
    print("| layers | configuration | speech acc | Δ vs none | 95% CI | McNemar p | edited positions | edit − its control |")
    print("|---|---|---:|---:|---|---:|---:|---|")
    for r in rows:
        vs = r.get("edit_minus_control")
        print(f"| {r['layers']} | {r['config']} | {r['speech_acc']:.3f} | {r['delta_vs_none']:+.3f} | "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['mcnemar_p']:.2g} | {r['edited_positions']} | "
              + (f"{vs['gap']:+.3f} [{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}] |" if vs else " |"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
