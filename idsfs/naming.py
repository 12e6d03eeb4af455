"""ICAT names <-> file names: escaping, byte limits and clashes.

The mount shows ``<facility>/<investigation name>/<visitId>/<dataset name>/<datafile name>``.
A ``/`` inside a *datafile* name makes subdirectories; every other name becomes
exactly one file name. ``docs/naming.md`` describes the rules with examples; in
short:

* ``%`` is the escape character, followed by two upper-case hex digits. Only
  these escapes exist: ``%00`` (NUL), ``%2F`` (``/``), ``%25`` (a literal ``%``
  that would otherwise read as an escape), ``%2E`` (the dots of a name that is
  ``.`` or ``..``), ``%ED%xx%xx`` (a lone UTF-16 surrogate, as its three
  WTF-8 bytes), and three markers idsfs makes up: ``%FD`` (the empty name),
  ``%FE`` (clash suffix) and ``%FF`` (shortened name). Anything else, ``%``
  included when no escape follows it (``50% done``, ``my%20file``), passes
  through unchanged, as do spaces, apostrophes and non-ASCII letters.
* A datafile name is split at each ``/`` that has a non-``/`` character on both
  sides; other slashes (leading, trailing, doubled) stay inside a component as
  ``%2F``, so no component is ever empty.
* A file name longer than 255 bytes (UTF-8) is cut at an escape boundary and
  ends in ``%FF`` plus 16 hex digits of the SHA-256 of the ICAT name; only the
  directory listing (:class:`Directory`) can map it back.
* When several entries of one directory would get the same file name, a
  directory keeps it (else the smallest ICAT name, then the smallest id) and
  every other entry gets ``%FE<ICAT id>`` appended. The outcome depends only on
  the set of entries, never on listing order or paging.

Reading names (ICAT -> file name) never fails. Mapping a name a user typed back
to an ICAT name (``create``, ``mkdir``, ``rename``) raises
:class:`UnstorableNameError` (a :class:`ValueError`) with an ``errno`` for names
that cannot be stored: :class:`InvalidNameError` (``EINVAL``) and
:class:`NameTooLongError` (``ENAMETOOLONG``). A typed name is accepted only in
its canonical spelling, the one a listing would show, so a created file always
appears under the name it was created with.

Everything here is pure and thread-agnostic.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DISAMBIGUATION_MARK",
    "EMPTY_NAME",
    "ESCAPE",
    "HASH_CHARS",
    "ICAT_NAME_MAX",
    "NAME_MAX",
    "SHORTENED_MARK",
    "DatafileTree",
    "Directory",
    "Entry",
    "InvalidNameError",
    "NameItem",
    "NameTooLongError",
    "UnstorableNameError",
    "check_icat_name",
    "datafile_name",
    "datafile_path",
    "escape_name",
    "icat_length",
    "icat_name",
    "is_synthetic",
    "join_datafile_name",
    "split_datafile_name",
    "unescape_name",
]

#: Longest file name in bytes (Linux ``NAME_MAX``).
NAME_MAX = 255
#: Longest ICAT name (string column length), in UTF-16 code units as Java counts.
ICAT_NAME_MAX = 255
#: The escape character.
ESCAPE = "%"
#: The file name of an entry whose ICAT name is empty.
EMPTY_NAME = "%FD"
#: Starts the suffix of an entry renamed because of a clash: ``%FE<id>``.
DISAMBIGUATION_MARK = "%FE"
#: Marks a shortened file name: ``<prefix>%FF<hash>``.
SHORTENED_MARK = "%FF"
#: Hex digits of SHA-256 in a shortened name.
HASH_CHARS = 16

_MARKERS = frozenset({EMPTY_NAME, DISAMBIGUATION_MARK, SHORTENED_MARK})
_TOKEN = r"%(?:00|25|2E|2F|ED%[AB][0-9A-F]%[89AB][0-9A-F]|F[DEF])"
_TOKEN_RE = re.compile(_TOKEN)
# Characters the forward mapping replaces; a '%' only when an escape follows it.
_SPECIAL_RE = re.compile(rf"[\x00/\ud800-\udfff]|%(?={_TOKEN[1:]})")
# One piece of an escaped name: an escape, or one character.
_PIECE_RE = re.compile(rf"{_TOKEN}|.", re.DOTALL)
# A '/' that separates datafile path components.
_SEPARATOR_RE = re.compile(r"(?<=[^/])/(?=[^/])")
_SHOW_MAX = 80


# -- errors ---------------------------------------------------------------------------------


def _show(name: str | bytes) -> str:
    text = repr(name)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 5] + "...'"


class UnstorableNameError(ValueError):
    """A file name cannot become an ICAT name.

    Attributes:
        name: the offending name (as given).
        reason: why, in words.
        errno: the errno for the file system to return (``EINVAL`` here;
            subclasses set their own).

    Raised (as one of its subclasses) by :func:`unescape_name`,
    :func:`icat_name`, :func:`check_icat_name`, :func:`join_datafile_name`,
    :func:`datafile_name` and :meth:`DatafileTree.new_datafile_name`.
    """

    errno: int = errno.EINVAL

    def __init__(self, name: str | bytes, reason: str) -> None:
        super().__init__(f"cannot store the name {_show(name)}: {reason}")
        self.name = name
        self.reason = reason


class InvalidNameError(UnstorableNameError):
    """The name is not valid here (``EINVAL``): not UTF-8, not canonical, reserved, ...

    Raised by the functions named at :class:`UnstorableNameError`.
    """

    errno = errno.EINVAL


class NameTooLongError(UnstorableNameError):
    """The name is too long for a file name or for ICAT (``ENAMETOOLONG``).

    Raised by the functions named at :class:`UnstorableNameError`.
    """

    errno = errno.ENAMETOOLONG


# -- single names ---------------------------------------------------------------------------


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def _escape(name: str) -> str:
    """Escape one name without any length limit."""
    if not name:
        return EMPTY_NAME
    if name in (".", ".."):
        return "%2E" * len(name)
    if _SPECIAL_RE.search(name) is None:
        return name
    return _SPECIAL_RE.sub(_escape_char, name)


def _digest(name: str) -> str:
    """Return the SHA-256 hex digest of a name (surrogates kept as WTF-8)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def _fit(escaped: str, name: str, reserve: int = 0) -> str:
    """Shorten an escaped name so that it plus ``reserve`` bytes fit in NAME_MAX bytes."""
    limit = NAME_MAX - reserve
    if len(escaped) * 4 <= limit or len(escaped.encode()) <= limit:
        return escaped
    budget = limit - len(SHORTENED_MARK) - HASH_CHARS
    used = 0
    pieces: list[str] = []
    for piece in _PIECE_RE.findall(escaped):
        size = len(piece.encode())
        if used + size > budget:
            break
        pieces.append(piece)
        used += size
    return "".join(pieces) + SHORTENED_MARK + _digest(name)[:HASH_CHARS]


