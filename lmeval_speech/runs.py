"""Owns reading a finished run: one ``lm_eval --output_path OUT --log_samples`` run loaded into plain
dicts, its twins paired item by item (below the manifest and every reporter, importing neither).

lm-eval writes ``OUT/<model_name_sanitized>/results_<date_id>.json`` and, per leaf task,
``samples_<task>_<date_id>.jsonl`` with the same ``date_id`` (see lm-eval's
``loggers/evaluation_tracker.py``). A folder can hold several runs, so the latest results file is
used with the samples files of *its* timestamp, never a mix.

The gap is a *paired* statistic, so a pair whose text and speech twins do not hold exactly the
same items (doc ids and targets) is refused with :class:`UnpairedError` instead of being scored.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from lmeval_speech import twins
from lmeval_speech.outcomes import FLAG_METRICS

#: The per-item score used for the gap when a task logs several: accuracy first, then the
#: binary scores of the generation twins, then whatever the task lists first.
PREFERRED_METRICS = ("acc", "exact_match", "contains_proxy", "contains", "prompt_level_strict_acc")
_MAX_LISTED = 10
#: Per-item fields a cascade twin logs beside its score: never the score (an ASR transcript, its WER).
NOT_SCORES = ("asr_transcript", "asr_wer")


class UnpairedError(ValueError):
    """The text and speech twins of a pair do not score the same items."""


def _timestamp(path: Path) -> str:
    """lm-eval's ``get_file_datetime``: the text after the last ``_`` (ISO time, ``:`` -> ``-``)."""
    return path.name[path.name.rfind("_") + 1:].removesuffix(".jsonl").removesuffix(".json")


def find_results_file(run_dir) -> Path:
    """The latest ``results_*.json`` for RUN_DIR: ``OUT``, ``OUT/<model>`` or the file itself."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    found = sorted(run_dir.glob("results_*.json"))
    if not found:
        found = sorted(run_dir.glob("*/results_*.json"))
        models = sorted({p.parent.name for p in found})
        if len(models) > 1:
            raise ValueError(f"{run_dir} holds runs of several models {models}: pass one of "
                             f"{[str(run_dir / m) for m in models]}")
    if not found:
        raise FileNotFoundError(f"no lm-eval results_*.json in {run_dir} or its model folders "
                                "(run lm_eval with --output_path and --log_samples)")
    return max(found, key=_timestamp)


def relative_capture_dir(capture: str, run_dir) -> str | Path:
    """A relative ``capture_dir`` of a run's model_args, from the current folder, else from the folder
    the run's results are under or one above it (``lm_eval`` ran there); found nowhere: refused."""
    if Path(capture).is_dir() or Path(capture).is_absolute():
        return capture
    above = [p / capture for p in Path(run_dir).resolve().parents if (p / capture).is_dir()]
    if not above:
        raise FileNotFoundError(f"capture_dir={capture} (relative, from the run's model_args) is neither under the "
                                f"current folder nor under a folder above the results {run_dir}: pass --capture DIR "
                                "(nothing written)")
    return above[0]


def parse_model_args(model_args) -> dict:
    """lm-eval's ``--model_args`` as a dict (recorded as ``a=1,b=x`` or as a dict), parsed by
    lm-eval's own ``simple_parse_args_string`` (values stay strings where lm-eval keeps them)."""
    if isinstance(model_args, dict):
        return dict(model_args)
    from lm_eval.utils import simple_parse_args_string

    return {k: v if isinstance(v, str) else str(v) for k, v in simple_parse_args_string(str(model_args or "")).items()}


def _twin(task: str, config: dict) -> tuple[str, str] | None:
    """(pair, modality) from the task config's metadata (written by tasks/_generate.py), else from
    the ``_text``/``_speech`` name (``twins.twin_of``); None for a task that is no twin."""
    meta = config.get("metadata") or {}
    if meta.get("pair") and meta.get("modality") in twins.ALL_TWINS:
        return meta["pair"], meta["modality"]
    if task.endswith(tuple(f"_{m}" for m in twins.ALL_TWINS)):
        twin = twins.twin_of(task)
        return twin.pair, twin.modality
    return None


