"""Owns the per-document functions that the task YAMLs name: audio references, gold answers and
choices, ``process_results``, and the prior controls' derangement and silence (VoiceBench's generation
scoring lives in ``tasks/voicebench_scoring.py`` and is re-exported here under the names the YAMLs use).

What is spoken is defined in ``lmeval_speech.twins``; the functions here wrap it in lazy ``spoken()``
references (never waveforms: a 14k-item run would not fit in memory) that the model adapter
synthesizes through its cache, or in content-addressed ``recorded()`` references for a dataset's own
recordings. The YAMLs reference them by their full module path, so lm-eval uses this imported
module rather than a second copy loaded from the file's path.
"""

from __future__ import annotations

import json
import re

import datasets
import numpy as np

from lmeval_speech import twins
from lmeval_speech.audio import recorded, spoken
from lmeval_speech.outcomes import count_flagged, flags, gen_cascade_results, mc_results  # noqa: F401  (count_flagged: YAML)
from lmeval_speech.tasks.voicebench_scoring import (  # noqa: F401 (named by the YAMLs as prompts.<name>)
    ADVBENCH_REFUSAL_PHRASES,
    IFEVAL_METRICS,
    VOICEBENCH_MCQ_TEMPLATES,
    advbench_process_results,
    advbench_refused,
    ifeval_inst_level_acc,
    ifeval_process_results,
    voicebench_docs,
    voicebench_ifeval_docs,
    voicebench_mcq_extract,
    voicebench_mcq_fallback,
    voicebench_mcq_gen_cascade_results,
    voicebench_mcq_gen_results,
)

# The voice every TTS speech task asks for; _generate.py writes the same spec into their metadata.
TTS = {"engine": "espeak-ng", "voice": "en-us", "rate": 160}


mmlu_spoken_text = twins.mmlu_letter_spoken  # what the letter format's audio says (owned by twins)


def mmlu_audio(doc: dict) -> list[dict]:
    return [spoken(twins.mmlu_letter_spoken(doc), **TTS)]


def question_audio(doc: dict) -> list[dict]:
    """MMLU continuation and ARC (cloze format): only the question is spoken."""
    return [spoken(twins.question_spoken(doc), **TTS)]


def openbookqa_audio(doc: dict) -> list[dict]:
    return [spoken(twins.question_stem_spoken(doc), **TTS)]