def escape_name(name: str) -> str:
    """Return the file name for one ICAT name (or one datafile path component).

    The result is never empty, ``.`` or ``..``, holds no ``/`` or NUL, is valid
    UTF-8 (``result.encode()`` never fails) and is at most :data:`NAME_MAX`
    bytes long. Different names give different file names (shortened names
    differ by their hash). Names that did not have to be shortened are
    restored exactly by :func:`unescape_name`.

    Raises:
        TypeError: if ``name`` is not a str.
    """
    if not isinstance(name, str):
        raise TypeError(f"a name must be a str, not {type(name).__name__}")
    return _fit(_escape(name), name)


def _decode_token(match: re.Match[str]) -> str:
    token = match.group()
    if token in _MARKERS:
        raise _MarkerFound(token)
    return bytes.fromhex(token.replace("%", "")).decode("utf-8", "surrogatepass")


class _MarkerFound(Exception):
    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.token = token


def _as_text(file_name: str | bytes) -> str:
    if isinstance(file_name, bytes):
        try:
            return file_name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidNameError(file_name, "it is not valid UTF-8") from exc
    if not isinstance(file_name, str):
        raise TypeError(f"a file name must be str or bytes, not {type(file_name).__name__}")
    return file_name


def unescape_name(file_name: str | bytes) -> str:
    """Return the ICAT name (or datafile path component) that a file name stands for.

    This is the exact inverse of :func:`escape_name` for every name that was
    not shortened or given a clash suffix; those need the directory listing
    (:meth:`Directory.get`). ``%FD`` gives the empty name, lone surrogates come
    back as such. A name typed in any other spelling than the canonical one is
    refused, so that ``escape_name(unescape_name(x)) == x`` always holds.

    Args:
        file_name: a file name as str, or as the bytes the kernel passes.

    Raises:
        InvalidNameError: the name is empty, ``.`` or ``..``, contains ``/`` or
            NUL, is not valid UTF-8 (bytes) or holds a lone surrogate (str),
            contains ``%FE``/``%FF`` (made up by idsfs, not storable), or is not
            in canonical form (the message gives the canonical spelling).
        NameTooLongError: the name is longer than :data:`NAME_MAX` bytes.
        TypeError: ``file_name`` is neither str nor bytes.
    """
    text = _as_text(file_name)
    if not text:
        raise InvalidNameError(file_name, "it is empty")
    if text in (".", ".."):
        raise InvalidNameError(file_name, "'.' and '..' are not names")
    if "/" in text or "\x00" in text:
        raise InvalidNameError(file_name, "it contains '/' or NUL")
    try:
        encoded_length = len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidNameError(file_name, "it is not valid UTF-8") from exc
    if encoded_length > NAME_MAX:
        raise NameTooLongError(file_name, f"it is longer than {NAME_MAX} bytes")
    if text == EMPTY_NAME:
        return ""
    try:
        name = _TOKEN_RE.sub(_decode_token, text)
    except _MarkerFound as found:
        raise InvalidNameError(
            file_name,
            f"{found.token} is reserved for names made up by idsfs (empty, clashing or "
            f"shortened names); write a literal '%' as %25 before it",
        ) from None
    except UnicodeDecodeError as exc:  # pragma: no cover - the token syntax rules it out
        raise InvalidNameError(file_name, "its escapes are not valid UTF-8") from exc
    canonical = _escape(name)
    if canonical != text:
        raise InvalidNameError(file_name, f"it is not in canonical form, write {canonical!r}")
    return name


