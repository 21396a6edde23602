"""Per-document functions of the paired tasks: what a speech twin speaks, and recorded audio.

A speech twin's prompt is its text twin's prompt with the spoken part replaced by
``lmeval_speech.AUDIO_MARKER``; the functions here give that spoken part, as lazy ``spoken()``
references (never waveforms: a 14k-item run would not fit in memory) that the model adapter
synthesizes through its cache. The YAMLs reference them by their full module path, so lm-eval
uses this imported module rather than a second copy loaded from the file's path.
"""

from __future__ import annotations

import io
import re

import datasets
import numpy as np
import soundfile as sf

from lmeval_speech.audio import spoken

# The voice every TTS speech task asks for; _generate.py writes the same spec into their metadata.
TTS = {"engine": "espeak-ng", "voice": "en-us", "rate": 160}


def _sentence(text: str) -> str:
    """End a spoken part with one full stop: "lack of." but "a currency." (not "..") and "why?"."""
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else f"{text}."


def mmlu_spoken_text(doc: dict) -> str:
    """MMLU (letter format): the question and its four lettered options, as one utterance:
    ``<question>. A: <a>. B: <b>. C: <c>. D: <d>.``"""
    options = " ".join(f"{letter}: {_sentence(choice)}" for letter, choice in zip("ABCD", doc["choices"]))
    return f"{_sentence(doc['question'])} {options}"


def mmlu_audio(doc: dict) -> list[dict]:
    return [spoken(mmlu_spoken_text(doc), **TTS)]


def question_audio(doc: dict) -> list[dict]:
    """MMLU continuation and ARC (cloze format): only the question is spoken."""
    return [spoken(doc["question"].strip(), **TTS)]


def openbookqa_audio(doc: dict) -> list[dict]:
    return [spoken(doc["question_stem"].strip(), **TTS)]


def voicebench_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Keep VoiceBench's ``audio`` column undecoded: ``datasets`` decodes Audio features through
    torchcodec, which this package does not depend on; :func:`recorded_audio` uses soundfile."""
    feature = dataset.features.get("audio")
    if isinstance(feature, datasets.Audio) and feature.decode:
        dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    return dataset


def recorded_audio(doc: dict) -> list[dict]:
    """The dataset's own recording as ``[{"array", "sampling_rate"}]`` (float32 to halve memory).

    Accepts an already decoded ``{"array", "sampling_rate"}`` (local fixtures, older ``datasets``)
    or an undecoded ``{"bytes", "path"}`` from :func:`voicebench_docs`.
    """
    audio = doc["audio"]
    if audio.get("array") is not None:
        array, rate = audio["array"], audio["sampling_rate"]
    else:
        array, rate = sf.read(io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"], dtype="float32")
    return [{"array": np.asarray(array, dtype=np.float32), "sampling_rate": int(rate)}]


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def sdqa_process_results(doc: dict, results: list[str]) -> dict:
    """SD-QA is open-ended: VoiceBench scores it with an LLM judge; offline, the closest cheap
    proxy is whether the normalized reference answer occurs in the normalized generation."""
    reference = _normalize(doc["reference"])
    return {"contains": float(bool(reference) and f" {reference} " in f" {_normalize(results[0])} ")}