def recorded_audio(doc: dict) -> list[dict]:
    """The dataset's own recording as a content-addressed reference (``audio.recorded``): JSON-able,
    so lm-eval's ``--use_cache`` works, and decoded only by the model, so one broken recording is
    one failed item rather than a crash while lm-eval builds the requests.

    Accepts an undecoded ``{"bytes", "path"}`` (from :func:`voicebench_docs`), an already decoded
    ``{"array", "sampling_rate"}`` (local fixtures, older ``datasets``) or a file path (a user's JSONL:
    relative to the current directory, as lm-eval's ``data_files``). A file that cannot be opened
    becomes a ``{"path"}`` item, which fails (with its path) when the model resolves it: its item only.
    """
    audio = doc["audio"]
    if isinstance(audio, str):
        audio = {"path": audio}
    if audio.get("array") is not None:
        return [recorded(np.asarray(audio["array"]), int(audio["sampling_rate"]))]
    if audio.get("bytes"):
        return [recorded(audio["bytes"])]
    try:
        with open(audio["path"], "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    return [recorded(data)] if data else [{"path": str(audio["path"])}]  # fails naming the file


# ---- gold answers and choices: one function each, used by the YAMLs and by process_results


def mmlu_gold(doc: dict) -> int:
    return int(doc["answer"])


def letters(doc: dict) -> list[str]:
    return ["A", "B", "C", "D"]


def mmlu_choices(doc: dict) -> list[str]:
    return list(doc["choices"])


def labelled_gold(doc: dict) -> int:
    """ARC / OpenBookQA: the index of ``answerKey`` among the choice labels."""
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def labelled_choices(doc: dict) -> list[str]:
    return list(doc["choices"]["text"])


def sciq_gold(doc: dict) -> int:
    """SciQ: lm-eval's ``doc_to_target: 3`` (the correct answer is listed after the three distractors)."""
    return 3


def sciq_choices(doc: dict) -> list[str]:
    return [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]


def voicebench_gold(doc: dict) -> int:
    return "ABCD".index(doc["reference"].strip())


# lm-eval's multiple-choice scoring, except that an item whose audio failed is not scored and is
# counted (lmeval_speech.outcomes): one function per family, named in its YAML.
mmlu_results = mc_results(mmlu_gold, letters, norm=False)
mmlu_continuation_results = mc_results(mmlu_gold, mmlu_choices, norm=False)
labelled_results = mc_results(labelled_gold, labelled_choices, norm=True)
sciq_results = mc_results(sciq_gold, sciq_choices, norm=True)
voicebench_results = mc_results(voicebench_gold, letters, norm=False)


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def sdqa_process_results(doc: dict, results: list[str]) -> dict:
    """SD-QA is open-ended: VoiceBench scores it with PEDANT and an LLM judge; offline, the closest
    cheap **proxy** is ``contains_proxy``: whether the normalized reference answer occurs in the
    normalized generation. It is not VoiceBench's score (its name says so wherever it is reported).
    A generation whose audio failed is not scored (and is counted)."""
    out = flags(results)
    if out["audio_failed"]:
        return out
    reference = _normalize(doc["reference"])
    out["contains_proxy"] = float(bool(reference) and f" {reference} " in f" {_normalize(results[0])} ")
    return out


# ---- prior controls: another item's audio (fixed derangement) and silence of the item's length


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation with no fixed point (Sattolo's algorithm: one random n-cycle)."""
    if n < 2:
        raise ValueError(f"a shuffled-audio control needs at least 2 items, the task has {n}")
    rng = np.random.default_rng(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _with_control_audio(dataset: datasets.Dataset, audio_fn) -> datasets.Dataset:
    """Adds ``control_from`` (the other item's index) and ``control_audio`` (its audio refs, JSON).

    Another *item* is not always another *audio*: a dataset with a repeated question (MMLU's
    college_physics has two) would let an item hear its own words. Such a position swaps its source
    with the first position where both then hear another audio; a task where more than half the items
    share one audio has no shuffled control (an error)."""
    own = [json.dumps(audio_fn(dataset[i])) for i in range(len(dataset))]
    perm = derangement(len(dataset))
    for i in range(len(perm)):
        if own[perm[i]] != own[i]:
            continue
        j = next((j for j in range(len(perm)) if own[perm[j]] != own[i] and own[perm[i]] != own[j]), None)
        if j is None:
            raise ValueError("a shuffled-audio control needs items with different audio: more than half the "
                             "items of this task share one audio, so some would hear their own")
        perm[i], perm[j] = perm[j], perm[i]
    return dataset.add_column("control_from", perm).add_column("control_audio", [own[j] for j in perm])


def shuffled_voicebench_docs(dataset):
    return _with_control_audio(voicebench_docs(dataset), recorded_audio)


def control_audio(doc: dict) -> list[dict]:
    return json.loads(doc["control_audio"])


def _silence(refs: list[dict]) -> list[dict]:
    return [{"silence_like": ref} for ref in refs]


# ---- cascade twin: the speech twin's own audio, transcribed by ASR, read by the LLM as text

#: The ASR every cascade task asks for (``lmeval_speech.audio.asr.ASRSpec``).
ASR = {"engine": "faster-whisper", "model": "tiny.en", "beam_size": 1, "language": "en"}


def _transcribed(refs: list[dict]) -> list[dict]:
    return [{"transcribe": ref, "asr": ASR} for ref in refs]


#: The speech twin's audio of each task family: the prior controls and the cascade twin are built from it.
FAMILY_AUDIO = {"mmlu": mmlu_audio, "question": question_audio, "openbookqa": openbookqa_audio,
                "recorded": recorded_audio}

#: Each control or twin as (the name the YAMLs use, how it is made from the family's audio function).
DERIVED = {
    "shuffled_{}_docs": lambda audio_fn: lambda dataset: _with_control_audio(dataset, audio_fn),  # another item's audio
    "silence_{}_audio": lambda audio_fn: lambda doc: _silence(audio_fn(doc)),  # silence of the item's length
    "cascade_{}_audio": lambda audio_fn: lambda doc: _transcribed(audio_fn(doc)),  # its audio, read through ASR
}


def _derive() -> None:
    """One module function per (family, control): ``shuffled_mmlu_docs``, ``silence_question_audio``,
    ``cascade_recorded_audio``, ... (the names the generated YAMLs reference)."""
    for pattern, make in DERIVED.items():
        for family, audio_fn in FAMILY_AUDIO.items():
            name = pattern.format(family)
            if name in globals():  # written by hand (VoiceBench's shuffled docs expand its rows first)
                continue
            fn = make(audio_fn)
            fn.__name__ = fn.__qualname__ = name
            fn.__module__ = __name__
            globals()[name] = fn


_derive()


mmlu_cascade_results = mc_results(mmlu_gold, letters, norm=False, spoken=twins.mmlu_letter_spoken)
mmlu_continuation_cascade_results = mc_results(mmlu_gold, mmlu_choices, norm=False, spoken=twins.question_spoken)
arc_cascade_results = mc_results(labelled_gold, labelled_choices, norm=True, spoken=twins.question_spoken)
openbookqa_cascade_results = mc_results(labelled_gold, labelled_choices, norm=True, spoken=twins.question_stem_spoken)
sciq_cascade_results = mc_results(sciq_gold, sciq_choices, norm=True, spoken=twins.question_spoken)
voicebench_cascade_results = mc_results(voicebench_gold, letters, norm=False, spoken=twins.voicebench_spoken)
# SD-QA (generation): the same contains_proxy, plus the transcript and its WER
sdqa_cascade_results = gen_cascade_results(sdqa_process_results, twins.voicebench_spoken)
