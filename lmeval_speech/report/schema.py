"""Owns the report format: ``report.json``'s documented schema, its version, and strict-JSON I/O.

The report is made by ``report.compute`` (one pass over a run, returning the dict below), rendered
by ``report.render`` (markdown and plots) and read by ``compare`` and ``check``.

The command is ``lmeval-speech report RUN_DIR`` (``report/report.py``).

``report.json`` schema (version 2: adds ``logit_lens``, the decomposition's ``recovery`` and
``speech_cascade_kappa``). Keys are only ever added within a version; ``null`` stands for
a value that is undefined (nan: a constant input, fewer than 3 items, ...) or a section left out.

==================  ===========================================================================
key                 content
==================  ===========================================================================
schema_version      2
run                 ``results_file``, ``samples_files`` {task: path}, ``timestamp`` (lm-eval's
                    date id), ``date`` (unix start time), ``capture_dir``, ``model``,
                    ``model_args`` (as recorded), ``model_args_parsed``, ``limit``,
                    ``lm_eval_version``, ``tasks`` {task: {pair, modality, doc_to_text,
                    n_samples, and for speech twins prompt, tts / spoken or recorded_audio}},
                    ``unpaired_tasks`` (tasks without a twin, not scored). ``compare`` diffs
                    ``model_args``/``tasks`` to flag runs that are not comparable.
overall             ``paired_gap`` over all paired items pooled: n, text_acc, speech_acc,
                    text_stderr, speech_stderr, gap, gap_stderr, ci_low, ci_high (paired
                    bootstrap, percentile), n_boot, alpha, seed, mcnemar {method, statistic, p,
                    discordant}, table {both_right, text_only, speech_only, both_wrong}; plus
                    n_pairs, ``weighted_mean`` {text_acc, speech_acc, gap} (pairs weighted by
                    size: lm-eval's ``weight_by_size`` group score, equal to the pooled values by
                    construction) and ``macro_mean`` {text_acc, speech_acc, gap} (each pair once);
                    ``metric`` (the per-item score pooled; pairs scored by different metrics are
                    never pooled together: this row is the headline metric's, acc first),
                    ``pairs_pooled`` and ``by_metric`` {metric: the same fields for the pairs of
                    each other metric} (null when every pair has one metric).
pairs               {pair: paired_gap fields as in ``overall`` plus text_task, speech_task,
                    metric (per-item score used, e.g. acc), filter, ``similarity`` {S_cos, S_euc,
                    n_items} and ``alignment`` {aps, monotonicity, n_items} (null when absent)}
similarity          pooled states, all captured items: layers (hidden-state indices, 0 =
                    embeddings), cosine_mean, cosine_std, euclidean_mean, euclidean_std (per
                    layer, mean and population std over items), S_cos, S_euc (means over
                    layers), n_items, excluded_non_finite (items left out because a twin's
                    captured states hold NaN/inf; also in notes). null without a capture.
reference           the similarity items' baselines (report/reference.py): seed, derangement [[pair,
                    doc_id, mismatched doc_id]] (a seeded derangement within each pair), mean_from,
                    n_items, sampled_from (the item count when a seeded sample of 1,000 was used,
                    else null), per_layer {layers, cosine_own, cosine_mismatched, euclidean_own,
                    euclidean_mismatched, centered_cosine_own, centered_cosine_mismatched (the mean
                    state per layer over both modalities subtracted first), cka, cka_mismatched
                    (linear CKA of speech vs text pooled states across items; mismatched: the text
                    states of a derangement)}, S_cos, S_euc, S_cos_centered, aps (each {own,
                    mismatched, difference, ci_low, ci_high, n}: means over layers per item, own -
                    mismatched with a paired bootstrap CI; aps over token-captured items, null with
                    fewer than 2, also layers, per_layer_own, per_layer_mismatched), cka_items (items in CKA, a seeded sample of at most 256),
                    cross_layer_cka [speech layer][text layer]. null without a capture.
logit_lens          (report/lens.py) per hidden-state index of the token-captured items: layers, k [1, 10],
                    speech {top1, top10, mean_rank, median_rank, n_tokens} (lists per layer: the share
                    of the question's tokens ranked top-1 / top-10 by the lens at the speech position
                    the argmax path aligns to them; ranks 0 = top, capped at 1000), text {the same at each token's own
                    position: the reference row}, chance {top1, top10} (k / vocab_size), vocab_size,
                    n_items, excluded {reason: count}, path, best_speech_layer {layer, top1, ...}.
                    null without lens ranks (capture=tokens writes them).
alignment           token states: measure, path, aps (mean over items of the item APS), aps_per_layer,
                    layers (token-level hidden-state indices), monotonicity (mean over items of
                    the Spearman rho of the path, averaged over layers; a path that maps every word
                    to one speech position has none and is left out: monotonicity_undefined counts
                    them, and a note says so), n_items, excluded_non_finite
                    (items left out for NaN/inf pooled or token states), and ``item``
                    {pair, doc_id, chosen_by, layer, aps, n_speech, n_text, critical_tokens
                    [{layer, positions (Bottom-3 speech positions, worst first), scores,
                    text_tokens (text indices aligned to each)}], plot}. With --measure
                    euclidean, A and so APS are *negative* distances. null without token states.
correlation         does closeness predict a speech-only error (text right, speech wrong)? target,
                    n_items, n_speech_only_errors, and per available value (cosine = item mean
                    over layers, euclidean = item mean distance, aps, and the baseline-corrected
                    centered_cosine and cosine_minus_mismatched) {point_biserial {r, p, n, note,
                    n_for_80pct_power (items an r of this size needs for p < 0.05 with 80% power)},
                    logistic {coef, intercept, se, z, p, n, note}}. null without capture.
items               one row per paired item: pair, doc_id, target, text_correct, speech_correct,
                    speech_only_error, cosine, euclidean, aps, monotonicity (null if not captured);
                    with token states also bottom3 (the Bottom-3 speech positions at the deepest token
                    layer, worst first), bottom3_layer and n_speech (the item's speech positions);
                    with a reference section also centered_cosine and cosine_minus_mismatched
                    (the item's own cosine minus its mismatched pair's; means over hidden states)
controls            {pair: {shuffled|silence: {control_task, n, speech_acc, control_acc, hearing
                    (= speech_acc - control_acc), ci_low, ci_high, mcnemar_p, excluded, metric}}},
                    or null when the run has no prior-control twin; with more than one pair of the
                    headline metric (acc first), also the key "overall (pooled)": those pairs' items
                    together (control_task null)
decomposition       {pair: {n, metric, base_text_acc, forgetting, base_gap (with --base, else null),
                    text_acc, cascade_acc, speech_acc, recognition, misalignment,
                    gap (each {gap, ci_low, ci_high, p}; recognition + misalignment = gap exactly, on
                    the items valid in text, cascade and speech), hearing (the shuffled control's
                    {hearing, ci_low, ci_high, n}, or null; the pooled row's over the shuffled twins of
                    the pairs it pools, null when one of them has none), recovery_rate (speech / text), recovery {rate, ci_low, ci_high, n, ...}
                    (its paired bootstrap CI), speech_cascade_kappa {kappa, ci_low, ci_high, agreement,
                    n, ...} (Cohen's kappa of the options the speech and cascade twins chose; null for
                    a metric other than acc/acc_norm), asr_wer_mean, wer_vs_speech_only_error
                    (point-biserial)}}, or null when the run has no cascade twin; with more than one
                    pair of the headline metric, also "overall (pooled)": those pairs' valid items
                    together (forgetting only when each has its base run; pairs of another metric
                    are never pooled in, a note names them)
voicebench          VoiceBench's Overall of the paper's five subsets (``report/voicebench.py``, formula
                    and source there; each term a mean over the items valid in both twins of its pair,
                    from the sample log, not lm-eval's per-twin aggregates): formula, source, subsets {advbench, ifeval, openbookqa, mmsu,
                    sdqa, ifeval_loose: {text, speech, gap}} (0..100, null where the run lacks it;
                    plus openbookqa_gen, mmsu_gen when the run has the generate-then-extract ``*_gen``
                    pairs), overall {text, speech, gap} (null unless all five are there in both
                    twins), missing, overall_gen (the same mean with the ``_gen`` terms for openbookqa
                    and mmsu; null unless all five are there); null when the run has none of the
                    suite's tasks
manifest            the run manifest (``lmeval_speech/manifest.py``: model identity, settings, hooks,
                    chat, per task pair, modality, prompt settings, effective audio spec, failures
                    and truncations) and its ``path``; ``compare`` and ``check`` read settings here
files               report_md and plots {gap, layers, alignment} (file names in --out)
notes               list of strings: sections left out and why, data problems found
==================  ===========================================================================
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 2
N_CRITICAL = 3
#: the key of the every-pair row in ``controls`` and ``decomposition``
POOLED = "overall (pooled)"
GAP_FIELDS = ("text_acc", "speech_acc", "gap")


def jsonable(obj):
    """numpy -> Python, and nan/inf -> null so the file is strict JSON any parser reads."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def read_report(path) -> dict:
    """A report.json of this schema version (an older one is refused with what to do)."""
    path = Path(path)
    rep = json.loads(path.read_text(encoding="utf-8"))
    if rep.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: report schema_version {rep.get('schema_version')!r}, this version reads "
                         f"{SCHEMA_VERSION} (rebuild it with lmeval-speech report)")
    return rep


def dumps(obj) -> str:
    """Strict JSON (nan/inf as null) of a report or anything made of its values."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
