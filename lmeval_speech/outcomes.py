"""Owns how an item whose audio failed or was cut reaches lm-eval's results: never as a score.

``lslm`` returns, for such an item, a log-likelihood that is a :class:`Scored` float: NaN with the
failure's reason for a failed audio, the real value with a truncation note for a cut one. The
marks travel with the value through lm-eval's filters, its ``--use_cache`` database (pickled by
lm-eval itself) and the sample log, so the tasks' ``process_results`` (made here) can leave failed
items out of the accuracy, and every task reports two counts, ``audio_failed`` and
``audio_truncated``, in the results JSON and per row in ``--log_samples`` files.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: The per-item fields (and aggregated counts) every paired task reports.
FLAG_METRICS = ("audio_failed", "audio_truncated")


class Scored(float):
    """A float carrying what happened to its item's audio (``failed`` reason, ``truncated`` note,
    and for a cascade twin the ASR ``transcript`` that was read instead of the audio)."""

    failed: str
    truncated: str
    transcript: str

    def __new__(cls, value: float, failed: str = "", truncated: str = "", transcript: str = ""):
        obj = super().__new__(cls, value)
        obj.failed, obj.truncated, obj.transcript = failed, truncated, transcript
        return obj

    def __repr__(self) -> str:
        return f"Scored({float(self)!r}, failed={self.failed!r}, truncated={self.truncated!r})"


class ScoredText(str):
    """A generation carrying the same marks (a failed audio generates nothing, and says why; a cascade
    twin's generation carries the ASR ``transcript`` its prompt held instead of the audio)."""

    failed: str
    truncated: str
    transcript: str

    def __new__(cls, value: str, failed: str = "", truncated: str = "", transcript: str = ""):
        obj = super().__new__(cls, value)
        obj.failed, obj.truncated, obj.transcript = failed, truncated, transcript
        return obj


def failed(reason: str) -> tuple[float, bool]:
    return (Scored(math.nan, failed=reason), False)


def flags(results) -> dict[str, str]:
    """``{"audio_failed": reason or "", "audio_truncated": note or ""}`` over one item's results."""
    out = dict.fromkeys(FLAG_METRICS, "")
    for r in results:
        value = r[0] if isinstance(r, tuple) else r
        out["audio_failed"] = out["audio_failed"] or getattr(value, "failed", "")
        out["audio_truncated"] = out["audio_truncated"] or getattr(value, "truncated", "")
        if isinstance(value, float) and math.isnan(value) and not out["audio_failed"]:
            out["audio_failed"] = "not scored (NaN log-likelihood)"
    return out


def count_flagged(values) -> int:
    """Aggregation of a flag field: how many items carry a non-empty reason."""
    return int(sum(1 for v in values if v))


def mc_results(gold: Callable[[dict], int], choices: Callable[[dict], list], norm: bool,
               spoken: Callable[[dict], str] | None = None) -> Callable:
    """A multiple-choice ``process_results``: lm-eval's ``acc`` (and ``acc_norm``), except that an
    item whose audio failed gets no accuracy at all (so it is neither right nor wrong) and is counted.
    With ``spoken`` (a cascade twin) it also reports the ASR transcript and its word error rate
    against what was spoken (``asr_wer``)."""

    def process_results(doc: dict, results) -> dict:
        out = flags(results)
        if spoken is not None:
            from lmeval_speech.audio.asr import word_error_rate

            transcript = next((getattr(r[0], "transcript", "") for r in results), "")
            out["asr_transcript"] = transcript
            if not out["audio_failed"]:
                out["asr_wer"] = word_error_rate(spoken(doc), transcript)
        if out["audio_failed"]:
            return out
        lls = np.array([float(r[0]) for r in results])
        target = gold(doc)
        out["acc"] = 1.0 if int(np.argmax(lls)) == target else 0.0
        if norm:
            lengths = np.array([float(len(c)) for c in choices(doc)])
            out["acc_norm"] = 1.0 if int(np.argmax(lls / lengths)) == target else 0.0
        return out

    return process_results


def gen_cascade_results(process_results: Callable, spoken: Callable[[dict], str]) -> Callable:
    """A generation task's ``process_results`` for its cascade twin: the same scores, plus the ASR
    transcript that the prompt held (``asr_transcript``) and its word error rate against what was
    spoken (``asr_wer``, not for an item whose audio failed)."""

    def cascade_results(doc: dict, results) -> dict:
        from lmeval_speech.audio.asr import word_error_rate

        out = process_results(doc, results)
        out["asr_transcript"] = next((getattr(r, "transcript", "") for r in results), "")
        if not out["audio_failed"]:
            out["asr_wer"] = word_error_rate(spoken(doc), out["asr_transcript"])
        return out

    return cascade_results
