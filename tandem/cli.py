"""`tandem ...` and `python -m tandem ...`. Exit codes: 0 success, 2 bad input (one line, no traceback), 1 internal.

Each subcommand lives beside the code it drives and registers itself with `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules exporting add_parser(subparsers); each parser sets `func(args) -> int`
SUBCOMMANDS = ["tandem.cli_generate", "tandem.synth", "tandem.serve.cli", "tandem.upcycle", "tandem.rules.cli",
               "tandem.plan.cli", "tandem.plan.profile"]


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong, not tandem."""
    return (ValueError, OSError, KeyError, NotImplementedError)


def configure_logging(quiet: bool = False) -> None:
    """tandem's INFO lines (where experts run, what was converted at load) on stderr; quiet: warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tandem").setLevel(logging.WARNING if quiet else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Run huge MoE LLMs across CPU and GPU.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only (no INFO lines on stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except bad_input_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"tandem: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
