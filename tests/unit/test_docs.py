"""Tests that keep the documentation (docs/, README.md) true and buildable.

* every ``idsfs SUBCOMMAND ... --option`` the pages mention is an option of that
  sub-command's real parser;
* every demo path the quick start and the README show exists in the demo data
  (:func:`idsfs.emulator.demo.plan`), under the names the mount shows;
* the errno table of docs/semantics.md gives, row by row, what ``fs.ERRNO_TABLE`` gives;
* the Sphinx build passes with warnings as errors (``slow``: about 10 s; ``.ci/run``
  builds the documentation too, before pytest).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from idsfs import naming
from idsfs.cli import build_parser
from idsfs.emulator.demo import FACILITY, plan

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]

#: ``idsfs <sub-command>`` and what follows it on the same line of a page
_COMMAND = re.compile(r"\bidsfs (mount|umount|status|demo|emulator|get|put)\b([^`|;&#)\n]*)")
#: an option word (not the middle of a word or path)
_OPTION = re.compile(r"(?<![\w./-])(--?[A-Za-z][\w-]*)")


def _subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    for action in parser._actions:  # argparse has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return {name: {s for a in sub._actions for s in a.option_strings}
                    for name, sub in action.choices.items()}
    raise AssertionError("idsfs has no sub-commands")


def test_pages_exist() -> None:
    names = {p.name for p in PAGES}
    for page in ("index.md", "installation.md", "quickstart.md", "architecture.md",
                 "README.md"):
        assert page in names


def test_every_option_mentioned_exists() -> None:
    options = _subcommand_options()
    unknown = []
    for page in PAGES:
        for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in _COMMAND.finditer(line):
                sub, rest = match.groups()
                for option in _OPTION.findall(rest):
                    if option not in options[sub]:
                        unknown.append(f"{page.name}:{lineno}: idsfs {sub} {option}")
    assert not unknown, "options the docs mention but idsfs does not have:\n" + "\n".join(unknown)


def test_the_option_check_can_fail() -> None:
    options = _subcommand_options()
    line = "run `idsfs mount --no-such-option /mnt` and `idsfs status --json x`"
    found = [(m.group(1), o) for m in _COMMAND.finditer(line) for o in _OPTION.findall(m.group(2))]
    assert ("mount", "--no-such-option") in found and ("status", "--json") in found
    assert "--no-such-option" not in options["mount"] and "--json" in options["status"]


def _demo_tree() -> set[tuple[str, ...]]:
    """Every directory and file path of the demo mount, as file names, below the mount."""
    paths: set[tuple[str, ...]] = {(FACILITY,)}
    for inv in plan(1, 64 << 20):
        visit = (FACILITY, naming.escape_name(inv.name), naming.escape_name(inv.visit_id))
        paths |= {visit[:2], visit}
        for ds in inv.datasets:
            dataset = (*visit, naming.escape_name(ds.name))
            paths.add(dataset)
            for f in ds.files:
                parts = f.name.split("/")
                for i in range(1, len(parts) + 1):
                    paths.add((*dataset, *(naming.escape_name(p) for p in parts[:i])))
    return paths


def test_demo_paths_in_the_docs_exist() -> None:
    tree = _demo_tree()
    # whole paths: quoted ones, and getfattr's "# file: PATH" lines; then the others
    whole = re.compile(r"'ids-demo/([^']*)'|^# file: ids-demo/(.*)$", re.MULTILINE)
    plain = re.compile(r"\bids-demo/([^\s'\"`)]+)")
    checked = 0
    missing = []
    for page in (DOCS / "quickstart.md", DOCS / "usage.md", ROOT / "README.md"):
        text = page.read_text(encoding="utf-8")
        paths = [a or b for a, b in whole.findall(text)]
        paths += [p.rstrip(";,.:") for p in plain.findall(whole.sub("", text))]
        for path in paths:
            if "..." in path:
                continue
            parts = tuple(p for p in path.split("/") if p)
            if parts and "*" not in parts[-1]:
                checked += 1
                if parts not in tree:
                    missing.append(f"{page.name}: ids-demo/{path}")
    assert checked >= 10
    assert not missing, "demo paths the docs show but the demo does not have:\n" + "\n".join(
        missing)


def _docs_errno_rows() -> list[tuple[str, str]]:
    """(exception class name, errno name or "own") of each row of the errno table of
    docs/semantics.md, in order; the last row ("anything else") is left out."""
    text = (DOCS / "semantics.md").read_text(encoding="utf-8")
    table = text.split("| Exception | errno |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines():
        exc_cell, errno_cell = line.strip("|").split(" | ")
        names = re.findall(r"`([\w.]+)`", exc_cell)
        if not names:  # "anything else (a bug; ...)"
            continue
        own = errno_cell.lstrip().startswith("its `.errno`")
        errno_name = "own" if own else re.fullmatch(r"\s*`(E[A-Z]+)`\s*", errno_cell).group(1)
        rows.append((names[0].rsplit(".", 1)[-1], errno_name))
    return rows


def test_errno_table_in_the_docs_is_the_code_s() -> None:
    """Each row of the docs' table gives the errno fs.ERRNO_TABLE gives that class (the
    docs spell out some subclasses the code covers with one row), and every row of the
    code is in the docs."""
    import errno

    from idsfs import blockcache, errors, naming
    from idsfs.fs import ERRNO_TABLE

    def matches(cls: type, documented: str) -> bool:
        listed_value = next(v for listed, v in ERRNO_TABLE if issubclass(cls, listed))
        if listed_value is None:  # the exception's own errno: its class's, unless set per
            own = getattr(cls, "errno", None)  # instance (SpoolError: the OS error's)
            return documented == "own" or errno.errorcode.get(own) == documented
        return errno.errorcode[listed_value] == documented

    rows = _docs_errno_rows()
    assert len(rows) >= 20
    wrong = []
    for name, documented in rows:
        cls = next(getattr(m, name) for m in (errors, naming, blockcache) if hasattr(m, name))
        if not matches(cls, documented):
            wrong.append(f"{name}: docs say {documented}")
    assert not wrong, wrong
    documented_names = {name for name, _ in rows}
    assert {cls.__name__ for cls, _ in ERRNO_TABLE} <= documented_names


def test_demo_hints_are_the_quick_start_s() -> None:
    from idsfs.mountcli import _demo_hints

    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    start = text.index("Try, in another terminal:")
    end = text.index("Press Ctrl-C here to unmount and stop.", start)
    shown = text[start:end] + "Press Ctrl-C here to unmount and stop."
    assert _demo_hints("ids-demo") == shown


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "html" / "api.html").read_text(encoding="utf-8").count(
        'id="idsfs.ids.IDSClient.getData"') == 1
