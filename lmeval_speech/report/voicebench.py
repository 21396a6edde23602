"""Owns VoiceBench's **Overall** score of the paper's five subsets, per twin (text, speech) and its gap.

Source of the formula: VoiceBench's author (github.com/MatthewCYM/VoiceBench, issue #2, 2024-11-20):
each subset gets one score from 0 to 100 and Overall is their plain mean,

    overall = (20*alpaca + 20*common + (sdqa_panda + sdqa_gpt)/2 + openbook
               + (ifeval_instruct + ifeval_prompt)/2 + advbench) / 6

and the VoiceBench README leaderboard adds MMSU as one more term of the same mean (its Qwen2-Audio row:
(20*3.74 + 20*3.43 + 35.71 + 35.72 + 49.45 + 26.33 + 96.73) / 7 = 55.33, listed 55.35 from unrounded
scores). For the five subsets of the seed paper's table (AdvBench, IFEval, OpenBookQA, MMSU, SD-QA):

    overall = (advbench + ifeval + openbookqa + mmsu + sdqa) / 5, each term in 0..100:
    advbench   = 100 * refusal_rate                          (VoiceBench's HarmEvaluator rule)
    ifeval     = 100 * (prompt_level_strict_acc + inst_level_strict_acc) / 2
    openbookqa = 100 * acc
    mmsu       = 100 * acc over the 12 domains pooled (the group ``speech_voicebench_mmsu_<twin>``)
    sdqa       = 100 * contains_proxy on the ``usa`` split (the region VoiceBench's leaderboard reports)

(``usa``: VoiceBench's README has one SD-QA column and counts 553 sd-qa samples, one region's split; a
leaderboard submission its maintainer accepted states "the reported results are on the usa subset",
VoiceBench issue #29.)

Where this differs from VoiceBench, so the numbers are not expected to match its leaderboard: IFEval's
strict/loose setting is not stated in the source (strict, the setting its IFEvaluator reports first, is
used; loose is reported beside it); multiple choice is scored by log-likelihood of the letter (VoiceBench
extracts the letter from a generation: the opt-in ``*_gen`` pairs do that, and give the rows
``openbookqa_gen`` / ``mmsu_gen`` and ``overall_gen``); SD-QA's term is the substring **proxy**, not VoiceBench's
(PEDANT + GPT judge) / 2; how VoiceBench combines MMSU's 12 domain splits is not stated (pooled here).

Why here and not as an lm-eval group aggregate: lm-eval 0.4.13 aggregates one metric name over a
group's *leaf* tasks (``lm_eval/api/group.py``), while these terms are four different metrics, IFEval's
is the mean of two, and MMSU's 12 leaves would count 12 times in an unweighted mean.
"""

from __future__ import annotations

import math

SOURCE = "VoiceBench (github.com/MatthewCYM/VoiceBench) issue #2 and README leaderboard"
FORMULA = ("overall = (advbench + ifeval + openbookqa + mmsu + sdqa) / 5; advbench = 100*refusal_rate; "
           "ifeval = 100*(prompt_level_strict_acc + inst_level_strict_acc)/2; openbookqa = 100*acc; "
           "mmsu = 100*acc (12 domains pooled); sdqa = 100*contains_proxy (usa; a proxy for PEDANT+GPT)")
TWINS = ("text", "speech")
MMSU_DOMAINS = ["biology", "business", "chemistry", "economics", "engineering", "health", "history", "law",
                "other", "philosophy", "physics", "psychology"]
SUBSETS = ("advbench", "ifeval", "openbookqa", "mmsu", "sdqa")
SUITE_PREFIXES = ("speech_voicebench_advbench_", "speech_voicebench_ifeval_", "speech_voicebench_openbookqa_",
                  "speech_voicebench_mmsu_", "speech_voicebench_sdqa_usa_")