def is_synthetic(file_name: str | bytes) -> bool:
    """Return whether a file name was made up by idsfs (shortened or clash-suffixed).

    Such names cannot be decoded by :func:`unescape_name`; look them up in the
    directory's :class:`Directory` instead. Never raises for str or bytes input.
    """
    if isinstance(file_name, bytes):
        file_name = file_name.decode("utf-8", "replace")
    return any(
        m.group() in (SHORTENED_MARK, DISAMBIGUATION_MARK) for m in _TOKEN_RE.finditer(file_name)
    )


def icat_length(name: str) -> int:
    """Return the length of a name as ICAT counts it (UTF-16 code units).

    Raises ``TypeError`` if ``name`` is not a str.
    """
    return len(name) + sum(1 for char in name if ord(char) > 0xFFFF)


def check_icat_name(name: str) -> str:
    """Return ``name`` if ICAT can store it as the name of a new object.

    Raises:
        InvalidNameError: the name is empty or contains NUL or a lone surrogate.
        NameTooLongError: it is longer than :data:`ICAT_NAME_MAX` UTF-16 code units.
    """
    if not name:
        raise InvalidNameError(name, "ICAT names cannot be empty")
    if "\x00" in name:
        raise InvalidNameError(name, "ICAT names cannot contain NUL")
    if re.search(r"[\ud800-\udfff]", name):
        raise InvalidNameError(name, "it contains a lone surrogate, which is not valid Unicode")
    if icat_length(name) > ICAT_NAME_MAX:
        raise NameTooLongError(name, f"ICAT names are limited to {ICAT_NAME_MAX} characters")
    return name


