"""Owns rendering a report: ``report.md`` tables, the summary line, plots, and writing the files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write
from lmeval_speech.outcomes import FLAG_METRICS
from lmeval_speech.report import plots
from lmeval_speech.report.schema import N_CRITICAL, dumps, jsonable

HOW_TO_READ = """\
**Gap** is text accuracy minus speech accuracy on the *same* items, so a positive gap is what the
model loses by hearing the question instead of reading it. The 95% CI comes from a paired bootstrap
over items and McNemar's p from the items only one modality got right (`text-only` vs
`speech-only`); both respect the pairing, which is why a few points of gap can be significant.
**Layer similarity** compares, at every depth, the speech positions' mean hidden state with the
mean state of the text twin's question tokens: a cosine that rises (distance that falls) with depth
means the model maps speech onto its text representation as it goes; the layer where it stays low
is where the modality gap lives. A decoder's states share a large common direction, so *any* two
inputs look similar: read every similarity against its **baselines**, the same measure between an
item's speech and a *mismatched* item's text (what "similar" means by chance), the **centered** cosine
(the run's mean state removed: near 0 for unrelated items) and **CKA** (does the speech geometry across
items match the text geometry). **APS** (Alignment Path Score) matches every text token to its most
similar speech position and averages that similarity: 1 means each word has a speech frame
represented like it; monotonicity near 1 means those matches follow word order. The **Bottom-3
speech positions** of an item are the frames that align worst, candidates for interventions.
**Correlation** asks whether items whose speech states sit further from text are the ones lost to
speech (point-biserial r; for cosine and APS a negative r means lower similarity goes with more
speech-only errors)."""


# ----------------------------------------------------------------------------------------- CLI


def write_outputs(report: dict, heatmap: dict | None, out) -> None:
    """PNGs first (their names go into the report), then report.json and report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = report["files"]["plots"]
    files["gap"] = Path(plots.gap_plot(report["pairs"], report["overall"], out / "gap.png", report.get("controls"))).name
    if report.get("decomposition"):
        files["decomposition"] = Path(plots.decomposition_plot(report["decomposition"], out / "decomposition.png")).name
    if report["similarity"]:
        files["layers"] = Path(plots.layers_plot(report["similarity"], report["alignment"], out / "layers.png",
                                                 report.get("reference"))).name
    if report.get("reference"):
        files["cka"] = Path(plots.cka_plot(report["reference"], out / "cka.png")).name
    if heatmap:
        title = (f"{heatmap['pair']} doc {heatmap['doc_id']}\nA_l at hidden state {heatmap['layer']} "
                 f"({heatmap['measure']}), APS at this layer {heatmap['aps_layer']:.3f}")
        files["alignment"] = Path(plots.alignment_plot(
            heatmap["A"], heatmap["argmax_path"], out / report["alignment"]["item"]["plot"], title=title,
            measure=heatmap["measure"], dtw=heatmap["dtw"], critical=heatmap["critical"])).name
    atomic_write(out / "report.json", dumps(report))
    atomic_write(out / "report.md", markdown(jsonable(report)))


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def fmt_p(x) -> str:
    if x is None or not math.isfinite(x):  # a NaN p is no evidence, never "<1e-4"
        return "–"
    return f"{x:.2g}" if x >= 1e-4 else "<1e-4"


def _gap_row(name: str, g: dict) -> str:
    t = g["table"]
    return (f"| {name} | {g['n']} | {fmt(g['text_acc'])} | {fmt(g['speech_acc'])} | {fmt(g['gap'])} | "
            f"[{fmt(g['ci_low'])}, {fmt(g['ci_high'])}] | {fmt_p(g['mcnemar']['p'])} | "
            f"{t['text_only']} / {t['speech_only']} |")


