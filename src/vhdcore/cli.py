"""The ``vhdcore`` command line: one sub-command per module in ``vhdcore.cmd``.

Every sub-command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Errors from vhdcore's hierarchy and from the OS become one line on stderr and a non-zero exit status; a
traceback is shown only with VHDCORE_DEBUG=1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn, Sequence

from .exceptions import VHDError

# Sub-command modules under vhdcore.cmd, in the order ``--help`` lists them.
COMMANDS = ["info", "map", "create", "snapshot", "convert", "coalesce", "check", "repair", "growth", "compact",
            "export", "verify", "image", "compare", "measure", "setparent", "resize", "rebase"]

EXIT_ERROR = 1
EXIT_USAGE = 2


def _load_commands() -> list:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f".cmd.{name}", __package__))
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.cmd.{name}":
                raise
    return mods


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the rule of every other error: one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="vhdcore", description="Inspect, coalesce, compact and export VHD disks.")
    parser.add_argument("--version", action="version", version=f"vhdcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("VHDCORE_DEBUG") == "1"
    try:
        return int(args._run(args) or 0)
    except VHDError as e:
        if debug:
            raise
        print(f"vhdcore {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", EXIT_ERROR)
    except (OSError, ValueError) as e:
        if debug:
            raise
        print(f"vhdcore {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"vhdcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