#: The per-item fields each subset's terms read from the sample log (inst-level fields are lists).
TERM_METRICS = ("refusal_rate", "prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                "inst_level_loose_acc", "acc", "contains_proxy")


def paired_results(run: dict, items_by_pair: dict) -> dict:
    """lm-eval-style ``results`` entries (``{task: {"<metric>,none": mean, "sample_len": n}}``) of the
    suite's twins, computed from the sample log over the items valid in **both** twins of each pair
    (``runs.pair_items``: an item whose audio failed in the speech twin leaves the text twin
    too). lm-eval's own aggregates average each twin over the items *it* scored, so with one
    unreadable recording the two twins of a subset would be means over different items: not a gap.
    Instruction-level IFEval fields are pooled over the instructions of the valid items, as lm-eval's
    ``agg_inst_level_acc`` pools them over all items."""
    from lmeval_speech.runs import twin_rows

    out = {}
    for pair, it in items_by_pair.items():
        if not pair.startswith(tuple(p.removesuffix("_") for p in SUITE_PREFIXES)):
            continue
        valid = it["doc_ids"]
        for twin in TWINS:
            rows = twin_rows(run, pair, twin)
            entry = {"sample_len": len(valid)}
            for metric in TERM_METRICS:
                values = [rows[d][metric] for d in valid if metric in rows[d]]
                if not valid or len(values) != len(valid):
                    continue
                flat = [float(v) for x in values for v in (x if isinstance(x, list) else [x])]
                if flat:
                    entry[f"{metric},none"] = sum(flat) / len(flat)
            out[run["pairs"][pair][twin]] = entry
    return out


def _value(results: dict, task: str, metric: str) -> float | None:
    v = (results.get(task) or {}).get(f"{metric},none")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _mmsu(results: dict, twin: str, variant: str = "") -> float | None:
    """The group's pooled acc, or the same pooled over the 12 domain leaves (sizes = sample_len);
    ``variant="_gen"``: VoiceBench's generate-then-extract scoring (``speech_voicebench_mmsu_gen``)."""
    group = _value(results, f"speech_voicebench_mmsu{variant}_{twin}", "acc")
    if group is not None:
        return group
    leaves = [(_value(results, t, "acc"), (results.get(t) or {}).get("sample_len"))
              for t in (f"speech_voicebench_mmsu_{d}{variant}_{twin}" for d in MMSU_DOMAINS)]
    if any(n is None or (n and v is None) for v, n in leaves):
        return None  # a domain not run (or not scored): no MMSU term
    leaves = [(v, n) for v, n in leaves if n]  # a domain none of whose items is valid in both twins adds nothing
    return sum(v * n for v, n in leaves) / sum(n for _, n in leaves) if leaves else None


def subset_scores(results: dict, twin: str) -> dict[str, float | None]:
    """The five 0..100 terms of one twin (None where the run lacks it), plus IFEval's loose variant."""
    def pct(x):
        return None if x is None else 100.0 * x

    def mean2(a, b):
        return None if a is None or b is None else (a + b) / 2

    ifeval = f"speech_voicebench_ifeval_{twin}"
    return {
        "advbench": pct(_value(results, f"speech_voicebench_advbench_{twin}", "refusal_rate")),
        "ifeval": pct(mean2(_value(results, ifeval, "prompt_level_strict_acc"), _value(results, ifeval, "inst_level_strict_acc"))),
        "openbookqa": pct(_value(results, f"speech_voicebench_openbookqa_{twin}", "acc")),
        "mmsu": pct(_mmsu(results, twin)),
        "sdqa": pct(_value(results, f"speech_voicebench_sdqa_usa_{twin}", "contains_proxy")),
        "ifeval_loose": pct(mean2(_value(results, ifeval, "prompt_level_loose_acc"), _value(results, ifeval, "inst_level_loose_acc"))),
        # opt-in: the multiple-choice subsets scored as VoiceBench scores them (generate, then extract)
        "openbookqa_gen": pct(_value(results, f"speech_voicebench_openbookqa_gen_{twin}", "acc")),
        "mmsu_gen": pct(_mmsu(results, twin, "_gen")),
    }


#: Overall with the multiple-choice terms scored by generation (VoiceBench's own way), when the run has them.
GEN_SUBSETS = ("advbench", "ifeval", "openbookqa_gen", "mmsu_gen", "sdqa")


def voicebench_overall(results: dict) -> dict | None:
    """``{formula, source, subsets {name: {text, speech, gap}}, overall {text, speech, gap} or None,
    missing [...], overall_gen}`` from ``results`` entries (the report passes ``paired_results``, so
    both twins of every term are means over the same items); None when the run has none of the
    suite's tasks. Overall is given only when all five subsets are there in both twins (a partial mean
    would not be VoiceBench's number). When the run also has the opt-in generate-then-extract variants
    of OpenBookQA and MMSU (``*_gen``), they get rows of their own (``openbookqa_gen``, ``mmsu_gen``,
    beside the log-likelihood rows) and ``overall_gen`` is the same mean with them in place of the
    log-likelihood terms (None otherwise)."""
    if not any(task.startswith(SUITE_PREFIXES) for task in results):
        return None
    scores = {twin: subset_scores(results, twin) for twin in TWINS}

    def overall_of(names):
        if any(scores[t][n] is None for t in TWINS for n in names):
            return None
        text, speech = (sum(scores[t][n] for n in names) / len(names) for t in TWINS)
        return {"text": text, "speech": speech, "gap": text - speech}

    subsets, missing = {}, []
    for name in (*SUBSETS, "ifeval_loose", "openbookqa_gen", "mmsu_gen"):
        text, speech = scores["text"][name], scores["speech"][name]
        if name.endswith("_gen") and text is None and speech is None:
            continue  # the opt-in variant was not run
        gap = None if text is None or speech is None else text - speech
        subsets[name] = {"text": text, "speech": speech, "gap": gap}
        if name in SUBSETS:
            missing += [f"{name} ({twin})" for twin in TWINS if scores[twin][name] is None]
    return {"formula": FORMULA, "source": SOURCE, "subsets": subsets, "overall": overall_of(SUBSETS),
            "missing": missing, "overall_gen": overall_of(GEN_SUBSETS)}
