"""The ``remap`` command: parse, call one library function, turn errors into one line.

Each subcommand is a module of `remap_cli.commands` with ``add_parser(subparsers)`` (flags only:
nothing heavy is imported, so ``remap --help`` is instant) that sets ``run(args)``, which
validates what it can, imports the library and calls it with explicit keyword arguments.

Errors:

- a `remap_tf.errors.RemapError` (bad input, a file that is missing or unusable, an output
  that would be replaced, an unreachable server) prints ``remap <command>: error: <one line>``
  and exits with status 2;
- Ctrl-C (SIGINT) or SIGTERM prints ``interrupted`` and exits with status 130; every output
  is written atomically, so what an interrupted command leaves is complete or absent;
- a write that ran out of room (a full disk, a quota, ``ulimit -f``: ENOSPC, EDQUOT, EFBIG,
  from Python or TensorFlow) prints ``remap <command>: error: <path>: no space left on
  device`` and exits with status 2; what was being written is removed, not left half-written;
- anything else is a bug: ``remap <command>: internal error: ...`` names a file holding the
  traceback and exits with status 1.

``--debug`` (or ``REMAP_DEBUG=1``) prints the full traceback of any error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import tempfile
import traceback

from remap_cli import args as cli_args
from remap_cli.commands import demo, embed, evaluate, export, index, search, serve, train
from remap_tf.errors import RemapError

COMMANDS = (train, export, embed, index, search, serve, evaluate, demo)


def build_parser() -> cli_args.Parser:
    """The ``remap`` parser with every subcommand."""
    parser = cli_args.Parser(
        prog="remap",
        description="REMAP image retrieval: train, export for TF Serving, index and search.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=_env_debug(),
        help="print the full traceback of any error (also: REMAP_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _env_debug() -> bool:
    return os.environ.get("REMAP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _write_traceback() -> str | None:
    """Saves the current exception's traceback to a file; returns its path (None on failure)."""
    try:
        fd, path = tempfile.mkstemp(prefix="remap-internal-error-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"remap {' '.join(sys.argv[1:])}\n\n")
            traceback.print_exc(file=handle)
        return path
    except OSError:
        return None


def main(argv=None) -> int:
    # TensorFlow's C++ start-up chatter (oneDNN notes, missing CUDA drivers on a CPU machine)
    # is noise for a command-line user; errors still surface as Python exceptions. An
    # explicit TF_CPP_MIN_LOG_LEVEL in the environment wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a flag argparse refused (already printed)
        return int(exit_.code or 0)
    prog = getattr(args, "prog_name", f"remap {args.command}")
    with cli_args.Interrupts() as interrupts:
        try:
            code = int(args.run(args) or 0)
        except RemapError as error:
            if interrupts.requested:  # raised while unwinding from the signal
                return _interrupted(prog, args.debug)
            if args.debug:
                traceback.print_exc()
            print(f"{prog}: error: {cli_args.one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return _interrupted(prog, args.debug)
        except Exception as error:
            if interrupts.requested:  # a KeyboardInterrupt mangled by a library
                return _interrupted(prog, args.debug)
            full = _disk_full(error, args)
            if full is not None:  # not a bug: the user's disk, quota or `ulimit -f`
                if args.debug:
                    traceback.print_exc()
                print(f"{prog}: error: {full}", file=sys.stderr)
                return 2
            return _internal_error(prog, error, args.debug)
        if interrupts.requested and getattr(args, "signal_stops_cleanly", False):
            return code  # a server stopped by its signal, gracefully (remap serve)
        if interrupts.requested:  # a library swallowed the interrupt; the result is complete
            print(
                f"{prog}: interrupted (the work had completed; its output is whole)",
                file=sys.stderr,
            )
            return 130
        return code


# What a write can run out of, as the command says it (errno -> words).
_NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file size limit, see `ulimit -f`)",
}
# Flags naming what a command writes: the path named when the error does not carry one.
_OUTPUT_FLAGS = ("out", "report", "json", "index")


def _disk_full(error: BaseException, args) -> str | None:
    """``"<path>: no space left on device"`` if ``error`` (or one it was raised from) is a
    write that ran out of room; None otherwise.

    Python's own writes raise OSError with the errno; TensorFlow's file system (a SavedModel,
    a checkpoint) raises its own error whose message ends with the C library's words.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            where = error.filename or _output_of(args)
            return f"{cli_args.printable(str(where))}: {_NO_ROOM[error.errno]}"
        for code, words in _NO_ROOM.items():
            if not isinstance(error, OSError) and os.strerror(code) in str(error):
                return f"{cli_args.printable(str(_output_of(args)))}: {words}"
        error = error.__cause__ or error.__context__
    return None


def _output_of(args) -> str:
    """The output the command was writing, as the user named it (for errors without a path)."""
    for flag in _OUTPUT_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str | os.PathLike):
            return os.fspath(value)
    return "an output"


def _interrupted(prog: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{prog}: interrupted", file=sys.stderr)
    _forget_unhandled_interrupt()
    return 130


def _forget_unhandled_interrupt() -> None:
    """Keeps the exit status 130 after an interrupt that landed in C-run Python code.

    A KeyboardInterrupt raised while a C extension runs Python source through ``PyRun_*``
    (pybind11's ``exec``, met while TensorFlow or ScaNN import) marks it "unhandled" in
    CPython even once it is caught; at exit the interpreter then kills itself with SIGINT
    (status -2) instead of returning 130. One empty ``PyRun_SimpleString`` resets the mark.
    """
    with contextlib.suppress(Exception):
        ctypes.pythonapi.PyRun_SimpleString(b"")


def _internal_error(prog: str, error: Exception, debug: bool) -> int:
    """A bug: say so, keep the traceback (printed with --debug, else saved to a file)."""
    if debug:
        traceback.print_exc()
        where = "above"
    else:
        path = _write_traceback()
        where = f"in {path}" if path else "not saved"
    print(
        f"{prog}: internal error: {type(error).__name__}: {cli_args.one_line(error)} "
        f"(a bug in remap-tf; traceback {where}; rerun with --debug to print it)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
