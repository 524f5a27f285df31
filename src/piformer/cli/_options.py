"""Flags that mean the same thing in every subcommand, defined once."""

from __future__ import annotations

import argparse
import sys


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: still accepted (hidden from --help), with a warning naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_checkpoint_argument(p: argparse.ArgumentParser, help: str = "which checkpoint of a run directory") -> None:
    """--checkpoint best|last (default best), and the old --which as a hidden deprecated alias."""
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help=f"{help} (default: best)")
    p.add_argument("--which", dest="checkpoint", choices=("best", "last"), action=_DeprecatedAlias,
                   new="--checkpoint", help=argparse.SUPPRESS)
