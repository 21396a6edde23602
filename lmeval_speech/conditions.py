"""Owns the list of run conditions and which guard compares each: the settings besides the model and the
prompts that change what is scored or captured (``lslm``'s ``RunRecord.conditions`` computes their values and
records them once, in the results JSON through ``get_model_info`` and in every capture dir it writes).

Every guard reads the one record and this one list: the capture store and ``--use_cache`` (a rerun must
not take another condition's states or scores), ``report`` (a capture read beside a run's scores), and
``compare`` / ``check`` (runs ranked together). A new condition is one entry here and one value in
``RunRecord.conditions`` (which refuses a key that is not listed here).
"""

from __future__ import annotations

#: condition -> whether runs of *different models* are compared on it (``compare``, ``check``); the capture
#: store, ``--use_cache`` and the report compare every condition (the same model's runs)
CONDITIONS = {
    "tts_override": False,       # compare/check compare the effective TTS spec instead (their ``tts`` aspect)
    "noise": True,
    "intervention": True,
    "spoken_form": True,         # the rules that rewrite TTS texts: another version heard other audio
    "audio_overflow": False,     # what happens past the audio limit: its items are flagged in each run
    "max_audio_seconds": False,  # the model's own limit unless lowered: differs between models by design
    "max_length": False,         # resolved from each model's config
    "add_bos_token": False,      # a model's tokenizer convention
    "prefix_token_id": False,
}
GUARDS = {"capture": tuple(CONDITIONS), "use_cache": tuple(CONDITIONS), "report": tuple(CONDITIONS),
          "compare": tuple(k for k, across_models in CONDITIONS.items() if across_models)}


def check_listed(conditions: dict) -> dict:
    """``conditions`` as recorded, refused when a key is not in ``CONDITIONS`` (or one is missing): a new
    condition must say which guards compare it."""
    if set(conditions) != set(CONDITIONS):
        raise KeyError(f"run conditions {sorted(set(conditions) ^ set(CONDITIONS))} are not listed in "
                       "lmeval_speech/conditions.py CONDITIONS (or listed but not recorded)")
    return conditions


def for_guard(conditions: dict, guard: str) -> dict:
    """The conditions one guard compares (those ``conditions`` records)."""
    return {k: conditions[k] for k in GUARDS[guard] if k in conditions}