def _read_samples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(run_dir) -> dict:
    """Results, configs and samples of the latest run in RUN_DIR, grouped into twin pairs.

    Returns ``{"results_file", "dir", "timestamp", "results", "model_args", "tasks", "pairs",
    "unpaired"}``: ``tasks[task] = {"config", "pair", "modality", "samples_file", "samples"}``,
    ``pairs[pair] = {"text": task, "speech": task}`` (sorted by pair name) and ``unpaired`` the
    tasks that have no twin in this run (reported, not scored).
    """
    results_file = find_results_file(run_dir)
    results = json.loads(results_file.read_text(encoding="utf-8"))
    stamp = _timestamp(results_file)
    folder = results_file.parent
    tasks, twins = {}, {}
    for task, config in sorted((results.get("configs") or {}).items()):
        twin = _twin(task, config)
        if twin is None:
            continue
        samples_file = folder / f"samples_{task}_{stamp}.jsonl"
        if not samples_file.exists():
            raise FileNotFoundError(f"{samples_file} is missing: the report needs per-item scores, "
                                    "so run lm_eval with --log_samples")
        tasks[task] = {"config": config, "pair": twin[0], "modality": twin[1],
                       "samples_file": str(samples_file), "samples": _read_samples(samples_file)}
        claimed = twins.setdefault(twin[0], {})
        if twin[1] in claimed:  # e.g. a copied YAML renamed but for its metadata: one of them would vanish
            raise ValueError(f"tasks {claimed[twin[1]]} and {task} both claim to be the {twin[1]} twin of pair "
                             f"{twin[0]!r} (metadata.pair / modality): give each task its own pair")
        claimed[twin[1]] = task
    pairs = {p: t for p, t in sorted(twins.items()) if {"text", "speech"} <= set(t)}
    unpaired = sorted(task for p, t in twins.items() if p not in pairs for task in t.values())
    config = results.get("config") or {}
    return {"results_file": str(results_file), "dir": str(folder), "timestamp": stamp,
            "results": results, "model_args": config.get("model_args"), "tasks": tasks,
            "pairs": pairs, "unpaired": unpaired}


def run_settings(run: dict) -> dict:
    """What must match for two runs to be comparable: model args, prompts and TTS specs.

    Per task: its ``doc_to_text`` and the speech metadata (``prompt``, ``tts``, ``spoken`` or
    ``recorded_audio``); per run: model args, ``limit`` and item counts. ``compare`` diffs these.
    """
    results = run["results"]
    config = results.get("config") or {}
    tasks = {}
    for task, info in run["tasks"].items():
        meta = info["config"].get("metadata") or {}
        tasks[task] = {"pair": info["pair"], "modality": info["modality"],
                       "doc_to_text": info["config"].get("doc_to_text"),
                       "n_samples": (results.get("n-samples") or {}).get(task),
                       **{k: meta[k] for k in ("prompt", "tts", "spoken", "recorded_audio") if k in meta}}
    return {"model": config.get("model"), "model_args": run["model_args"],
            "model_args_parsed": parse_model_args(run["model_args"]), "limit": config.get("limit"),
            "lm_eval_version": results.get("lm_eval_version"), "tasks": tasks}


def _choose(rows: list[dict], task: str) -> tuple[str, str, list[dict]]:
    """(filter, metric, rows of that filter): lm-eval logs one row per doc per filter."""
    filters = list(dict.fromkeys(r.get("filter", "none") for r in rows))
    flt = "none" if "none" in filters else filters[0]
    rows = [r for r in rows if r.get("filter", "none") == flt]
    # an item that was not scored lists only its flags: take the metrics any row lists
    listed = [m for m in dict.fromkeys(m for r in rows for m in r.get("metrics", []))
              if m not in FLAG_METRICS and m not in NOT_SCORES]
    candidates = [m for m in PREFERRED_METRICS if m in listed] + listed
    if not candidates:
        if any(m in FLAG_METRICS + NOT_SCORES for r in rows for m in r.get("metrics", [])):
            return flt, None, rows  # every item failed: it lists only its flags (the twin names the metric)
        raise ValueError(f"{task}: its samples list no per-item metric")
    return flt, candidates[0], rows


def _logged_outcome(value) -> tuple[str, str] | None:
    """(failed, truncated) of one logged log-likelihood: lm-eval writes each response with ``str()``,
    so ``lslm``'s marked values read ``Scored(nan, failed='...', truncated='...')`` in ``resps``
    (parsed with ``ast``, never evaluated); a plain ``nan`` is a failure without a reason. None for
    a value that is neither (a finite number, or a generation's text)."""
    text = str(value).strip()
    if text.lower() in ("nan", "-nan"):
        return "not scored (NaN log-likelihood)", ""
    if not text.startswith("Scored("):
        return None
    try:
        call = ast.parse(text, mode="eval").body
        if not isinstance(call, ast.Call) or len(call.args) != 1:
            return None
        fields = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except Exception:  # noqa: BLE001 (anything not our repr is not a mark)
        return None
    failed = str(fields.get("failed") or "")
    if not failed and isinstance(call.args[0], ast.Name) and call.args[0].id == "nan":
        failed = "not scored (NaN log-likelihood)"
    return failed, str(fields.get("truncated") or "")


