"""What every ``remap`` subcommand shares: the parser class, argument types, signals.

Argument types raise ``argparse.ArgumentTypeError`` with a message that names the problem;
`Parser` prints any parse error as one line plus a pointer to ``--help``, exit status 2.
Standard library only, so building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading

from remap_tf.io import defer_interrupt


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: message (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (control characters escaped, see `printable`)."""
    text = printable(" ".join(str(error).split()))
    return text or type(error).__name__


def printable(text: str) -> str:
    """``text`` with its control characters escaped as Python writes them (``\\n``, ``\\t``,
    ``\\x1b``, an undecodable byte of a file name as ``\\udcff``), so a file name or an id
    that holds a newline stays on its own line of output. Other characters (accents, CJK,
    spaces) are kept as they are.

    Example:
        >>> printable("a\\nb.jpg")
        'a\\\\nb.jpg'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def add_command(subparsers, name: str, help: str, description: str | None = None, run=None):
    """Adds subcommand ``name`` whose handler is ``run(args)``; returns its parser."""
    parser = subparsers.add_parser(name, help=help, description=description or help)
    parser.set_defaults(run=run, prog_name=parser.prog)
    return parser


def add_overwrite(parser) -> None:
    """``--overwrite``: let outputs replace existing files that this command did not write."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --report/--json file, or write into a <report>_files/ "
        "folder, even if remap did not write it (other files in that folder are kept)",
    )


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM end a command as ``KeyboardInterrupt`` does, reliably.

    The first signal records itself (``requested``) and raises KeyboardInterrupt; a second one
    ends the process at once (exit 130). The record matters because a KeyboardInterrupt that
    lands inside an import or a C extension can come out as another exception, or be
    swallowed by a library's ``except Exception``: the command still ends as interrupted.
    When it lands in a weakref callback or a ``__del__``, Python cannot raise it: it would
    print "Exception ignored in ..." with a traceback and carry on. That one is silenced
    (``sys.unraisablehook``) and the signal delivered again, so that the interrupt is raised
    in ordinary code and the command stops (seen in CI: ``remap train`` ran to the end).
    Outside the main thread (where handlers cannot be set) it does nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._interrupt = None
        self._signum = None
        self._again = None
        self._previous_hook = None

    def _handle(self, signum, frame):
        if self.requested:
            os._exit(130)
        self.requested = True
        self._signum = signum
        self._interrupt = KeyboardInterrupt(f"signal {signum}")
        if not defer_interrupt(self._interrupt):  # else raised once the commit step is done
            raise self._interrupt

    def _unraisable(self, unraisable):
        if self._interrupt is None or unraisable.exc_value is not self._interrupt:
            self._previous_hook(unraisable)
            return
        # Swallowed: deliver it once more, a moment later from another thread, so that the
        # handler runs in the main thread's ordinary code and not inside this hook (where it
        # would be lost again; should it land in such a place again, this repeats).
        self.requested, self._interrupt = False, None
        self._again = threading.Timer(0.05, os.kill, args=(os.getpid(), self._signum))
        self._again.daemon = True
        self._again.start()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc):
        if self._again is not None and self._again.is_alive():
            self._again.cancel()  # the command ended before the interrupt came back: it was
            self.requested = True  # asked for all the same (the work had completed)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        if self._previous_hook is not None:
            sys.unraisablehook, self._previous_hook = self._previous_hook, None
        return False


# --- argument types ---------------------------------------------------------------------------


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, received {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, received {text!r}")
    return value


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, received {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_between(minimum: int, maximum: int):
    """An argparse type: an integer from ``minimum`` to ``maximum`` (both included)."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}, received {text!r}"
            )
        return value

    parse.__name__ = f"integer from {minimum} to {maximum}"
    return parse


def float_above(minimum: float, inclusive: bool = False):
    """An argparse type: a finite number > ``minimum`` (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        value = _number(text, float)
        if value < minimum or (value == minimum and not inclusive):
            sign = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"must be a number {sign} {minimum:g}, received {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


def pca_dims(text: str):
    """An argparse type (``--pca-dims``): "off", "auto" or a positive number of dimensions."""
    if text in ("off", "auto"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected off, auto or a positive number of dimensions, received {text!r}"
        )
    return value


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = float_above(0.0)


def number_list(text: str) -> tuple[float, ...]:
    """An argparse type: numbers separated by commas or spaces, e.g. ``'1.0,1.25'``."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise argparse.ArgumentTypeError(f"expected numbers like '1.0,1.25', received {text!r}")
    values = []
    for part in parts:
        value = _number(part, float)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive numbers, received {text!r}")
        values.append(value)
    return tuple(values)


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


def byte_size(text: str) -> int:
    """An argparse type: a size in bytes such as ``4GiB``, ``500M``, ``2g`` or ``1048576``."""
    cleaned = text.strip().lower().removesuffix("b").removesuffix("ytes")
    number = cleaned.rstrip("kmgti")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"expected a size like 4GiB, 500M or 2g, received {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, received {text!r}")
    return int(value)


def recall_target(text: str) -> float:
    """An argparse type: a recall in (0, 1], or 0 for none (no tuning)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], or 0 for none, received {text!r}")
    return value


MODEL_HELP = (
    "an exported model folder (remap export; its highest version is used) or a TF Serving "
    "gRPC address 'host:port[/name]'"
)


def quiet_beam_logs(debug: bool) -> None:
    """Keeps Apache Beam's log records off a command's stderr (unless ``--debug``).

    Beam logs a failing or interrupted step at ERROR with its whole traceback, and notes about
    optional modules (apitools, resource) at WARNING on the root logger; the command reports
    the same failure itself, in one line (or a traceback file for an internal error).
    """
    if debug:
        return
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    if root.level < logging.ERROR:
        root.setLevel(logging.ERROR)
    logging.getLogger("remap_tf").setLevel(logging.WARNING)  # the project's own warnings stay
