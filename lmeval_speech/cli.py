"""``lmeval-speech``: run | synthesize | report | compare | check | steer | sweep.

``run`` is ``lm_eval`` itself (the start-up hook has registered the ``lslm`` model and the tasks);
every other subcommand lives in the module that owns the concept and exposes
``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "synthesize": ("lmeval_speech.audio.synthesize_cli", "pre-render the spoken side of tasks into the TTS cache"),
    "report": ("lmeval_speech.report.report", "modality gap, layer similarity and APS report for one run"),
    "compare": ("lmeval_speech.report.compare", "leaderboard across runs"),
    "check": ("lmeval_speech.report.check", "fail when gap metrics regress past a baseline"),
    "steer": ("lmeval_speech.interventions.steer", "a steering vector (mean text - speech state) from a capture"),
    "sweep": ("lmeval_speech.sweep", "one run per voice x rate x SNR condition, and the metrics against each axis"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm_eval", *argv[1:]]
        cli_evaluate()
        return 0
    parser = argparse.ArgumentParser(prog="lmeval-speech", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="lm_eval with lmeval-speech loaded (same arguments as lm_eval)")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # import only the module that owns the chosen subcommand
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[args.command][0]).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
