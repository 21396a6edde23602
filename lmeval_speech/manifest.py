"""Owns the run manifest: the one record of what a run measured, written next to lm-eval's results.

``manifest_<date id>.json`` (same date id as ``results_<date id>.json``) holds the model's identity
(path or hub id, revision, backend, dtype, device, config and adapter SHA-256, as ``lslm`` reported
it through ``get_model_info``), the model args and settings, the capture and intervention specs (each with its use of the hook protocol: read/edit, hidden-state
indices, positions rule and each index's site, see ``hooks.HookSpec``),
the chat template, and for every twin task its pair, modality, prompt, effective audio spec (the
task's TTS spec after the model's ``tts_*`` overrides, or the recorded-audio source) and its
per-item failures and truncations (from the sample log, which lm-eval gathers from every rank).
``report``, ``compare`` and ``check`` read settings from here instead of re-deriving them.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmeval_speech.fileio import atomic_write_json

SCHEMA_VERSION = 1
#: The model args that re-voice every speech twin, and the TTS field each sets.
TTS_OVERRIDES = {"tts_engine": "engine", "tts_voice": "voice", "tts_rate": "rate"}
#: Prompt settings of a task config that change what the model reads.
PROMPT_KEYS = ("description", "target_delimiter", "fewshot_delimiter", "doc_to_choice")
#: Run-level chat settings lm-eval records.
CHAT_KEYS = ("system_instruction", "chat_template", "fewshot_as_multiturn")


def _audio_spec(meta: dict, tts_override: dict | None) -> dict | None:
    from lmeval_speech.audio import TTSSpec

    if meta.get("tts"):
        try:
            spec = TTSSpec.from_dict(meta["tts"]).with_overrides(**(tts_override or {})).to_dict()
        except ValueError:  # an engine this install does not know: the recorded fields as they are
            spec = {**meta["tts"], **(tts_override or {})}
        return {"tts": spec, "spoken": meta.get("spoken")}
    if meta.get("recorded_audio"):
        return {"recorded": meta["recorded_audio"]}
    return None


def build_manifest(run: dict) -> dict:
    """The manifest of a run loaded by ``runs.load_run``."""
    from lmeval_speech.runs import logged_flags, parse_model_args

    results = run["results"]
    config = results.get("config") or {}
    ours = config.get("lmeval_speech") or {}
    settings = ours.get("settings") or {}
    model_args = parse_model_args(run["model_args"])
    # lslm reports its effective override; a run it did not describe falls back to its model args
    tts_override = settings.get("tts_override") if "tts_override" in settings else \
        {field: model_args[key] for key, field in TTS_OVERRIDES.items() if model_args.get(key)} or None
    n_shot = results.get("n-shot") or {}
    tasks = {}
    for task, info in run["tasks"].items():
        meta = info["config"].get("metadata") or {}
        failures, truncations = {}, {}
        for row in info["samples"]:
            failed, truncated = logged_flags(row)
            if failed:
                failures[str(row["doc_id"])] = failed
            if truncated:
                truncations[str(row["doc_id"])] = truncated
        tasks[task] = {
            "pair": info["pair"], "modality": info["modality"],
            "prompt": info["config"].get("doc_to_text"), "speech_prompt": meta.get("prompt"),
            **{k: info["config"].get(k) for k in PROMPT_KEYS},
            "n_shot": n_shot.get(task, info["config"].get("num_fewshot")),
            "audio": _audio_spec(meta, tts_override) if info["modality"] not in ("text",) else None,
            "n_samples": (results.get("n-samples") or {}).get(task),
            "failures": failures, "truncations": truncations,
        }
    model = ours.get("model") or {"pretrained": model_args.get("pretrained"), "backend": None,
                                  "note": "not written by lslm: model identity unknown"}
    return {
        "schema_version": SCHEMA_VERSION,
        "results_file": run["results_file"], "timestamp": run["timestamp"],
        "lm_eval_version": results.get("lm_eval_version"), "model_name": config.get("model"),
        "model": model, "model_args": model_args, "settings": settings, "conditions": ours.get("conditions"),
        "hooks": ours.get("hooks") or {"capture": None, "intervention": None},
        "chat_template": {"applied": bool(results.get("chat_template")),
                          "sha": results.get("chat_template_sha"),
                          "system_instruction_sha": results.get("system_instruction_sha")},
        "chat": {k: results.get(k) for k in CHAT_KEYS},
        "limit": config.get("limit"),
        "tasks": tasks,
    }


def manifest_path(run: dict) -> Path:
    return Path(run["dir"]) / f"manifest_{run['timestamp']}.json"


def write_manifest(run: dict, manifest: dict | None = None) -> dict:
    """Write (atomically) the manifest of ``run``, built here unless given (a report has built it once
    already); returns it with its ``path``."""
    manifest = build_manifest(run) if manifest is None else {k: v for k, v in manifest.items() if k != "path"}
    path = manifest_path(run)
    atomic_write_json(path, manifest)
    return {**manifest, "path": str(path)}


def load_manifest(run_dir) -> dict:
    """The manifest of the latest run in RUN_DIR (written from its results and samples if absent)."""
    from lmeval_speech.runs import load_run

    run = load_run(run_dir)
    path = manifest_path(run)
    if path.exists():
        return {**json.loads(path.read_text(encoding="utf-8")), "path": str(path)}
    return write_manifest(run)