def logged_flags(row: dict) -> tuple[str, str]:
    """(audio_failed, audio_truncated) of one sample row: its own flag fields, else what its logged
    log-likelihoods carry. A task whose ``process_results`` is not this package's (a user's YAML
    with lm-eval's default multiple-choice scoring) logs no flags and scores a failed item as
    choice 0 (``argmax`` of NaNs): its responses still say the item failed."""
    failed, truncated = str(row.get("audio_failed") or ""), str(row.get("audio_truncated") or "")
    for per_choice in row.get("resps") or []:
        for resp in per_choice if isinstance(per_choice, list) else [per_choice]:
            if not (isinstance(resp, (list, tuple)) and resp):
                continue  # a generation's text: never read as a mark (its task logs the flags, or is refused)
            outcome = _logged_outcome(resp[0])  # a log-likelihood: (value, is_greedy)
            if outcome is not None:
                failed, truncated = failed or outcome[0], truncated or outcome[1]
    return failed, truncated


def _logged_value(value) -> float:
    """A logged log-likelihood as a number: a plain float, or the value inside ``lslm``'s mark
    ``Scored(-12.3, failed='', truncated='', ...)`` (read with ``ast``, never evaluated)."""
    text = str(value).strip()
    if not text.startswith("Scored("):
        return float(text)
    call = ast.parse(text, mode="eval").body
    arg = call.args[0]
    return float("nan") if isinstance(arg, ast.Name) else float(ast.literal_eval(arg))


def chosen_option(row: dict, metric: str) -> int | None:
    """The option a multiple-choice item's scoring chose (lm-eval's ``acc``: the largest log-likelihood;
    ``acc_norm``: the largest per character of the choice), from its logged responses; None for another
    metric, a generation, or a response that is not a finite log-likelihood."""
    if metric not in ("acc", "acc_norm"):
        return None
    try:
        lls = np.array([_logged_value(r[0]) for r in row.get("filtered_resps") or []], dtype=float)
    except (TypeError, ValueError, IndexError, SyntaxError):
        return None
    if lls.size == 0 or not np.isfinite(lls).all():
        return None
    if metric == "acc_norm":
        args = row.get("arguments") or {}
        conts = [a.get("arg_1") for a in args.values()] if isinstance(args, dict) else [a[1] for a in args]
        if len(conts) != lls.size or not all(isinstance(c, str) and c for c in conts):
            return None
        # lm-eval divides by the choice's length, without the target delimiter (" " by default)
        lls = lls / np.array([len(c.removeprefix(" ")) for c in conts], dtype=float)
    chosen = int(np.argmax(lls))
    try:  # the logged score must agree with the choice read here, else it is not this scoring's choice
        if metric in row and str(row.get("target", "")).isdigit() and \
                float(row[metric]) != float(chosen == int(row["target"])):
            return None
    except (TypeError, ValueError):
        return None
    return chosen


def _fmt_ids(ids) -> str:
    ids = sorted(ids)
    more = f" ... (+{len(ids) - _MAX_LISTED})" if len(ids) > _MAX_LISTED else ""
    return f"{ids[:_MAX_LISTED]}{more}"


def _by_doc(rows: list[dict], task: str, problems: list[str]) -> dict:
    by_doc, dup = {}, []
    for r in rows:
        if r["doc_id"] in by_doc:
            dup.append(r["doc_id"])
        by_doc[r["doc_id"]] = r
    if dup:
        problems.append(f"{task} logs doc ids more than once: {_fmt_ids(set(dup))}")
    return by_doc


def _require_counted_failures(run: dict, task: str) -> None:
    """A generation twin that hears audio must log ``audio_failed`` per item: a failed audio generates
    nothing, and a ``process_results`` that does not count it scores the empty answer as wrong
    (log-likelihood twins need no such field: their logged responses say it, see ``logged_flags``)."""
    info = run["tasks"][task]
    if info["modality"] == "text" or info["config"].get("output_type") != "generate_until":
        return
    if any("audio_failed" in r.get("metrics", []) for r in info["samples"]):
        return
    raise ValueError(
        f"{task}: a generation twin that hears audio logs no per-item audio_failed field, so an item whose "
        "audio failed (it generates nothing) would be scored as a wrong answer. Give its process_results "
        "lmeval_speech's flags: return {**lmeval_speech.outcomes.flags(results), **your_scores} (no scores "
        "when audio_failed is set) and add audio_failed / audio_truncated to metric_list with aggregation "
        "!function lmeval_speech.tasks.prompts.count_flagged (as lmeval_speech/tasks/speech_voicebench_sdqa does)")


