"""Owns twin knowledge: which pair and modality a task is, and what its speech twin speaks.

A pair ``P`` is a text twin ``P_text`` and a speech twin ``P_speech`` over the same doc ids; the
speech twin's prompt is the text twin's with the *spoken text* replaced by an audio. The spoken
text of a doc is defined once per task family here: ``tasks/prompts.py`` synthesizes exactly this
text, and ``lslm`` captures (and intervenes on) exactly these characters of the text twin's prompt.
Report, compare and check read pairs from the run manifest, which records what this module said.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

MODALITIES = ("text", "speech")
#: Prior-control twins of the speech twin: another item's audio, silence of the same length.
CONTROLS = ("shuffled", "silence")
#: The ASR-cascade twin: the speech twin's audio transcribed, read by the same LLM as text.
CASCADE = "cascade"
#: Every twin suffix, text and speech first.
ALL_TWINS = MODALITIES + CONTROLS + (CASCADE,)


@dataclass(frozen=True)
class Twin:
    pair: str
    modality: str


def twin_of(task_name: str | None, has_audio: bool = False) -> Twin:
    """``P_text`` -> (P, text), ``P_speech`` -> (P, speech); another name is its own pair, with the
    modality given by whether its requests carry audio."""
    name = task_name or "unknown"
    for modality in ALL_TWINS:
        if name.endswith(f"_{modality}"):
            return Twin(name[: -len(modality) - 1], modality)
    return Twin(name, "speech" if has_audio else "text")


def _sentence(text: str) -> str:
    """End a spoken part with one full stop: "lack of." but "a currency." (not "..") and "why?"."""
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def mmlu_letter_spoken(doc: dict) -> str:
    """MMLU (letter format): the question and its four lettered options, as one utterance:
    ``<question>. A: <a>. B: <b>. C: <c>. D: <d>.``"""
    options = " ".join(f"{letter}: {_sentence(choice)}" for letter, choice in zip("ABCD", doc["choices"]))
    return f"{_sentence(doc['question'])} {options}"


def question_spoken(doc: dict) -> str:
    return doc["question"].strip()


def question_stem_spoken(doc: dict) -> str:
    return doc["question_stem"].strip()


def mmlu_letter_shown(doc: dict) -> str:
    """What the letter format's text twin shows where its speech twin has the audio."""
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}"


def voicebench_spoken(doc: dict) -> str:
    """VoiceBench's recording reads the row's ``prompt`` (its text twin shows the same text)."""
    return doc["prompt"].strip()


#: Task-name prefix -> (what the speech twin speaks, what the text twin shows in its place), most
#: specific prefix first. Every family that ``tasks/_generate.py`` writes is here (a test checks it).
FAMILIES: list[tuple[str, Callable[[dict], str], Callable[[dict], str]]] = [
    ("speech_mmlu_continuation_", question_spoken, question_spoken),
    ("speech_mmlu_", mmlu_letter_spoken, mmlu_letter_shown),
    ("speech_arc_", question_spoken, question_spoken),
    ("speech_openbookqa", question_stem_spoken, question_stem_spoken),
    ("speech_sciq", question_spoken, question_spoken),
    ("speech_voicebench_", voicebench_spoken, voicebench_spoken),
]


#: pair -> {"spoken_text": field or Jinja template, "language": tag}, as a task's metadata declares
#: them (``own_tasks`` declares every task lm-eval builds): a user's own pair is a family too.
DECLARED: dict[str, dict] = {}


def declare(pair: str, spoken_text: str | None = None, language: str | None = None) -> None:
    entry = DECLARED.setdefault(pair, {})
    if spoken_text:
        entry["spoken_text"] = str(spoken_text)
    if language:
        entry["language"] = str(language)


def declared_language(task_name: str | None) -> str:
    """The language a task declares (``metadata.language`` of either twin); English when none does."""
    return DECLARED.get(twin_of(task_name).pair, {}).get("language", "en")


def _declared_text(spec: str, doc: dict) -> str:
    if "{{" in spec or "{%" in spec:
        from lm_eval.utils import apply_template

        return apply_template(spec, doc).strip()
    if spec not in doc:
        raise KeyError(f"metadata.spoken_text names the field {spec!r}, which the doc does not have "
                       f"(fields: {sorted(doc)})")
    return str(doc[spec]).strip()


def _family(task_name: str | None):
    for family in FAMILIES:
        if (task_name or "").startswith(family[0]):
            return family
    spec = DECLARED.get(twin_of(task_name).pair, {}).get("spoken_text")
    if spec is not None:
        read = functools.partial(_declared_text, spec)
        return (twin_of(task_name).pair, read, read)
    return None


def has_spoken_text(task_name: str | None) -> bool:
    return _family(task_name) is not None


def no_spoken_text(task_name: str | None) -> str:
    """Why a task has no spoken text, said precisely (for capture, the report and interventions)."""
    return (f"{twin_of(task_name).pair} declares no spoken text: add `spoken_text: <doc field or Jinja template>` "
            "(what the text twin shows where the speech twin has its audio, e.g. the question or the "
            "recording's transcript) to the metadata of its task YAMLs")


def spoken_text(task_name: str | None, doc) -> str | None:
    """What the speech twin of ``task_name`` speaks for ``doc`` (None for a task of no known family)."""
    family = _family(task_name)
    return None if family is None or not isinstance(doc, dict) else family[1](doc)


def text_counterpart(task_name: str | None, doc) -> str | None:
    """The text twin's rendering of the spoken text (the letter format shows its options on lines
    of their own, ``A. x``, where the audio says ``A: x.``): its states are the text side of every
    similarity, alignment and oracle intervention."""
    family = _family(task_name)
    return None if family is None or not isinstance(doc, dict) else family[2](doc)