def markdown(report: dict) -> str:
    """report.md: the same numbers as report.json, as tables a person reads."""
    run, overall = report["run"], report["overall"]
    lines = ["# Modality gap report", "",
             f"- model: `{run['model']}` with model_args `{run['model_args']}`",
             f"- results: `{run['results_file']}` (run {run['timestamp']})",
             f"- capture: `{run['capture_dir'] or 'none'}`", "",
             "## How to read this", "", HOW_TO_READ, "",
             "## Modality gap", "", "![gap](gap.png)", "",
             "| pair | n | text acc | speech acc | gap | 95% CI | McNemar p | text-only / speech-only |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [_gap_row(pair if g.get("metric", "acc") == "acc" else f"{pair} ({g['metric']})", g)
              for pair, g in report["pairs"].items()]
    lines.append(_gap_row(f"**overall (pooled, {overall.get('metric', 'acc')})**", overall))
    for metric, g in (overall.get("by_metric") or {}).items():
        lines.append(_gap_row(f"**pooled, {metric}**", g))
    dropped = {p: g["excluded"] for p, g in report["pairs"].items() if g.get("excluded")}
    if dropped:
        lines += ["", "Items left out of the gap (not valid in both twins; `audio_failed` = the audio could not be "
                  "used, never scored; `audio_truncated` = cut to the model's limit, kept with --include-truncated):", "",
                  "| pair | " + " | ".join(FLAG_METRICS) + " |", "|---|" + "---:|" * len(FLAG_METRICS)]
        lines += [f"| {p} | " + " | ".join(str(d.get(m, 0)) for m in FLAG_METRICS) + " |" for p, d in dropped.items()]
    macro = overall["macro_mean"]
    lines += ["", f"Mean over the {overall['n_pairs']} pooled pairs, each counted once: text {fmt(macro['text_acc'])}, "
              f"speech {fmt(macro['speech_acc'])}, gap {fmt(macro['gap'])} (weighted by size it is the pooled row).", ""]

    if report.get("decomposition"):
        lines += ["## Where the gap comes from", "", "![decomposition](decomposition.png)", "",
                  "On the items valid in every twin used: **forgetting** = base LLM text - LSLM text (with "
                  "`--base`), **recognition** = text - cascade "
                  "(what ASR errors cost), **misalignment** = cascade - speech (what the end-to-end speech path "
                  "loses beyond recognition); they add up to the gap on those items. **hearing** = speech - "
                  "shuffled-audio control; **recovery** = speech / text (1 = speech recovers all of text); "
                  "**kappa** = Cohen's kappa of the options the speech and cascade twins chose (1 = the end-to-end "
                  "model answers as its ASR cascade would, 0 = chance agreement). 95% paired bootstrap CIs.", "",
                  "| pair | n | base text | forgetting | text | cascade | speech | recognition | misalignment | gap | "
                  "hearing | recovery | speech-cascade kappa | ASR WER |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def step(x):
            return "–" if not x else f"{fmt(x.get('gap', x.get('hearing')))} [{fmt(x['ci_low'])}, {fmt(x['ci_high'])}]"

        lines += [f"| {pair} | {d['n']} | {fmt(d.get('base_text_acc'))} | {step(d.get('forgetting'))} | "
                  f"{fmt(d['text_acc'])} | {fmt(d['cascade_acc'])} | {fmt(d['speech_acc'])} | "
                  f"{step(d['recognition'])} | {step(d['misalignment'])} | {step(d['gap'])} | {step(d['hearing'])} | "
                  f"{_ci(d.get('recovery'), 'rate', d['recovery_rate'])} | {_ci(d.get('speech_cascade_kappa'), 'kappa')} | "
                  f"{fmt(d['asr_wer_mean'])} |" for pair, d in report["decomposition"].items()]
        lines.append("")

    if report.get("voicebench"):
        vb = report["voicebench"]
        lines += ["## VoiceBench Overall (paper suite)", "",
                  f"Each subset scored 0-100 and averaged as VoiceBench does ({vb['source']}): `{vb['formula']}`. "
                  "SD-QA's term is an offline substring proxy, not VoiceBench's PEDANT + GPT judge; multiple choice "
                  "is scored by log-likelihood (by VoiceBench's generate-then-extract on the `_gen` rows, when run); "
                  "IFEval uses the strict setting (loose on its own row).", "",
                  "| subset | text | speech | gap |", "|---|---:|---:|---:|"]
        lines += [f"| {name}{' (proxy)' if name == 'sdqa' else ' (generate-then-extract)' if name.endswith('_gen') else ''}"
                  f" | {fmt(v['text'], 2)} | {fmt(v['speech'], 2)} | {fmt(v['gap'], 2)} |"
                  for name, v in vb["subsets"].items()]
        o = vb["overall"] or {}
        lines.append(f"| **Overall** | {fmt(o.get('text'), 2)} | {fmt(o.get('speech'), 2)} | {fmt(o.get('gap'), 2)} |")
        if og := vb.get("overall_gen"):
            lines.append(f"| **Overall (multiple choice by generation, as VoiceBench)** | {fmt(og['text'], 2)} | "
                         f"{fmt(og['speech'], 2)} | {fmt(og['gap'], 2)} |")
        if vb["missing"]:
            lines += ["", f"No Overall: the run lacks {', '.join(vb['missing'])} (run `--tasks speech_voicebench`)."]
        lines.append("")

    if report.get("controls"):
        lines += ["## Does the model hear? Prior controls", "",
                  "The speech twin against the same prompt with another item's audio (`shuffled`) or silence "
                  "of the same length (`silence`): their accuracy is what answer priors alone give, and "
                  "**hearing** = speech accuracy - control accuracy (paired, same items).", "",
                  "| pair | control | n | speech acc | control acc | hearing | 95% CI | McNemar p |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {pair} | {c} | {v['n']} | {fmt(v['speech_acc'])} | {fmt(v['control_acc'])} | {fmt(v['hearing'])} | "
                  f"[{fmt(v['ci_low'])}, {fmt(v['ci_high'])}] | {fmt_p(v['mcnemar_p'])} |"
                  for pair, cs in report["controls"].items() for c, v in cs.items()]
        lines.append("")

    sim = report["similarity"]
    lines += ["## Layer similarity (pooled states)", ""]
    if sim:
        lines += ["![layers](layers.png)", "",
                  f"S_cos = {fmt(sim['S_cos'])}, S_euc = {fmt(sim['S_euc'])} over {sim['n_items']} items "
                  "(means over layers)" + (f"; {sim['excluded_non_finite']} items with NaN/inf states left out"
                                           if sim.get("excluded_non_finite") else "") + ".", ""]
        lines += reference_lines(report.get("reference"))
        lines += ["| hidden state | cosine mean | cosine std | Euclidean mean | Euclidean std |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {layer} | {fmt(cm)} | {fmt(cs)} | {fmt(em)} | {fmt(es)} |" for layer, cm, cs, em, es in
                  zip(sim["layers"], sim["cosine_mean"], sim["cosine_std"], sim["euclidean_mean"],
                      sim["euclidean_std"])]
        lines += ["", "| pair | S_cos | S_euc | n |", "|---|---:|---:|---:|"]
        lines += [f"| {pair} | {fmt(p['similarity']['S_cos'])} | {fmt(p['similarity']['S_euc'])} | "
                  f"{p['similarity']['n_items']} |" for pair, p in report["pairs"].items() if p["similarity"]]
    else:
        lines.append("Omitted: no captured hidden states (see notes).")
    lines.append("")

    al = report["alignment"]
    lines += ["## Alignment Path Score", ""]
    if al:
        lines += [f"APS = {fmt(al['aps'])} ({al['measure']}, {al['path']} path) over {al['n_items']} items; "
                  f"path monotonicity (Spearman) = {fmt(al['monotonicity'])}.", "",
                  "| hidden state | APS |", "|---:|---:|"]
        lines += [f"| {layer} | {fmt(v)} |" for layer, v in zip(al["layers"], al["aps_per_layer"])]
        lines += ["", "| pair | APS | monotonicity | n |", "|---|---:|---:|---:|"]
        lines += [f"| {pair} | {fmt(p['alignment']['aps'])} | {fmt(p['alignment']['monotonicity'])} | "
                  f"{p['alignment']['n_items']} |" for pair, p in report["pairs"].items() if p["alignment"]]
        item = al.get("item")
        if item:
            lines += ["", f"### Item {item['pair']}:{item['doc_id']} ({item['chosen_by']})", "",
                      f"![alignment]({item['plot']})", "",
                      f"APS {fmt(item['aps'])}; {item['n_speech']} speech positions, {item['n_text']} text tokens. "
                      f"Bottom-{N_CRITICAL} speech positions (worst first):", "",
                      "| hidden state | speech positions | scores | aligned text tokens |", "|---:|---|---|---|"]
            lines += [f"| {c['layer']} | {c['positions']} | {[round(s, 3) for s in c['scores']]} | {c['text_tokens']} |"
                      for c in item["critical_tokens"]]
    else:
        lines.append("Omitted: no token-level hidden states (see notes).")
    lines.append("")
    lines += lens_lines(report.get("logit_lens"))
    lines.append("")

    corr = report["correlation"]
    lines += ["## Closeness vs speech-only errors", ""]
    if corr:
        lines += [f"{corr['n_speech_only_errors']} speech-only errors among {corr['n_items']} captured items.", "",
                  "| value | n | point-biserial r | p | items for 80% power | logistic coef | p | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for key in ("cosine", "euclidean", "aps", "centered_cosine", "cosine_minus_mismatched"):
            if key in corr:
                pb, lg = corr[key]["point_biserial"], corr[key]["logistic"]
                lines.append(f"| {key} | {pb['n']} | {fmt(pb['r'])} | {fmt_p(pb['p'])} | {pb.get('n_for_80pct_power') or '–'} | "
                             f"{fmt(lg['coef'])} | {fmt_p(lg['p'])} | {pb['note'] or lg['note'] or ''} |")
    else:
        lines.append("Omitted: no captured hidden states (see notes).")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in report["notes"]] or ["- none"]
    return "\n".join(lines) + "\n"


def _ci(d: dict | None, key: str, fallback=None) -> str:
    """``value [low, high]`` of a statistic with a CI (``–`` when absent)."""
    if not d or d.get(key) is None:
        return fmt(fallback) if fallback is not None else "–"
    return f"{fmt(d[key])} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"


def _diff(d: dict, digits: int = 3) -> str:
    return (f"{fmt(d['own'], digits)} vs mismatched {fmt(d['mismatched'], digits)}: own - mismatched "
            f"{d['difference']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]")


def reference_lines(ref: dict | None) -> list[str]:
    """Every similarity beside its baseline (report/reference.py), as the similarity section's head."""
    if not ref:
        return ["No baseline (fewer than 2 items with a mismatched partner): the figures below cannot be "
                "told apart from what any two inputs give.", ""]
    pl = ref["per_layer"]
    lines = ["**Against the baselines** (each item's speech against a *mismatched* item's text, a seeded "
             f"derangement within the pair; n = {ref['n_items']}; 95% paired bootstrap CIs):", "",
             f"- S_cos {_diff(ref['S_cos'])}",
             f"- S_euc {_diff(ref['S_euc'], 2)} (lower = closer)",
             f"- centered S_cos (the mean state per layer over both modalities, from {ref['n_items']} items, "
             f"removed first) {_diff(ref['S_cos_centered'])}"]
    if ref.get("aps"):
        lines.append(f"- APS {_diff(ref['aps'])} (token-captured items)")
    best = int(np.nanargmax(pl["cka"]))
    lines += [f"- linear CKA of speech vs text states across {ref['cka_items']} items: highest "
              f"{fmt(pl['cka'][best])} at hidden state {pl['layers'][best]} (mismatched "
              f"{fmt(pl['cka_mismatched'][best])}); cross-layer matrix in `cka.png`", "",
              "| hidden state | cosine own | mismatched | centered own | centered mismatched | CKA | CKA mismatched |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {layer} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(d)} | {fmt(e)} | {fmt(f)} |" for layer, a, b, c, d, e, f in
              zip(pl["layers"], pl["cosine_own"], pl["cosine_mismatched"], pl["centered_cosine_own"],
                  pl["centered_cosine_mismatched"], pl["cka"], pl["cka_mismatched"])]
    return lines + [""]


def lens_lines(lens: dict | None) -> list[str]:
    """The logit-lens table (report/lens.py): speech positions through the argmax path, the text twin's
    own positions as the reference, chance beside both."""
    if not lens:
        return []
    ch = lens["chance"]
    lines = ["## Logit lens: are the question's words readable from the speech states?", "",
             f"Each state read through the final norm and LM head; the share of the question's tokens ranked top-1 "
             f"/ top-10 at the speech position aligned to them (argmax path, per hidden state), beside the text "
             f"twin's own positions (reference; its last index predicts the *next* token, so it drops there) and "
             f"chance ({fmt(ch['top1'], 6)} / {fmt(ch['top10'], 6)}); {lens['n_items']} items, "
             f"{lens['speech']['n_tokens'][0]} tokens.", "",
             "| hidden state | speech top-1 | speech top-10 | speech median rank | text top-1 | text top-10 | "
             "text median rank |", "|---:|---:|---:|---:|---:|---:|---:|"]
    sp, tx = lens["speech"], lens["text"]
    lines += [f"| {layer} | {fmt(a)} | {fmt(b)} | {fmt(c, 0)} | {fmt(d)} | {fmt(e)} | {fmt(f, 0)} |"
              for layer, a, b, c, d, e, f in zip(lens["layers"], sp["top1"], sp["top10"], sp["median_rank"],
                                                 tx["top1"], tx["top10"], tx["median_rank"])]
    return lines + [""]


def summary(report: dict) -> str:
    """The stdout table: gap per pair and overall, then the hidden-state headline numbers."""
    names = list(report["pairs"])
    metric = report["overall"].get("metric", "acc")
    labels = plots.short_labels(names) + ["overall" if metric == "acc" else f"overall ({metric})"]
    width = max(len(s) for s in labels)
    lines = [f"{'pair':<{width}}  {'n':>5}  {'text':>6}  {'speech':>6}  {'gap':>7}  {'95% CI':>17}  {'p':>7}"]
    for label, g in zip(labels, [report["pairs"][n] for n in names] + [report["overall"]]):
        lines.append(f"{label:<{width}}  {g['n']:>5}  {g['text_acc']:>6.3f}  {g['speech_acc']:>6.3f}  "
                     f"{g['gap']:>+7.3f}  [{g['ci_low']:>+6.3f}, {g['ci_high']:>+6.3f}]  {fmt_p(g['mcnemar']['p']):>7}")
    sim, al = report["similarity"], report["alignment"]
    if sim:
        lines.append(f"\nS_cos {fmt(sim['S_cos'])}  S_euc {fmt(sim['S_euc'])}  (n = {sim['n_items']})")
        ref = report.get("reference")
        if ref:
            lines.append(f"  vs a mismatched item's text: S_cos {fmt(ref['S_cos']['mismatched'])} (own - mismatched "
                         f"{ref['S_cos']['difference']:+.3f} [{ref['S_cos']['ci_low']:+.3f}, {ref['S_cos']['ci_high']:+.3f}]); "
                         f"centered S_cos {fmt(ref['S_cos_centered']['own'])} vs {fmt(ref['S_cos_centered']['mismatched'])}"
                         + (f"; APS {fmt(ref['aps']['own'])} vs {fmt(ref['aps']['mismatched'])}" if ref.get("aps") else ""))
    if al:
        lines.append(f"APS {fmt(al['aps'])} ({al['measure']}, {al['path']})  monotonicity "
                     f"{fmt(al['monotonicity'])}  (n = {al['n_items']})")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