def pair_items(run: dict, pair: str, include_truncated: bool = False, first: str = "text",
               second: str = "speech") -> dict:
    """The items of one pair valid in both twins, aligned by doc id, with each twin's 0/1 score.

    Returns ``{"pair", "text_task", "speech_task", "metric", "filter", "doc_ids", "targets",
    "text_correct", "speech_correct", "excluded", "excluded_doc_ids"}`` (arrays ordered by doc id).
    An item whose audio failed in either twin (it has no score) is left out, and so is one whose
    audio was cut unless ``include_truncated``; ``excluded`` counts them by reason. Raises
    :class:`UnpairedError` naming the first mismatches when the twins differ in item count, doc
    ids or targets.
    """
    names = run["pairs"][pair]
    text_task, speech_task = names[first], names[second]
    for task in (text_task, speech_task):
        _require_counted_failures(run, task)
    t_filter, t_metric, t_rows = _choose(run["tasks"][text_task]["samples"], text_task)
    s_filter, s_metric, s_rows = _choose(run["tasks"][speech_task]["samples"], speech_task)
    if t_metric is None or s_metric is None:  # one twin's items all failed: scored as the other's
        t_metric = s_metric = t_metric or s_metric
        if t_metric is None:
            raise ValueError(f"{pair}: no item of either twin was scored ({text_task}, {speech_task})")
    problems = []
    if (t_filter, t_metric) != (s_filter, s_metric):
        problems.append(f"the twins are scored differently: {t_metric} ({t_filter}) in text vs "
                        f"{s_metric} ({s_filter}) in speech")
    if len(t_rows) != len(s_rows):
        problems.append(f"{len(t_rows)} items in text vs {len(s_rows)} in speech")
    text, speech = _by_doc(t_rows, text_task, problems), _by_doc(s_rows, speech_task, problems)
    if only := set(text) - set(speech):
        problems.append(f"doc ids only in text: {_fmt_ids(only)}")
    if only := set(speech) - set(text):
        problems.append(f"doc ids only in speech: {_fmt_ids(only)}")
    doc_ids = sorted(set(text) & set(speech))
    differ = [d for d in doc_ids if str(text[d].get("target")) != str(speech[d].get("target"))]
    problems += [f"doc {d} target {str(text[d].get('target'))!r} (text) vs "
                 f"{str(speech[d].get('target'))!r} (speech)" for d in differ[:3]]
    if len(differ) > 3:
        problems.append(f"... {len(differ)} docs with different targets in all")
    if problems:
        raise UnpairedError(f"{pair}: text and speech twins are not paired item by item "
                            f"({text_task} vs {speech_task}): " + "; ".join(problems))

    excluded: dict[str, list] = {}
    valid = []
    for d in doc_ids:
        rows = (text[d], speech[d])
        outcome = [logged_flags(r) for r in rows]
        if any(failed or t_metric not in r for r, (failed, _) in zip(rows, outcome, strict=True)):
            excluded.setdefault("audio_failed", []).append(d)
        elif not include_truncated and any(truncated for _, truncated in outcome):
            excluded.setdefault("audio_truncated", []).append(d)
        else:
            valid.append(d)

    def scores(rows_by_doc, task):
        values = np.array([float(rows_by_doc[d][t_metric]) for d in valid])
        if not np.isin(values, (0.0, 1.0)).all():
            raise ValueError(f"{task}: per-item {t_metric} is not 0/1, so it has no paired gap")
        return values.astype(bool)

    return {"pair": pair, "text_task": text_task, "speech_task": speech_task, "metric": t_metric,
            "filter": t_filter, "doc_ids": valid, "targets": [str(text[d].get("target")) for d in valid],
            "text_correct": scores(text, text_task), "speech_correct": scores(speech, speech_task),
            "excluded": {k: len(v) for k, v in excluded.items()}, "excluded_doc_ids": excluded}


def control_items(run: dict, pair: str, control: str, include_truncated: bool = False) -> dict:
    """Speech twin vs one prior control (``shuffled`` or ``silence``) of a pair, item by item:
    ``speech_correct`` and ``control_correct`` over the items valid in both."""
    it = pair_items(run, pair, include_truncated, first="speech", second=control)
    return {**it, "speech_task": it["text_task"], "control_task": it["speech_task"], "control": control,
            "speech_correct": it["text_correct"], "control_correct": it["speech_correct"]}


def twin_rows(run: dict, pair: str, twin: str) -> dict:
    """{doc_id: sample row} of one twin of a pair (its chosen filter)."""
    task = run["pairs"][pair][twin]
    _, _, rows = _choose(run["tasks"][task]["samples"], task)
    return {r["doc_id"]: r for r in rows}
