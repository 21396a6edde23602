"""Owns the list of run conditions and which guards compare each: the settings besides the model and the
prompts that change what is scored or captured (``lslm``'s ``RunRecord.conditions`` computes their values and
records them once, in the results JSON through ``get_model_info`` and in every capture dir it writes).

Every guard reads the one record: the capture store and ``--use_cache`` (a rerun must not take another
condition's states or scores) and ``report`` (a capture read beside a run's scores) compare all of it;
``compare`` / ``check`` (runs ranked together, often of different models) the conditions marked below.
A new condition is one entry here and one value in ``RunRecord.conditions`` (which refuses a key that is
not listed here).
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


def check_listed(conditions: dict) -> dict:
    """``conditions`` as recorded, refused when a key is not in ``CONDITIONS`` (or one is missing): a new
    condition must say whether runs of different models are compared on it."""
    if set(conditions) != set(CONDITIONS):
        raise KeyError(f"run conditions {sorted(set(conditions) ^ set(CONDITIONS))} are not listed in "
                       "lmeval_speech/conditions.py CONDITIONS (or listed but not recorded)")
    return conditions


def across_models(conditions: dict) -> dict:
    """The conditions ``compare`` and ``check`` compare between runs (those ``conditions`` records); the
    same-model guards (capture store, ``--use_cache``, report) compare the whole record."""
    return {k: v for k, v in conditions.items() if CONDITIONS.get(k)}
