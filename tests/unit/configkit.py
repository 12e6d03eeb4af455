"""Shared helper of the config tests: parse a command line as ``idsfs mount`` does."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from idsfs import mountcli
from idsfs.config import Config


def mount_config(argv: list[str], *, environ: dict[str, str] | None = None,
                 search_path: list[Path] | None = None,
                 prompt: Callable[[str], str] | None = None) -> Config:
    """The Config ``idsfs mount ARGV`` assembles (mountcli.config_from_args).

    ``environ`` defaults to an empty environment and ``search_path`` to no
    config files, so the machine's own settings never take part.
    """
    parser = argparse.ArgumentParser(prog="idsfs mount")
    mountcli.add_arguments(parser)
    args = parser.parse_args(argv)
    return mountcli.config_from_args(
        args, environ=environ if environ is not None else {}, prompt=prompt,
        search_path=search_path if search_path is not None else [])
