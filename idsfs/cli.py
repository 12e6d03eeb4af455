"""The ``idsfs`` command line: one sub-command per module.

Each entry of :data:`SUBCOMMANDS` names a module that provides ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int``. The module's
docstring becomes the sub-command's description. Keeping the parsers in the
modules lets ``python -m idsfs.emulator`` and ``idsfs emulator`` share one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from idsfs import __version__

#: sub-command name -> module implementing it
SUBCOMMANDS: dict[str, str] = {
    "emulator": "idsfs.emulator.cli",
    "get": "idsfs.getput",
    "put": "idsfs.getput",
    "mount": "idsfs.mountcli",
    "umount": "idsfs.mountcli",
    "demo": "idsfs.mountcli",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for ``idsfs`` with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="idsfs",
        description="Mount an ICAT Data Service archive as a directory tree.",
    )
    parser.add_argument("--version", action="version", version=f"idsfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, modname in SUBCOMMANDS.items():
        module = importlib.import_module(modname)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idsfs`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
