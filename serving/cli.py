"""The `remap` command: one entry point, subcommands registered by each package.

Each package's ``add_parsers(subparsers)`` only declares flags (no TensorFlow import, so
``remap --help`` is instant) and sets ``func``, which imports what it needs and calls one
library function with explicit keyword arguments.
"""

from __future__ import annotations

import argparse
import os
import sys


class CommandError(Exception):
    """A user-facing error: printed as one line, no traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from export import cli as export_cli
    from serving import commands as serving_commands
    from serving import demo as demo_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="remap",
        description="REMAP image retrieval: train, export for TF Serving, index and search.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_cli.add_parsers(subparsers)
    export_cli.add_parsers(subparsers)
    serving_commands.add_parsers(subparsers)
    demo_cli.add_parsers(subparsers)
    return parser


def main(argv=None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN notes, missing CUDA drivers on a CPU machine)
    # is noise for a command-line user; errors still surface as Python exceptions. An
    # explicit TF_CPP_MIN_LOG_LEVEL in the environment wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"remap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"remap {args.command}: interrupted; finished work is kept.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
