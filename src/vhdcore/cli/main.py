"""The ``vhdcore`` command line: one sub-command per module in ``vhdcore.cli``.

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

from ..exceptions import VHDError

# Sub-command modules under vhdcore.cli, in the order ``--help`` lists them.
COMMANDS = ["info", "map", "create", "snapshot", "convert", "coalesce", "check", "repair", "growth", "compact",
            "export", "verify", "image", "compare", "measure", "setparent", "resize", "rebase", "submit", "status",
            "jobs", "worker"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE, as a shell reports a process the signal ended


def _load_commands(names: Sequence[str] = COMMANDS) -> list:
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(f".{name}", __package__))
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise
    return mods


def _named_command(argv: Sequence[str]) -> list[str]:
    """The one sub-command module ``argv`` names, so that a command's start-up imports that command only (every
    module's imports cost ~0.2 s of CPU, paid by each of the many short calls a pipeline makes); every module when
    argv names none (``--help``, a typo), so help and usage errors list them all."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None:
        module = first.replace("-", "")  # set-parent is cli/setparent.py
        if module in COMMANDS and [m.NAME for m in _load_commands([module])] == [first]:
            return [module]
    return list(COMMANDS)


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the rule of every other error: one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _report(args: argparse.Namespace, e: BaseException) -> None:
    """The error's line and, with --json, its object (``_common.report_error``); a reader gone away from stdout
    is not an error of its own here."""
    from ._common import report_error

    try:
        report_error(args, e)
    except BrokenPipeError:
        pass


def _broken_pipe() -> int:
    """The reader went away (``| head``): end quietly with the status a process killed by SIGPIPE has (141),
    and keep Python from complaining about the unflushed stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="vhdcore", description="Inspect, coalesce, compact and export VHD disks.")
    parser.add_argument("--version", action="version", version=f"vhdcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _load_commands(commands):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_named_command(argv))
    args = parser.parse_args(argv)
    debug = os.environ.get("VHDCORE_DEBUG") == "1"
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a reader gone away shows here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _broken_pipe()
    except VHDError as e:
        if debug:
            raise
        _report(args, e)
        return getattr(e, "exit_status", EXIT_ERROR)
    except ModuleNotFoundError as e:
        # A library an optional feature needs (an extra not installed) or a core one removed after install.
        if debug:
            raise
        from .._extras import install_hint

        print(f"vhdcore {args.command}: error: {e}; install it with: {install_hint(e.name or '')}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as e:
        if debug:
            raise
        _report(args, e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"vhdcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
