"""``lmeval-speech report RUN_DIR``: the modality gap of one lm-eval run, explained from hidden states.

    lmeval-speech report RUN_DIR [--capture DIR] [--out DIR] [--measure cosine|euclidean]
                         [--path argmax|dtw] [--item PAIR:DOC_ID] [--layer L] [--n-boot N] [--seed S]
                         [--no-html] [--html-clips N]

RUN_DIR is lm-eval's ``--output_path`` (or its model folder, or one ``results_*.json``) of a run
with ``--log_samples``. The capture dir is read from ``capture_dir=`` in the run's ``model_args``
unless ``--capture`` is given; a capture stamped with another model or other run settings (noise,
TTS override, intervention ...) than the run records is refused (exit 2). Writes ``report.json``,
``report.md``, PNGs and ``report.html`` (the item browser, with ``audio/*.flac``; ``report/html.py``)
to ``--out`` (default ``RUN_DIR/gap_report``) and prints a summary. A section
whose inputs are missing (no capture, no token-level states) is left out with a line in ``notes``.

The report's format is documented in ``report/schema.py``; computing it is ``report/compute.py``,
rendering it ``report/render.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmeval_speech.capture.store import CaptureCorruptError
from lmeval_speech.manifest import write_manifest
from lmeval_speech.metrics.alignment import MEASURES, PATHS
from lmeval_speech.report.compute import build_report
from lmeval_speech.report.render import markdown, summary, write_outputs
from lmeval_speech.runs import UnpairedError, load_run
from lmeval_speech.report.schema import SCHEMA_VERSION, jsonable

__all__ = ["SCHEMA_VERSION", "add_arguments", "build_report", "jsonable", "load_run", "main", "markdown",
           "summary", "write_outputs"]


def _item_arg(value: str) -> tuple[str, int]:
    pair, _, doc = value.rpartition(":")
    if not pair or not doc.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected PAIR:DOC_ID (e.g. speech_arc_easy:12), got {value!r}")
    return pair, int(doc)


def _positive_int(value: str) -> int:
    if int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return int(value)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="lm-eval --output_path of a --log_samples run (or its model "
                        "folder, or a results_*.json)")
    parser.add_argument("--capture", default=None, help="capture dir (default: capture_dir= in the "
                        "run's model_args)")
    parser.add_argument("--out", default=None, help="output dir (default RUN_DIR/gap_report)")
    parser.add_argument("--measure", choices=MEASURES, default="cosine", help="similarity for APS")
    parser.add_argument("--path", choices=PATHS, default="argmax", help="alignment path for APS")
    parser.add_argument("--item", type=_item_arg, default=None, metavar="PAIR:DOC_ID",
                        help="item for the alignment heat map and Bottom-3 tokens (default: lowest APS)")
    parser.add_argument("--layer", type=int, default=None,
                        help="hidden-state index of the heat map (default: deepest token layer)")
    parser.add_argument("--n-boot", type=_positive_int, default=10000, help="bootstrap resamples for the gap CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--base", default=None, metavar="BASE_RUN",
                        help="a run of the base LLM's text twins (e.g. lslm pretrained=mini-base on the *_text tasks): "
                        "adds forgetting = base text - LSLM text to the decomposition")
    parser.add_argument("--include-truncated", action="store_true",
                        help="keep items whose audio was cut to the model's limit in the gap (left out by default)")
    parser.add_argument("--no-html", dest="html", action="store_false",
                        help="skip report.html (the item browser: look, listen, compare; report/html.py)")
    parser.add_argument("--html-clips", type=int, default=None, metavar="N",
                        help="clips report.html writes as FLAC beside it (default 300: every speech-only error "
                        "first, then failed/truncated items, then a seeded sample; 0: none)")


def main(args) -> int:
    try:
        run = load_run(args.run_dir)
        out = Path(args.out) if args.out else _default_out(args.run_dir)
        report, heatmap = build_report(run, capture=args.capture, measure=args.measure, path=args.path,
                                       item=args.item, layer=args.layer, n_boot=args.n_boot, seed=args.seed,
                                       include_truncated=args.include_truncated,
                                       base=load_run(args.base) if args.base else None)
    except (UnpairedError, ValueError, FileNotFoundError, CaptureCorruptError) as err:
        print(f"lmeval-speech report: error: {err}", file=sys.stderr)
        return 2
    write_manifest(run, report["manifest"])  # next to lm-eval's results: the record of what was measured
    write_outputs(report, heatmap, out)
    page = _write_html(report, run, out, args) if getattr(args, "html", True) else None
    print(summary(report))
    print(f"\nwrote {out / 'report.json'}, {out / 'report.md'} and "
          f"{', '.join(report['files']['plots'].values())}")
    if page:
        print(f"wrote {page['path']} ({page['items']} items, {page['page_bytes'] / 1e6:.1f} MB; "
              f"{page['audio']['written']} clips, {page['audio']['bytes'] / 1e6:.1f} MB in {out / 'audio'})")
    return 0


def _write_html(report: dict, run: dict, out: Path, args) -> dict:
    from lmeval_speech.report.html import MAX_CLIPS, write_report_html

    clips = MAX_CLIPS if getattr(args, "html_clips", None) is None else args.html_clips
    return write_report_html(report, run, out, max_clips=clips)


def _default_out(run_dir) -> Path:
    run_dir = Path(run_dir)
    return (run_dir.parent if run_dir.is_file() else run_dir) / "gap_report"


