"""Which science set the README's demo runs: the text twin's accuracy on each set's *validation* split.

The demo's items must be chosen without looking at them. This script scores the embedded model's text
twins (lm-eval's own prompts, through ``lslm``) on the first ``--limit`` validation items of ARC-Easy,
ARC-Challenge, OpenBookQA and SciQ (the test items the demo runs are never read here), and writes a JSON
table; the demo takes the set with the highest text ``acc`` among those whose speech twin hears the
whole question and nothing else (not SciQ: both its twins show the support passage as text, which often
states the answer, so its gap is not the gap of hearing a question), and runs its first test items.

    python benchmarks/choose_demo.py --limit 200 --out benchmarks/choose_demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASKS = Path(__file__).resolve().parents[1] / "lmeval_speech" / "tasks"
#: science set -> the folder and text twin of its pair (tasks/_generate.py)
SETS = {"arc_easy": "speech_arc/speech_arc_easy_text.yaml", "arc_challenge": "speech_arc/speech_arc_challenge_text.yaml",
        "openbookqa": "speech_openbookqa/speech_openbookqa_text.yaml", "sciq": "speech_sciq/speech_sciq_text.yaml"}
#: the sets the demo may run (see the docstring: SciQ's support passage is shown to both twins)
CANDIDATES = ("arc_easy", "arc_challenge", "openbookqa")


def write_configs(folder: Path) -> list[str]:
    """One validation-split text task per set: the pair's text twin with its split replaced."""
    names = []
    for name, text_twin in SETS.items():
        task = f"choose_demo_{name}_validation"
        cfg = {"task": task, "include": str(TASKS / text_twin),
               "dataset_kwargs": {"name": name, "split": "validation"}, "test_split": "validation",
               "metadata": {"version": 1.0, "modality": "text", "pair": f"choose_demo_{name}"}}
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        names.append(task)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "choose_demo.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_configs(Path(tmp))
        out = Path(tmp) / "results"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(["lm_eval", "--model", "lslm", "--include_path", tmp, "--tasks", ",".join(tasks),
                        "--limit", str(args.limit), "--batch_size", "8", "--device", "cpu",
                        "--output_path", str(out)], check=True, env=env)
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    table = {name: {"acc": results[f"choose_demo_{name}_validation"]["acc,none"],
                    "acc_norm": results[f"choose_demo_{name}_validation"]["acc_norm,none"],
                    "n": args.limit, "chance": 0.25}
             for name in SETS}
    chosen = max(CANDIDATES, key=lambda n: table[n]["acc"])
    record = {"machine": machine_info(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))),
              "model": "lslm pretrained=mini (SmolLM2-135M-Instruct reads the text twin)",
              "split": "validation", "first_items": args.limit, "text_twin": table, "candidates": list(CANDIDATES), "rule": "highest text acc among the candidates",
              "chosen": chosen}
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
