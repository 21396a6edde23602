"""``lmeval-speech`` console script (subcommands filled in by later modules)."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from lm_eval.__main__ import cli_evaluate
        sys.argv = ["lm_eval", *argv[1:]]
        return cli_evaluate()
    print("usage: lmeval-speech run ...", file=sys.stderr)
    return 2
