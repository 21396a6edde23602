"""The paper's regression across training checkpoints, on a model anyone can run (issue 29).

For every adapter of the checkpoint family (``python -m lmeval_speech.mini.family --out FAMILY``) and the
shipped adapter, the README demo's paired run (ARC-Easy test 0-199: text, speech, shuffled-audio
control, ``capture=tokens``), its report, then ``lmeval-speech compare`` over all of them, which fits the
gap on S_cos, S_euc, APS and the baseline-corrected similarities with item-bootstrap CIs.

    python benchmarks/paper_findings.py --family /work/family --out benchmarks/paper_findings [--limit 200]

Resumable: a checkpoint whose report exists is not run again. Runs go to ``FAMILY/runs/<label>``; the
leaderboard (JSON, Markdown, CSV, figures) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(pretrained: Path, run_dir: Path, limit: int, threads: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run(["lm_eval", "--model", "lslm", "--model_args",
                    f"pretrained={pretrained},capture=tokens,capture_dir={run_dir / 'capture'},capture_limit=30",
                    "--tasks", "speech_arc_easy,speech_arc_easy_shuffled", "--limit", str(limit), "--batch_size", "8",
                    "--device", "cpu", "--log_samples", "--output_path", str(run_dir / "results")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "lmeval_speech.cli", "report", str(run_dir / "results"), "--out",
                    str(run_dir / "report")], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "paper_findings")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wait", action="store_true", help="wait for checkpoints the family has not written yet")
    args = ap.parse_args(argv)
    from lmeval_speech.mini.build import ADAPTER_FILE, build_mini
    from lmeval_speech.mini.family import SAVE_AT

    steps = [int(s) for s in SAVE_AT.split(",")]
    members = [(f"step{s}", args.family / "adapters" / f"adapter_step{s}.safetensors") for s in steps]
    members.append(("shipped12314", ADAPTER_FILE))
    timings = {}
    for label, adapter in members:
        run_dir = args.family / "runs" / label
        if (run_dir / "report" / "report.json").exists():
            continue
        while not adapter.exists():
            if not args.wait:
                raise SystemExit(f"{adapter} missing: run python -m lmeval_speech.mini.family --out {args.family}")
            time.sleep(20)
        timings[label] = round(run_one(build_mini(adapter), run_dir, args.limit, args.threads), 1)
        print(f"{label}: {timings[label]} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "lmeval_speech.cli", "compare",
                    *(str(args.family / "runs" / label / "report") for label, _ in members),
                    "--labels", ",".join(label for label, _ in members), "--out", str(args.out)], check=True)
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
