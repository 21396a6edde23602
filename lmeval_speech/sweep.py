"""Owns perturbation sweeps: one ``lm_eval`` run per condition of a voice x rate x SNR grid, the
same tasks and model otherwise, then one report per run and a table and plot of speech accuracy,
gap, S_cos and APS against each axis.

    lmeval-speech sweep --tasks speech_mmlu_continuation_demo --voices en-us,en-gb --rates 130,160,200 \\
        --snr none,20,10,0 [--noise white|babble] --out sweep/ -- --model_args pretrained=mini --limit 20

Everything after ``--`` goes to ``lm_eval`` as is (``--model lslm`` is added when absent), except that
a ``capture_dir=DIR`` becomes ``DIR/<condition>`` and ``--use_cache PATH`` becomes ``PATH_<condition>``
(both keyed by item only, they would hand one condition's states or scores to the next); each
condition adds ``tts_voice``, ``tts_rate``, ``noise`` and ``snr_db`` to ``--model_args``, so the TTS
cache is shared (a voice/rate is synthesized once) and the noise (seeded) is recorded in each run's
manifest. A condition whose run exists in ``--out`` is not run again (an interrupted sweep resumes),
provided its results file records what this sweep asks (``recorded_differences``: model, model_args,
tasks, limit ...); a folder holding a run of other settings stops the sweep before anything runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path

from lmeval_speech.fileio import atomic_write, atomic_write_json

METRICS = ("speech_acc", "text_acc", "gap", "S_cos", "aps")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--tasks", required=True, help="lm-eval task or group names (comma-separated)")
    parser.add_argument("--voices", type=_csv, default=[None], help="TTS voices (default: each task's own)")
    parser.add_argument("--rates", type=_csv, default=[None], help="TTS rates in words/min (default: each task's)")
    parser.add_argument("--snr", type=_csv, default=["none"], help="SNRs in dB, 'none' = clean (default none)")
    parser.add_argument("--noise", choices=("white", "babble"), default="white", help="noise type (default white)")
    parser.add_argument("--noise-seed", type=int, default=0)
    parser.add_argument("--out", default="sweep", help="output folder (one run per condition + sweep.*)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per report")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="-- then lm_eval arguments")


def conditions(voices, rates, snrs) -> list[dict]:
    out = []
    for voice, rate, snr in itertools.product(voices, rates, snrs):
        cond = {"voice": voice, "rate": None if rate in (None, "") else int(rate),
                "snr_db": None if str(snr).lower() == "none" else float(snr)}
        out.append(cond)
    return out


def condition_name(cond: dict, noise: str) -> str:
    parts = [f"voice-{cond['voice'] or 'task'}", f"rate-{cond['rate'] or 'task'}",
             "clean" if cond["snr_db"] is None else f"{noise}-snr{cond['snr_db']:g}"]
    return "_".join(parts)


def lm_eval_command(passthrough: list[str], tasks: str, cond: dict, noise: str, seed: int, out: Path) -> list[str]:
    args = [a for a in passthrough if a != "--"]
    extra = []
    if cond["voice"]:
        extra.append(f"tts_voice={cond['voice']}")
    if cond["rate"]:
        extra.append(f"tts_rate={cond['rate']}")
    if cond["snr_db"] is not None:
        extra += [f"noise={noise}", f"snr_db={cond['snr_db']:g}", f"noise_seed={seed}"]
    name = condition_name(cond, noise)
    if "--model_args" in args:
        i = args.index("--model_args") + 1
        # each condition captures into its own folder: a shared one would keep the first condition's states
        parts = [f"capture_dir={Path(a.split('=', 1)[1]) / name}" if a.startswith("capture_dir=") else a
                 for a in args[i].split(",")]
        args[i] = ",".join([*parts, *extra])
    elif extra:
        args += ["--model_args", ",".join(extra)]
    for i, a in enumerate(list(args)):  # lm-eval keys cached results by request only: one database per condition
        if a in ("--use_cache", "-c") and i + 1 < len(args):
            args[i + 1] = f"{args[i + 1]}_{name}"
        elif a.startswith("--use_cache="):
            args[i] = f"{a}_{name}"
    if "--model" not in args:
        args = ["--model", "lslm", *args]
    for flag in ("--tasks", "--output_path", "--log_samples"):
        if flag in args:
            raise ValueError(f"sweep sets {flag} itself; leave it out of the lm_eval arguments")
    return [sys.executable, "-m", "lm_eval", *args, "--tasks", tasks, "--log_samples", "--output_path", str(out)]


#: Per-run settings lm-eval writes into ``results["config"]`` from its command line.
RECORDED_CONFIG = ("model", "model_args", "limit", "gen_kwargs", "random_seed", "numpy_seed", "torch_seed",
                   "fewshot_seed")


def recorded_differences(results: dict, cmd: list[str]) -> list[str]:
    """What the run of ``results`` (an lm-eval results file) was asked differently from the lm_eval command
    ``cmd`` (``lm_eval_command``'s), read by lm-eval's own parser as lm-eval would record it: model,
    model_args, limit, gen_kwargs and seeds, the tasks (groups expanded through the run's
    ``group_subtasks``), ``--num_fewshot`` when given, chat template, system instruction and, for
    ``lslm``, the spoken-form rules' version."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.utils import simple_parse_args_string

    log = logging.getLogger("lm_eval.config.evaluate_config")
    level = log.level
    log.setLevel(logging.ERROR)  # its --limit warning was printed when the run ran
    try:
        cfg = EvaluatorConfig.from_cli(HarnessCLI()._parser.parse_args(["run", *cmd[3:]]))
    finally:
        log.setLevel(level)
    config = results.get("config") or {}
    if isinstance(config.get("model_args"), str):
        config = {**config, "model_args": simple_parse_args_string(config["model_args"])}
    requested = {"model": cfg.model, "model_args": cfg.model_args, "limit": cfg.limit, "gen_kwargs": cfg.gen_kwargs,
                 **dict(zip(RECORDED_CONFIG[4:], cfg.seed or [None] * 4))}
    recorded = {k: config.get(k) for k in RECORDED_CONFIG}
    groups, tasks, todo = results.get("group_subtasks") or {}, set(), list(cfg.tasks or [])
    while todo:
        name = todo.pop()
        if name in groups and name not in tasks:
            todo += groups[name]
        tasks.add(name)
    ran = sorted(results.get("configs") or {})
    requested["tasks"], recorded["tasks"] = sorted(tasks - set(groups)), ran
    if cfg.num_fewshot is not None:
        requested["num_fewshot"] = {t: cfg.num_fewshot for t in ran}
        recorded["num_fewshot"] = {t: (results.get("n-shot") or {}).get(t) for t in ran}
    requested |= {"chat_template": bool(cfg.apply_chat_template), "system_instruction": cfg.system_instruction}
    recorded |= {"chat_template": bool(results.get("chat_template")), "system_instruction": results.get("system_instruction")}
    if cfg.model == "lslm":  # the rules that rewrite TTS texts (other rules, other audio)
        from lmeval_speech.audio.spoken_form import VERSION

        requested["spoken_form"] = VERSION
        recorded["spoken_form"] = ((config.get("lmeval_speech") or {}).get("settings") or {}).get("spoken_form")
    requested = json.loads(json.dumps(requested))  # as the results file holds it
    return [f"{k}: {recorded[k]!r} in the run, {requested[k]!r} requested" for k in requested if recorded[k] != requested[k]]


def summarize(rep: dict) -> dict:
    ov, sim, al = rep["overall"], rep.get("similarity"), rep.get("alignment")
    return {"n": ov["n"], "speech_acc": ov["speech_acc"], "text_acc": ov["text_acc"], "gap": ov["gap"],
            "ci_low": ov["ci_low"], "ci_high": ov["ci_high"],
            "S_cos": None if not sim else sim["S_cos"], "aps": None if not al else al["aps"]}


def main(args) -> int:
    from lmeval_speech.report import report as report_mod
    from lmeval_speech.runs import find_results_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan, stale = [], []
    for cond in conditions(args.voices, args.rates, args.snr):
        name = condition_name(cond, args.noise)
        run_dir = out / name
        cmd = lm_eval_command(args.lm_eval_args, args.tasks, cond, args.noise, args.noise_seed, run_dir)
        try:
            results_file = find_results_file(run_dir)
        except FileNotFoundError:
            plan.append((cond, name, run_dir, cmd, False))
            continue
        if differ := recorded_differences(json.loads(results_file.read_text(encoding="utf-8")), cmd):
            stale.append(f"{run_dir} ({results_file.name}): " + "; ".join(differ))
        plan.append((cond, name, run_dir, cmd, True))
    if stale:  # reused, its numbers would be reported as this sweep's
        print(f"lmeval-speech sweep: error: {out} holds runs made with other settings than this sweep asks; use a "
              "new --out, or delete these folders to run them again:\n  " + "\n  ".join(stale), file=sys.stderr)
        return 2
    rows = []
    for cond, name, run_dir, cmd, done in plan:
        if done:
            print(f"[sweep] {name}: already run, reusing {run_dir}", file=sys.stderr)
        else:
            print(f"[sweep] {name}: {' '.join(cmd[2:])}", file=sys.stderr)
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                print(f"lmeval-speech sweep: error: the run for {name} failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
        run = report_mod.load_run(run_dir)
        rep, heatmap = report_mod.build_report(run, n_boot=args.n_boot)
        report_mod.write_outputs(rep, heatmap, run_dir / "gap_report")
        rows.append({"condition": name, **cond, "noise": args.noise if cond["snr_db"] is not None else None,
                     **summarize(report_mod.jsonable(rep))})
    sweep = {"tasks": args.tasks, "noise": args.noise, "noise_seed": args.noise_seed, "runs": rows}
    atomic_write_json(out / "sweep.json", report_mod.jsonable(sweep))
    atomic_write(out / "sweep.md", markdown(sweep))
    from lmeval_speech.report import plots

    plots.sweep_plot(rows, out / "sweep.png")
    print(markdown(sweep))
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}, {out / 'sweep.png'}")
    return 0


def markdown(sweep: dict) -> str:
    from lmeval_speech.report.render import fmt

    lines = [f"# Perturbation sweep: {sweep['tasks']}", "",
             "| voice | rate | SNR (dB) | n | text acc | speech acc | gap | 95% CI | S_cos | APS |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in sweep["runs"]:
        snr = "clean" if r["snr_db"] is None else f"{r['snr_db']:g} ({r['noise']})"
        lines.append(f"| {r['voice'] or 'task'} | {r['rate'] or 'task'} | {snr} | {r['n']} | {fmt(r['text_acc'])} | "
                     f"{fmt(r['speech_acc'])} | {fmt(r['gap'])} | [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | "
                     f"{fmt(r['S_cos'])} | {fmt(r['aps'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
