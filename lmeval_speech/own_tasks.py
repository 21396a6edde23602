"""Owns what makes any task run by lm-eval a first-class twin, a user's own YAML included: failed
items never scored whatever its ``process_results``, the flag metrics counted without metric lines,
and the spoken text and language its ``metadata`` declares (read by ``twins``).

lm-eval's default ``multiple_choice`` scoring takes ``argmax`` of the log-likelihoods: a failed audio's
NaNs made choice 0 "right". The package's own tasks avoid it in their ``process_results``
(``outcomes.mc_results``); this module gives every lm-eval ``ConfigurableTask`` the same rule by
wrapping three of its methods once, at lm-eval's start-up (``registration.patch_task_manager``):

* ``process_results``: an item any of whose responses carries a failure (``outcomes.flags``: a
  ``Scored`` NaN with its reason, or a plain NaN) returns only the two flag counts (or, from a
  ``process_results`` that counts failures itself, its own fields), so it is neither right nor wrong
  in lm-eval's table and is counted in ``audio_failed``; a scored item of a speech
  twin (a task with ``doc_to_audio``) gets the flags beside its metrics.
* ``aggregation`` / ``higher_is_better``: ``audio_failed`` and ``audio_truncated`` are counted
  (``outcomes.count_flagged``) even when the YAML lists no metric line for them (lm-eval averaged the
  reason strings: a ``TypeError``); a task without audio reports them only when one of its items is marked
  (a text twin cut to ``max_length``), so a plain lm-eval task's results are unchanged.
* ``__init__``: a task's ``metadata.spoken_text`` (a doc field or a Jinja template: what the text twin
  shows where the speech twin has its audio) and ``metadata.language`` (default ``en``) are declared
  to ``twins`` under the task's pair, so capture, APS and oracle interventions find the text twin's
  question tokens, and a TTS voice of another language is refused (``check_voice_language``).
"""

from __future__ import annotations

import functools
import os

from lmeval_speech import twins
from lmeval_speech.outcomes import FLAG_METRICS, count_flagged, flags


def _declare(task) -> None:
    meta = dict(getattr(task.config, "metadata", None) or {})
    name = getattr(task.config, "task", None)
    if not name:
        return
    twins.declare(twins.twin_of(name).pair, spoken_text=meta.get("spoken_text"), language=meta.get("language"))


def _is_speech(task) -> bool:
    return getattr(task.config, "doc_to_audio", None) is not None


def patch(task_module) -> None:
    """Wrap ``ConfigurableTask`` of lm-eval's ``lm_eval.api.task`` (idempotent)."""
    cls = task_module.ConfigurableTask
    if getattr(cls.process_results, "_lmeval_speech", False):
        return
    init, process, aggregation, hib = cls.__init__, cls.process_results, cls.aggregation, cls.higher_is_better

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _declare(self)

    @functools.wraps(process)
    def process_results(self, doc, results):
        marks = flags(results)
        if marks["audio_failed"]:  # not scored: neither right nor wrong, counted
            if not callable(getattr(self.config, "process_results", None)):
                return marks  # lm-eval's default scoring would take argmax of the NaNs
            try:  # a process_results that counts failures itself (the package's) keeps its extra fields
                out = process(self, doc, results)
            except Exception:  # noqa: BLE001 -- one written for scored items only: the item is still counted
                return marks
            return out if isinstance(out, dict) and out.get("audio_failed") else marks
        out = process(self, doc, results)
        if isinstance(out, dict) and (_is_speech(self) or any(marks.values())):
            for key in FLAG_METRICS:
                out.setdefault(key, marks[key])
        return out

    @functools.wraps(aggregation)
    def aggregation_(self):
        return {**dict.fromkeys(FLAG_METRICS, count_flagged), **aggregation(self)}

    @functools.wraps(hib)
    def higher_is_better_(self):  # into the results JSON: only a speech twin's (a plain lm-eval task's stays as it was)
        return {**dict.fromkeys(FLAG_METRICS, False), **hib(self)} if _is_speech(self) else hib(self)

    process_results._lmeval_speech = True
    cls.__init__, cls.process_results = __init__, process_results
    cls.aggregation, cls.higher_is_better = aggregation_, higher_is_better_


def voice_language(voice: str) -> str:
    """The language of a TTS voice name: espeak-ng ``en-us``/``en-gb-x-rp``/``ja``/``en-us+f3`` and
    Piper ``en_US-joe-medium`` give ``en``, ``ja``, ``fr``...; an mbrola ``mb-fr1`` gives ``mb``, which
    matches nothing, so it needs the same opt-in."""
    return os.path.basename(voice).split("+")[0].replace("_", "-").split("-")[0].lower()


def check_voice_language(voice: str | None, task_names, allow: bool) -> None:
    """Refuse ``tts_voice`` whose language is not the language of a task it re-voices (``metadata.language``,
    English by default): espeak-ng's ``ja`` reads English text letter by letter, exit 0."""
    if not voice or allow:
        return
    spoken = voice_language(voice)
    for name in sorted(set(task_names)):
        lang = twins.declared_language(name)
        if lang.split("-")[0].lower() != spoken:
            raise ValueError(f"tts_voice={voice} speaks {spoken!r}, but task {name} is in {lang!r} "
                             f"(its metadata.language; English when it declares none): a voice reads text of "
                             f"another language letter by letter or with its own phonetics. Pass "
                             f"voice_language=any to run it anyway, or declare the task's language")
