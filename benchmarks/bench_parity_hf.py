"""The text twin is lm-eval's own task: ``lslm``'s ``speech_arc_easy_text`` against lm-eval's ``hf`` model
running lm-eval's own ``arc_easy`` YAML, on the same items and the same LLM (SmolLM2-135M-Instruct, fp32).

lm-eval's ``arc_easy`` reads the hub; here its YAML is used unchanged except that its documents come
from the offline copy (``custom_dataset``: tasks/science_data.py), so both runs score the same first
``--limit`` test items. Prints and writes: each run's ``acc``/``acc_norm``, how many items choose a
different option, and the largest |difference| of any option's log-likelihood.

    python benchmarks/bench_parity_hf.py --limit 200 --out benchmarks/bench_parity_hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def own_arc_easy_yaml(folder: Path) -> str:
    """lm-eval's arc_easy.yaml with only its data source swapped (and its train/validation splits
    dropped: the offline copy scores test, zero-shot)."""
    import lm_eval.tasks

    own = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml").read_text())
    for key in ("dataset_path", "dataset_name", "training_split", "validation_split", "tag"):
        own.pop(key, None)
    own.update(task="arc_easy_offline", dataset_kwargs={"name": "arc_easy", "split": "test"})
    text = yaml.safe_dump(own, sort_keys=False)
    text += "custom_dataset: !function lmeval_speech.tasks.science_data.load_science\n"
    (folder / "arc_easy_offline.yaml").write_text(text, encoding="utf-8")
    return "arc_easy_offline"


def logliks(samples: list[dict]) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, str(HERE))
    import torch
    from _common import machine_info
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmeval_speech.mini.build import smollm2_fp32_dir

    with tempfile.TemporaryDirectory() as tmp:
        own = own_arc_easy_yaml(Path(tmp))
        tm = TaskManager(include_path=tmp)
        runs = {
            "hf": simple_evaluate(model="hf", model_args=f"pretrained={smollm2_fp32_dir()},dtype=float32",
                                  tasks=[own], task_manager=tm, limit=args.limit, batch_size=8, device="cpu",
                                  log_samples=True),
            "lslm": simple_evaluate(model="lslm", model_args="pretrained=mini", tasks=["speech_arc_easy_text"],
                                    task_manager=tm, limit=args.limit, batch_size=8, device="cpu", log_samples=True),
        }
    names = {"hf": own, "lslm": "speech_arc_easy_text"}
    ll = {k: logliks(r["samples"][names[k]]) for k, r in runs.items()}
    assert ll["hf"].keys() == ll["lslm"].keys()
    diffs = [abs(a - b) for d in ll["hf"] for a, b in zip(ll["hf"][d], ll["lslm"][d], strict=True)]
    choice_differs = sum(max(range(len(v)), key=v.__getitem__) != max(range(len(ll["lslm"][d])), key=ll["lslm"][d].__getitem__)
                         for d, v in ll["hf"].items())
    record = {
        "machine": machine_info(torch.get_num_threads()),
        "items": len(ll["hf"]), "options": len(diffs),
        "acc": {k: r["results"][names[k]]["acc,none"] for k, r in runs.items()},
        "acc_norm": {k: r["results"][names[k]]["acc_norm,none"] for k, r in runs.items()},
        "items_choosing_differently": choice_differs,
        "max_abs_loglik_difference": max(diffs),
    }
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
