"""The ``idsfs`` command line: one sub-command per module.

Each entry of :data:`SUBCOMMANDS` names a module that provides ``HELP`` (one
line, or a mapping from sub-command name to its line when the module serves
several), ``add_arguments(parser)`` and ``run(args) -> int``. The module's
docstring becomes the sub-command's description. Keeping the parsers in the
modules lets ``python -m idsfs.emulator`` and ``idsfs emulator`` share one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence

from idsfs import __version__

#: sub-command name -> module implementing it
SUBCOMMANDS: dict[str, str] = {
    "emulator": "idsfs.emulator.cli",
    "get": "idsfs.getput",
    "put": "idsfs.getput",
    "mount": "idsfs.mountcli",
    "umount": "idsfs.mountcli",
    "status": "idsfs.mountcli",
    "demo": "idsfs.mountcli",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for ``idsfs`` with every sub-command registered.

    Raises ``ImportError`` only when a sub-command's module cannot be imported (a broken
    installation).
    """
    parser = argparse.ArgumentParser(
        prog="idsfs",
        description="Mount an ICAT Data Service archive as a directory tree.",
    )
    parser.add_argument("--version", action="version", version=f"idsfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, modname in SUBCOMMANDS.items():
        module = importlib.import_module(modname)
        help_line = module.HELP[name] if isinstance(module.HELP, Mapping) else module.HELP
        p = sub.add_parser(
            name,
            help=help_line,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idsfs`` console script; returns the exit status.

    ``idsfs SPEC DIR [-o OPTIONS]`` (two words that are not a sub-command: how
    ``mount.fuse3`` runs ``idsfs`` for ``idsfs#SPEC`` and ``fuse.idsfs``
    fstab lines) is the mount helper, :func:`idsfs.mountcli.mount_helper`.

    Raises :class:`SystemExit` (argparse) for bad arguments, ``--help`` and
    ``--version``; otherwise what the sub-command's ``run`` raises (each says:
    server and usage errors become exit statuses).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in args_list if not a.startswith("-")]
    if args_list and args_list[0] not in SUBCOMMANDS and not args_list[0].startswith("-") \
            and len(words) >= 2:
        from idsfs.mountcli import mount_helper as helper

        return helper(args_list, prog="idsfs")
    args, extra = build_parser().parse_known_args(args_list)
    if extra:  # said by the sub-command's parser: its usage, not the top level's
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


def mount_helper() -> int:
    """Entry point of the ``mount.idsfs`` and ``mount.fuse.idsfs`` console scripts.

    Raises what :func:`idsfs.mountcli.mount_helper` raises.
    """
    import os

    from idsfs.mountcli import mount_helper as helper

    return helper(sys.argv[1:], prog=os.path.basename(sys.argv[0]) or "mount.idsfs")


if __name__ == "__main__":
    sys.exit(main())
