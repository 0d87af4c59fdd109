"""Subcommands of `remap` from this package (see serving/cli.py)."""

from __future__ import annotations


def add_parsers(subparsers) -> None:
    """Registers this package's subcommands on the `remap` parser."""