def icat_name(file_name: str | bytes) -> str:
    """Return the ICAT name to create for a file name a user typed (e.g. ``mkdir``).

    For facility, investigation, visit and dataset names, where the whole name
    is one file name. Use :func:`datafile_name` or
    :meth:`DatafileTree.new_datafile_name` for datafiles.

    Raises:
        InvalidNameError, NameTooLongError: as :func:`unescape_name` and
            :func:`check_icat_name` raise them (for example ``%FD``, the empty
            name, cannot be stored).
        TypeError: ``file_name`` is neither str nor bytes.
    """
    name = unescape_name(file_name)
    try:
        return check_icat_name(name)
    except UnstorableNameError as exc:
        raise type(exc)(file_name, exc.reason) from None


# -- datafile paths -------------------------------------------------------------------------


def split_datafile_name(name: str) -> tuple[str, ...]:
    """Split a datafile name into its path components (not escaped).

    A ``/`` separates components only when it has a non-``/`` character on both
    sides; leading, trailing and repeated slashes stay inside the neighbouring
    component. So no component is empty (except the single component of the
    empty name), and ``"/".join(parts)`` restores the name.

    Examples: ``"a/b"`` -> ``("a", "b")``; ``"/abs/x"`` -> ``("/abs", "x")``;
    ``"a//b"`` -> ``("a//b",)``; ``"a/../b"`` -> ``("a", "..", "b")``.

    Raises ``TypeError`` if ``name`` is not a str.
    """
    return tuple(_SEPARATOR_RE.split(name))


def join_datafile_name(parts: Sequence[str]) -> str:
    """Join path components (not escaped) into a datafile name: the inverse of the split.

    Raises:
        InvalidNameError: there are no parts, or the parts are not what
            :func:`split_datafile_name` makes of their join (an empty part, a
            part beginning or ending with ``/`` next to another part, ...).
    """
    parts = tuple(parts)
    name = "/".join(parts)
    if not parts or split_datafile_name(name) != parts:
        raise InvalidNameError(
            name, "these path components do not form a datafile name unambiguously"
        )
    return name


def datafile_path(name: str) -> tuple[str, ...]:
    """Return the file names of the path a datafile name maps to (before clash handling).

    The real path of a datafile in a listing can differ when names clash; use
    :class:`DatafileTree` to get it. Raises ``TypeError`` if ``name`` is not a str.
    """
    return tuple(escape_name(part) for part in split_datafile_name(name))


def datafile_name(path: Sequence[str | bytes]) -> str:
    """Return the datafile name for a path of file names below a dataset directory.

    Every component is decoded with :func:`unescape_name`, so directories made
    up by idsfs (shortened or clash-suffixed names) cannot appear in ``path``;
    :meth:`DatafileTree.new_datafile_name` resolves those through the listing.

    Raises:
        InvalidNameError: a component is invalid (see :func:`unescape_name`),
            the components do not form a datafile name unambiguously (see
            :func:`join_datafile_name`), or the path is empty.
        NameTooLongError: a component is too long, or the whole name is longer
            than :data:`ICAT_NAME_MAX`.
    """
    return _datafile_name_from_parts([unescape_name(part) for part in path])


