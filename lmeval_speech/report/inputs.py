"""Owns finding the report of a ``compare`` / ``check`` input: a ``report.json``, a folder holding one, or an
lm-eval run dir (its ``gap_report/`` when built from the run's latest results, else built in memory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmeval_speech.report import report as report_mod
from lmeval_speech.report.schema import jsonable, read_report
from lmeval_speech.runs import find_results_file, load_run


def _is_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "overall" in data


def load_report(arg) -> tuple[dict, Path]:
    """(report dict, its path) for a report.json, a folder with one, or a run dir.

    A run dir's ``report.json`` or ``gap_report/report.json`` is reused only when it was built from the run's latest
    results file: a report left from an older run in the same folder would describe other numbers.
    Otherwise the report is built in memory; nothing is written into the input folders.
    """
    path = Path(arg)
    if path.is_file() and path.suffix == ".json" and _is_report(path):
        return _read_report(path), path
    own = path / "report.json" if path.is_dir() and (path / "report.json").is_file() else None
    try:
        results = find_results_file(path)  # raises FileNotFoundError naming what is missing
    except FileNotFoundError:
        if own is None:
            raise
        return _read_report(own), own  # a folder of reports only
    run_dir = path if path.is_dir() else path.parent
    # a report written into the run's own folder (--out RUN_DIR) is a candidate like gap_report/'s
    for candidate in dict.fromkeys([*([own] if own else []), run_dir / "gap_report" / "report.json",
                                    results.parent / "gap_report" / "report.json"]):
        if candidate.is_file():
            rep = _read_report(candidate)
            if Path(rep["run"]["results_file"]).name == results.name:
                return rep, candidate
            print(f"{candidate} was built from {Path(rep['run']['results_file']).name}, not the latest "
                  f"{results.name}: rebuilding it", file=sys.stderr)
    # built in memory: compare reads its inputs and writes only into --out
    rep, _ = report_mod.build_report(load_run(path))
    print(f"built a report for {results} in memory (write it with lmeval-speech report)", file=sys.stderr)
    return json.loads(json.dumps(jsonable(rep))), results


def _read_report(path: Path) -> dict:
    return read_report(path)