def _datafile_name_from_parts(parts: Sequence[str]) -> str:
    if not parts:
        raise InvalidNameError("", "a datafile needs a name")
    name = "/".join(parts)
    if split_datafile_name(name) != tuple(parts):
        raise InvalidNameError(
            name,
            "a component is empty or starts or ends with '/' next to another component, "
            "so the name would show differently",
        )
    try:
        return check_icat_name(name)
    except UnstorableNameError as exc:
        raise type(exc)(name, exc.reason) from None


# -- directories ----------------------------------------------------------------------------


class NameItem(NamedTuple):
    """One ICAT object to show in a directory.

    Attributes:
        name: its ICAT name (for datafiles: one path component).
        id: its ICAT id, or ``None`` for directories that stand for no single
            object (datafile path prefixes).
        is_dir: whether it is shown as a directory.

    Constructing one never raises.
    """

    name: str
    id: int | None
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a :class:`Directory`.

    Attributes:
        file_name: the name shown (valid UTF-8, at most :data:`NAME_MAX` bytes).
        name: the ICAT name (for datafiles: the path component) it stands for.
        is_dir: whether it is a directory.
        ids: the ICAT ids behind it, ascending: one for a file; several for a
            directory merging objects of one name (investigations sharing a
            name); none for a datafile path prefix.

    Constructing one never raises.
    """

    file_name: str
    name: str
    is_dir: bool
    ids: tuple[int, ...]

    @property
    def id(self) -> int | None:
        """The smallest ICAT id behind the entry, or ``None``. Never raises."""
        return self.ids[0] if self.ids else None

    @property
    def file_name_bytes(self) -> bytes:
        """The file name encoded as UTF-8, as the kernel wants it.

        Never raises (file names are valid UTF-8).
        """
        return self.file_name.encode()

    @property
    def shortened(self) -> bool:
        """Whether the file name was shortened (it ends in a hash). Never raises."""
        return SHORTENED_MARK in self.file_name

    @property
    def disambiguated(self) -> bool:
        """Whether the file name got a clash suffix. Never raises."""
        return DISAMBIGUATION_MARK in self.file_name


class _Candidate(NamedTuple):
    name: str
    is_dir: bool
    ids: tuple[int, ...]


def _keeper_order(candidate: _Candidate) -> tuple[int, str, tuple[int, ...]]:
    return (0 if candidate.is_dir else 1, candidate.name, candidate.ids)


def _file_name_of(entry: Entry) -> str:
    return entry.file_name


def _clash_suffix(candidate: _Candidate) -> str:
    if candidate.ids:
        return f"{DISAMBIGUATION_MARK}{candidate.ids[0]}"
    # Only datafile path prefixes have no id; two of them can only share a file
    # name when both were shortened and their hashes agree.
    return f"{DISAMBIGUATION_MARK}h{_digest(candidate.name)[:32]}"


class Directory(Mapping[str, Entry]):
    """The entries of one directory, built from the ICAT objects it shows.

    A mapping from file name to :class:`Entry`, iterated in file-name order
    (code point order, which is UTF-8 byte order). Directory items of equal
    name are merged into one entry; identical file items (same name and id,
    e.g. repeated by paging) are kept once. Clashes are settled as the module
    documentation says. Build it from the complete listing of the directory:
    clash handling needs all entries.

    Args:
        items: :class:`NameItem` or ``(name, id, is_dir)`` tuples.

    Raises:
        TypeError: an item's name is not a str or its id not an int or None.
    """

    __slots__ = ("_by_file_name", "_by_id", "_by_name", "_entries")

    def __init__(self, items: Iterable[NameItem | tuple[str, int | None, bool]]) -> None:
        dirs: dict[str, set[int]] = {}
        files: set[tuple[str, int | None]] = set()
        for name, item_id, is_dir in items:
            if not isinstance(name, str):
                raise TypeError(f"an ICAT name must be a str, not {type(name).__name__}")
            if item_id is not None and (isinstance(item_id, bool) or not isinstance(item_id, int)):
                raise TypeError(f"an ICAT id must be an int or None, not {item_id!r}")
            if is_dir:
                ids = dirs.setdefault(name, set())
                if item_id is not None:
                    ids.add(item_id)
            else:
                files.add((name, item_id))
        candidates = [_Candidate(name, True, tuple(sorted(ids))) for name, ids in dirs.items()]
        candidates += [
            _Candidate(name, False, () if item_id is None else (item_id,))
            for name, item_id in files
        ]
        first: dict[str, _Candidate] = {}
        clashes: dict[str, list[_Candidate]] = {}
        for candidate in candidates:
            file_name = escape_name(candidate.name)
            if file_name not in first:
                first[file_name] = candidate
            else:
                clashes.setdefault(file_name, [first[file_name]]).append(candidate)
        entries: list[Entry] = []
        for file_name, candidate in first.items():
            group = clashes.get(file_name)
            if group is None:
                entries.append(Entry(file_name, candidate.name, candidate.is_dir, candidate.ids))
                continue
            group.sort(key=_keeper_order)
            keeper, *others = group
            entries.append(Entry(file_name, keeper.name, keeper.is_dir, keeper.ids))
            for other in others:
                suffix = _clash_suffix(other)
                shown = _fit(_escape(other.name), other.name, len(suffix.encode())) + suffix
                entries.append(Entry(shown, other.name, other.is_dir, other.ids))
        entries.sort(key=_file_name_of)
        self._entries = tuple(entries)
        self._by_file_name = {entry.file_name: entry for entry in entries}
        self._by_name: dict[tuple[str, bool], Entry] = {}
        self._by_id: dict[int, Entry] = {}
        for entry in entries:
            self._by_name.setdefault((entry.name, entry.is_dir), entry)
            for entry_id in entry.ids:
                self._by_id.setdefault(entry_id, entry)

    @property
    def entries(self) -> tuple[Entry, ...]:
        """All entries, in file-name order. Never raises."""
        return self._entries

    def __getitem__(self, file_name: str) -> Entry:
        """Return the entry shown as ``file_name``.

        Raises:
            KeyError: there is none.
        """
        return self._by_file_name[file_name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_file_name)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, file_name: object) -> bool:
        return file_name in self._by_file_name

    def find(self, name: str, is_dir: bool | None = None) -> Entry | None:
        """Return the entry of an ICAT name (or path component), or ``None``.

        Args:
            name: the ICAT name.
            is_dir: look only for a directory (``True``) or a file (``False``);
                ``None`` prefers the directory.

        Never raises.
        """
        if is_dir is None:
            return self._by_name.get((name, True)) or self._by_name.get((name, False))
        return self._by_name.get((name, is_dir))

    def find_id(self, icat_id: int) -> Entry | None:
        """Return the entry standing for the ICAT object ``icat_id``, or ``None``. Never raises."""
        return self._by_id.get(icat_id)

    def __repr__(self) -> str:
        return f"<Directory of {len(self._entries)} entries>"


class DatafileTree:
    """The directories below one dataset, made from its datafiles' names.

    Paths are tuples of file names relative to the dataset directory; ``()``
    is the dataset directory itself. Datafile path prefixes become directories
    without an ICAT id. Datafiles repeated with the same id (paging overlap)
    count once, the last name winning.

    Args:
        datafiles: ``(name, id)`` pairs of all the dataset's datafiles.

    Raises:
        TypeError: a name is not a str or an id not an int.
    """

    __slots__ = ("_dirs", "_names", "_paths")

    def __init__(self, datafiles: Iterable[tuple[str, int]]) -> None:
        names: dict[int, str] = {}
        for name, datafile_id in datafiles:
            if not isinstance(name, str):
                raise TypeError(f"a datafile name must be a str, not {type(name).__name__}")
            if isinstance(datafile_id, bool) or not isinstance(datafile_id, int):
                raise TypeError(f"a datafile id must be an int, not {datafile_id!r}")
            names[datafile_id] = name
        self._names = names
        self._dirs: dict[tuple[str, ...], Directory] = {}
        self._paths: dict[int, tuple[str, ...]] = {}
        Member = tuple[tuple[str, ...], int]
        stack: list[tuple[tuple[str, ...], list[Member]]] = [
            ((), [(split_datafile_name(name), did) for did, name in names.items()])
        ]
        while stack:
            path, members = stack.pop()
            items: list[NameItem] = []
            children: dict[str, list[Member]] = {}
            for parts, did in members:
                if len(parts) == 1:
                    items.append(NameItem(parts[0], did, False))
                else:
                    children.setdefault(parts[0], []).append((parts[1:], did))
            items.extend(NameItem(part, None, True) for part in children)
            directory = Directory(items)
            self._dirs[path] = directory
            for entry in directory.entries:
                if not entry.is_dir:
                    self._paths[entry.ids[0]] = (*path, entry.file_name)
            for part, sub in children.items():
                entry = directory.find(part, is_dir=True)
                assert entry is not None
                stack.append(((*path, entry.file_name), sub))

    def __len__(self) -> int:
        """The number of datafiles."""
        return len(self._names)

    @property
    def datafiles(self) -> tuple[tuple[str, int], ...]:
        """The ``(name, id)`` pairs the tree was built from (for rebuilding it). Never raises."""
        return tuple((name, did) for did, name in self._names.items())

    @property
    def directories(self) -> tuple[tuple[str, ...], ...]:
        """The paths of all directories, the dataset directory ``()`` first. Never raises."""
        return tuple(sorted(self._dirs, key=lambda p: (len(p), p)))

    def directory(self, path: Sequence[str] = ()) -> Directory | None:
        """Return the listing of the directory at ``path``, or ``None`` if there is none.

        Never raises.
        """
        return self._dirs.get(tuple(path))

    def lookup(self, path: Sequence[str]) -> Entry | None:
        """Return the entry at ``path`` (a file or a directory), or ``None``.

        Raises:
            ValueError: ``path`` is empty (the dataset directory has no entry).
        """
        path = tuple(path)
        if not path:
            raise ValueError("the dataset directory itself has no entry")
        parent = self._dirs.get(path[:-1])
        return None if parent is None else parent.get(path[-1])

    def path_of(self, datafile_id: int) -> tuple[str, ...] | None:
        """Return the path where a datafile is shown, or ``None`` if it is not in the tree.

        Never raises.
        """
        return self._paths.get(datafile_id)

    def name_of(self, datafile_id: int) -> str | None:
        """Return the ICAT name of a datafile of the tree, or ``None``. Never raises."""
        return self._names.get(datafile_id)

    def new_datafile_name(self, path: Sequence[str | bytes]) -> str:
        """Return the ICAT name for a new datafile (or a rename target) at ``path``.

        Directory components that exist in the tree stand for their ICAT path
        component (so shortened or suffixed directory names work); others (new
        directories) and the last component are decoded with
        :func:`unescape_name`.

        Raises:
            InvalidNameError: a component is invalid or names a file of the
                tree, the components do not form a datafile name
                unambiguously, or ``path`` is empty.
            NameTooLongError: a component or the whole name is too long.
        """
        if not path:
            raise InvalidNameError("", "a datafile needs a name")
        texts = [_as_text(part) for part in path]
        parts: list[str] = []
        prefix: tuple[str, ...] = ()
        known = True
        for text in texts[:-1]:
            entry = self._dirs[prefix].get(text) if known and prefix in self._dirs else None
            if entry is not None and not entry.is_dir:
                raise InvalidNameError(text, "it is a file, not a directory")
            if entry is not None:
                parts.append(entry.name)
            else:
                known = False
                parts.append(unescape_name(text))
            prefix = (*prefix, text)
        parts.append(unescape_name(path[-1]))
        return _datafile_name_from_parts(parts)
