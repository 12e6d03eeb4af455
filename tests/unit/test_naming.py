"""Tests of idsfs.naming: ICAT names <-> file names (issue 4: a test for each odd name)."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from idsfs import naming
from idsfs.naming import (
    ICAT_NAME_MAX,
    NAME_MAX,
    DatafileTree,
    Directory,
    InvalidNameError,
    NameItem,
    NameTooLongError,
    UnstorableNameError,
    check_icat_name,
    datafile_name,
    datafile_path,
    escape_name,
    icat_length,
    icat_name,
    is_synthetic,
    join_datafile_name,
    split_datafile_name,
    unescape_name,
)


def roundtrip(name: str) -> str:
    shown = escape_name(name)
    assert unescape_name(shown) == name
    assert unescape_name(shown.encode()) == name
    return shown


# -- the common case passes through unchanged -----------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "run 42.nxs",
        "O'Brien's sample",
        "Müller \u2013 Überprüfung",
        "日本語のデータ",
        "emoji 😀 data",
        "...",
        ".hidden",
        "a.",
        "50% done",
        "my%20file.pdf",
        "100%",
        "%",
        "%2f lower-case is literal",
        "%ZZ",
        "tab\tand\nnewline",
        "N-A",
    ],
)
def test_common_names_pass_unchanged(name: str) -> None:
    assert roundtrip(name) == name
    assert not is_synthetic(name)


# -- '/' outside datafile names ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("N/A", "N%2FA"),  # a typical visitId
        ("/", "%2F"),
        ("a/b/c", "a%2Fb%2Fc"),
        ("//x//", "%2F%2Fx%2F%2F"),
    ],
)
def test_slash_in_non_datafile_names_is_escaped(name: str, shown: str) -> None:
    assert roundtrip(name) == shown
    assert icat_name(shown) == name  # mkdir of a dataset named "N/A" works


# -- NUL --------------------------------------------------------------------------------------


def test_nul_is_escaped_but_cannot_be_stored() -> None:
    assert roundtrip("a\x00b") == "a%00b"
    assert roundtrip("\x00") == "%00"
    with pytest.raises(InvalidNameError, match="NUL") as info:
        icat_name("a%00b")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(InvalidNameError):
        unescape_name("a\x00b")  # a raw NUL is never a file name


# -- '.', '..' and the empty name ---------------------------------------------------------------


def test_dot_names_are_escaped() -> None:
    assert roundtrip(".") == "%2E"
    assert roundtrip("..") == "%2E%2E"
    assert icat_name("%2E%2E") == ".."
    for typed in (".", ".."):
        with pytest.raises(InvalidNameError, match="not names"):
            unescape_name(typed)
    # Only whole-name dots are escaped; other spellings are not canonical.
    for typed in ("%2E.", "a%2Eb", "%2E%2E%2E"):
        with pytest.raises(InvalidNameError, match="canonical"):
            unescape_name(typed)


def test_empty_name() -> None:
    assert roundtrip("") == "%FD"
    with pytest.raises(InvalidNameError, match="empty"):
        icat_name("%FD")
    with pytest.raises(InvalidNameError, match="empty"):
        unescape_name("")
    with pytest.raises(InvalidNameError, match="reserved"):
        unescape_name("x%FD")


# -- the escape character itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("%2F", "%252F"),
        ("%25", "%2525"),
        ("%00", "%2500"),
        ("%2E", "%252E"),
        ("%FD", "%25FD"),
        ("%FE12", "%25FE12"),
        ("%FF", "%25FF"),
        ("%ED%A0%80", "%25ED%A0%80"),
        ("%ED%9F%BF", "%ED%9F%BF"),  # not a surrogate escape: literal
        ("%%2F", "%%252F"),
        ("a%/b", "a%%2Fb"),
    ],
)
def test_escape_character_is_escaped_only_before_an_escape(name: str, shown: str) -> None:
    assert roundtrip(name) == shown


# -- not valid UTF-8: lone surrogates from ICAT, bytes from the kernel ----------------------------


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("\udc80", "%ED%B2%80"),
        ("bad\ud800name", "bad%ED%A0%80name"),
        ("\udfff\ud800", "%ED%BF%BF%ED%A0%80"),
    ],
)
def test_lone_surrogates_are_escaped(name: str, shown: str) -> None:
    assert roundtrip(name) == shown
    shown.encode()  # valid UTF-8
    with pytest.raises(InvalidNameError, match="surrogate"):
        icat_name(shown)  # readable, but never created


def test_invalid_utf8_file_names_are_refused() -> None:
    with pytest.raises(InvalidNameError, match="UTF-8") as info:
        unescape_name(b"caf\xe9.dat")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(InvalidNameError, match="UTF-8"):
        unescape_name("caf\udce9.dat")  # os.fsdecode's spelling of the same bytes
    with pytest.raises(InvalidNameError, match="UTF-8"):
        datafile_name([b"dir", b"\xff"])
    assert unescape_name("café.dat".encode()) == "café.dat"


# -- longer than 255 bytes ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a" * 256, "é" * 200, "😀" * 70, "x/" * 200, "a" * 1000])
def test_long_names_are_shortened_deterministically(name: str) -> None:
    shown = escape_name(name)
    assert len(shown.encode()) <= NAME_MAX
    assert shown == escape_name(name)  # deterministic
    assert is_synthetic(shown)
    assert shown.endswith(naming._digest(name)[: naming.HASH_CHARS])
    prefix = shown[: shown.index(naming.SHORTENED_MARK)]
    assert naming._escape(name).startswith(prefix)  # cut at an escape boundary
    assert len(prefix.encode()) >= NAME_MAX - 40  # not cut needlessly short
    with pytest.raises(InvalidNameError, match="reserved"):
        unescape_name(shown)


def test_exactly_255_bytes_is_not_shortened() -> None:
    name = "b" * 253 + "é"
    assert len(name.encode()) == NAME_MAX
    assert roundtrip(name) == name
    assert escape_name(name + "c") != name + "c"


def test_escapes_count_towards_the_limit() -> None:
    name = "/" * 100  # 100 characters, 300 bytes escaped
    shown = escape_name(name)
    assert is_synthetic(shown)
    assert len(shown.encode()) <= NAME_MAX


def test_long_names_with_a_common_prefix_stay_distinct() -> None:
    a, b = "p" * 300 + "1", "p" * 300 + "2"
    assert escape_name(a) != escape_name(b)
    d = Directory([(a, 1, False), (b, 2, False)])
    assert {e.name for e in d.entries} == {a, b}
    assert d[escape_name(a)].ids == (1,)  # the listing maps the short name back


def test_long_typed_names_are_refused() -> None:
    with pytest.raises(NameTooLongError) as info:
        unescape_name("x" * 256)
    assert info.value.errno == errno.ENAMETOOLONG
    assert isinstance(info.value, ValueError)


def test_icat_length_limit() -> None:
    assert icat_length("abc") == 3
    assert icat_length("é") == 1
    assert icat_length("😀") == 2  # Java counts UTF-16 code units
    assert check_icat_name("x" * ICAT_NAME_MAX) == "x" * ICAT_NAME_MAX
    with pytest.raises(NameTooLongError, match="255"):
        check_icat_name("x" * (ICAT_NAME_MAX + 1))
    with pytest.raises(NameTooLongError):
        check_icat_name("😀" * 128)
    # A datafile path whose components fit but whose whole name does not.
    path = ["d" * 100, "e" * 100, "f" * 100]
    with pytest.raises(NameTooLongError) as info:
        datafile_name(path)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(NameTooLongError):
        DatafileTree([]).new_datafile_name(path)


def test_error_messages_are_bounded_and_helpful() -> None:
    with pytest.raises(InvalidNameError) as info:
        unescape_name("a%2Eb")
    assert "write 'a.b'" in str(info.value)
    with pytest.raises(NameTooLongError) as info2:
        unescape_name("y" * 400)
    assert len(str(info2.value)) < 200
    assert isinstance(info2.value, UnstorableNameError)


def test_percent_sequences_that_are_no_escapes_are_literal() -> None:
    # Only the escapes idsfs makes are decoded; URL-style sequences stay literal.
    assert unescape_name("%41") == "%41"
    assert unescape_name("a%2Fb%2f") == "a/b%2f"  # '%2F' is '/', '%2f' is literal


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [("%25x", "%x"), ("a%2Eb", "a.b"), ("%2E%2E%2E", "..."), ("%ED%A0%80%2E", "%ED%A0%80.")],
)
def test_non_canonical_escapes_are_refused_with_the_canonical_spelling(
    typed: str, canonical: str
) -> None:
    with pytest.raises(InvalidNameError, match="canonical") as info:
        unescape_name(typed)
    assert repr(canonical) in str(info.value)
    assert escape_name(unescape_name(canonical)) == canonical


def test_type_errors() -> None:
    with pytest.raises(TypeError):
        escape_name(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        unescape_name(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Directory([(5, 1, False)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Directory([("a", "1", False)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        DatafileTree([("a", None)])  # type: ignore[list-item]


# -- datafile names: '/' makes directories -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "parts", "path"),
    [
        ("a.dat", ("a.dat",), ("a.dat",)),
        ("raw/2024/a.dat", ("raw", "2024", "a.dat"), ("raw", "2024", "a.dat")),
        ("a/../b", ("a", "..", "b"), ("a", "%2E%2E", "b")),
        ("a/./b", ("a", ".", "b"), ("a", "%2E", "b")),
        ("../x", ("..", "x"), ("%2E%2E", "x")),
        ("a//b", ("a//b",), ("a%2F%2Fb",)),
        ("a///b/c", ("a///b", "c"), ("a%2F%2F%2Fb", "c")),
        ("/abs/path/x", ("/abs", "path", "x"), ("%2Fabs", "path", "x")),
        ("dir/", ("dir/",), ("dir%2F",)),
        ("a/b/", ("a", "b/"), ("a", "b%2F")),
        ("/", ("/",), ("%2F",)),
        ("//", ("//",), ("%2F%2F",)),
        ("", ("",), ("%FD",)),
        ("50%/x", ("50%", "x"), ("50%", "x")),
    ],
)
def test_datafile_paths(name: str, parts: tuple[str, ...], path: tuple[str, ...]) -> None:
    assert split_datafile_name(name) == parts
    assert join_datafile_name(parts) == name
    assert datafile_path(name) == path
    tree = DatafileTree([(name, 7)])
    assert tree.path_of(7) == path
    entry = tree.lookup(path)
    assert entry is not None and entry.ids == (7,) and not entry.is_dir
    if name:
        assert datafile_name(path) == name
        assert tree.new_datafile_name(path) == name
        assert datafile_name([p.encode() for p in path]) == name


@pytest.mark.parametrize(
    "path",
    [
        ("a%2F", "b"),  # would be "a//b": shows as one file
        ("a", "%2Fb"),
        ("%FD", "b"),  # empty component
        (),
    ],
)
def test_ambiguous_datafile_paths_are_refused(path: tuple[str, ...]) -> None:
    with pytest.raises(InvalidNameError):
        datafile_name(path)
    with pytest.raises(InvalidNameError):
        DatafileTree([]).new_datafile_name(path)


def test_join_refuses_parts_that_do_not_split_back() -> None:
    for parts in [(), ("a", ""), ("a/", "b"), ("a", "/b")]:
        with pytest.raises(InvalidNameError):
            join_datafile_name(parts)


# -- clashes after escaping -----------------------------------------------------------------------


def test_file_and_directory_of_one_name_clash() -> None:
    # Datafiles "a" and "a/b": "a" would be both a file and a directory.
    tree = DatafileTree([("a", 11), ("a/b", 12), ("a/c", 13)])
    root = tree.directory(())
    assert root is not None
    assert list(root) == ["a", "a%FE11"]
    assert root["a"].is_dir and root["a"].ids == ()
    assert root["a%FE11"].ids == (11,) and root["a%FE11"].disambiguated
    assert tree.path_of(11) == ("a%FE11",)
    assert tree.path_of(12) == ("a", "b")
    assert tree.name_of(11) == "a"
    sub = tree.directory(("a",))
    assert sub is not None and list(sub) == ["b", "c"]
    assert is_synthetic("a%FE11")
    with pytest.raises(InvalidNameError, match="reserved"):
        unescape_name("a%FE11")  # a user cannot create such a name


def test_clash_rule_is_stable_across_listing_order() -> None:
    items = [
        NameItem("a", 5, False),
        NameItem("a", None, True),
        NameItem("b", 3, False),
        NameItem("b", 1, False),  # same name twice (only on hash collisions in practice)
        NameItem("c", 9, True),
        NameItem("c", 4, True),  # directories of one name merge
    ]
    expected = Directory(items).entries
    rng = random.Random(1)
    for _ in range(20):
        rng.shuffle(items)
        assert Directory(items).entries == expected
    by_name = {e.file_name: e for e in expected}
    assert set(by_name) == {"a", "a%FE5", "b", "b%FE3", "c"}
    assert by_name["b"].ids == (1,)  # the smaller id keeps the plain name
    assert by_name["c"].ids == (4, 9)


def test_hash_collisions_are_settled_by_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force every shortened name to the same hash: the clash rule must still keep names unique.
    monkeypatch.setattr(naming, "_digest", lambda name: "0" * 64 if len(name) < 1000 else "1" * 64)
    a, b, c = "q" * 300 + "a", "q" * 300 + "b", "q" * 300 + "c"
    assert escape_name(a) == escape_name(b)
    d = Directory([(b, 2, False), (a, 1, False), (c, 3, True)])
    names = [e.file_name for e in d.entries]
    assert len(set(names)) == 3
    assert all(len(n.encode()) <= NAME_MAX for n in names)
    assert d.find(c, is_dir=True).file_name == escape_name(c)  # the directory keeps it
    assert d.find(a).file_name.endswith("%FE1")
    assert d.find(b).file_name.endswith("%FE2")
    # Two id-less directories (datafile path prefixes) colliding get hash suffixes.
    tree = DatafileTree([(a + "/x", 1), (b + "/y", 2)])
    root = tree.directory(())
    assert root is not None and len(root) == 2
    assert len({tree.path_of(1)[0], tree.path_of(2)[0]}) == 2
    assert tree.lookup(tree.path_of(2)).ids == (2,)


def test_suffixed_long_names_fit() -> None:
    long = "z" * 300
    tree = DatafileTree([(long, 123456789012), (long + "/in", 2)])
    path = tree.path_of(123456789012)
    assert path is not None
    assert path[0].endswith("%FE123456789012")
    assert len(path[0].encode()) <= NAME_MAX
    assert tree.directory((escape_name(long),)) is not None


def test_directory_mapping_api() -> None:
    d = Directory([("x", 1, False), ("y/z", 2, True), ("ALPHA", 3, True)])
    assert list(d) == ["ALPHA", "x", "y%2Fz"]  # code point order
    assert len(d) == 3
    assert "x" in d and "nope" not in d
    assert d.get("nope") is None
    with pytest.raises(KeyError):
        d["nope"]
    assert d.find("y/z").file_name == "y%2Fz"
    assert d.find("y/z", is_dir=False) is None
    assert d.find_id(3).file_name == "ALPHA"
    assert d.find_id(99) is None
    assert d["x"].file_name_bytes == b"x"
    assert d["x"].id == 1
    assert not d["x"].shortened and not d["x"].disambiguated
    assert "3 entries" in repr(d)


def test_tree_basics() -> None:
    tree = DatafileTree([("a/b/c.dat", 1), ("a/d.dat", 2), ("e.dat", 3), ("e.dat", 3)])
    assert len(tree) == 3
    assert tree.directories == ((), ("a",), ("a", "b"))
    assert sorted(tree.datafiles) == [("a/b/c.dat", 1), ("a/d.dat", 2), ("e.dat", 3)]
    assert tree.directory(("nope",)) is None
    assert tree.lookup(("nope", "x")) is None
    assert tree.lookup(("a",)).is_dir
    with pytest.raises(ValueError):
        tree.lookup(())
    assert tree.path_of(99) is None and tree.name_of(99) is None
    # New files: in existing directories, in new directories, not below a file.
    assert tree.new_datafile_name(("a", "b", "new.dat")) == "a/b/new.dat"
    assert tree.new_datafile_name(("a", "newdir", "x")) == "a/newdir/x"
    assert tree.new_datafile_name((b"top.dat",)) == "top.dat"
    with pytest.raises(InvalidNameError, match="is a file"):
        tree.new_datafile_name(("e.dat", "x"))


def test_new_files_below_synthetic_directories() -> None:
    # 130 characters fit ICAT, but 260 bytes do not fit a file name: shortened.
    long = "é" * 130
    tree = DatafileTree([(long + "/a", 1)])
    (shown,) = tree.directory(())
    assert is_synthetic(shown)
    with pytest.raises(InvalidNameError, match="reserved"):
        datafile_name((shown, "b"))  # cannot be decoded without the listing ...
    assert tree.new_datafile_name((shown, "b")) == long + "/b"  # ... the tree resolves it
    assert tree.new_datafile_name((shown, "new", "b")) == long + "/new/b"
    # The whole ICAT name must still fit ICAT's column.
    with pytest.raises(NameTooLongError):
        tree.new_datafile_name((shown, "b" * 130))


def test_new_names_must_be_canonical() -> None:
    with pytest.raises(InvalidNameError, match="canonical"):
        icat_name("%25x")
    with pytest.raises(InvalidNameError, match="reserved"):
        icat_name("x%FF0123456789abcdef")
    assert icat_name("N%2FA") == "N/A"
    assert icat_name(b"50% done") == "50% done"


# -- properties: escaping is injective and reversible ---------------------------------------------

# Characters that exercise every rule, plus anything at all.
ODD = st.sampled_from(
    [
        *("%", "/", ".", "\x00", "A", "B", "E", "D", "F", "0", "2", "5", "8", "9", "a", "é"),
        *(" ", "'", "\ud800", "\udbff", "\udc80", "\udfff", "😀", "日"),
    ]
)
CHARS = st.one_of(ODD, ODD, ODD, st.characters(codec=None))
NAMES = st.text(CHARS, max_size=40) | st.text(CHARS, min_size=60, max_size=300)


@settings(max_examples=800, deadline=None)
@given(NAMES)
def test_escape_gives_valid_file_names_and_reverses(name: str) -> None:
    shown = escape_name(name)
    assert shown not in ("", ".", "..")
    assert "/" not in shown and "\x00" not in shown
    assert len(shown.encode("utf-8")) <= NAME_MAX  # strict: no surrogates left
    if is_synthetic(shown):
        assert len(naming._escape(name).encode()) > NAME_MAX
    else:
        assert unescape_name(shown) == name
        assert unescape_name(shown.encode()) == name


@settings(max_examples=500, deadline=None)
@given(NAMES, NAMES)
def test_escape_is_injective(a: str, b: str) -> None:
    assume(a != b)
    assert escape_name(a) != escape_name(b)


@settings(max_examples=800, deadline=None)
@given(st.text(CHARS, max_size=60))
def test_typed_names_either_round_trip_or_are_refused(typed: str) -> None:
    try:
        name = unescape_name(typed)
    except UnstorableNameError:
        return
    assert escape_name(name) == typed


@settings(max_examples=500, deadline=None)
@given(st.text(CHARS, max_size=60))
def test_datafile_split_join(name: str) -> None:
    parts = split_datafile_name(name)
    assert "/".join(parts) == name
    assert join_datafile_name(parts) == name
    if name:
        assert all(parts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(CHARS, max_size=12), max_size=12, unique=True), st.randoms())
def test_tree_maps_every_datafile_to_a_unique_path_and_back(names: list[str], rnd) -> None:
    datafiles = [(name, 100 + i) for i, name in enumerate(names)]
    tree = DatafileTree(datafiles)
    paths = {}
    for name, did in datafiles:
        path = tree.path_of(did)
        assert path is not None
        assert all(len(p.encode()) <= NAME_MAX for p in path)
        entry = tree.lookup(path)
        assert entry is not None and entry.ids == (did,) and not entry.is_dir
        paths[path] = did
        if not any(is_synthetic(p) for p in path):
            try:
                check_icat_name(name)
            except UnstorableNameError:
                continue
            assert datafile_name(path) == name
    assert len(paths) == len(datafiles)
    # The same set in another order gives the same tree.
    rnd.shuffle(datafiles)
    other = DatafileTree(datafiles)
    assert all(other.path_of(did) == tree.path_of(did) for _, did in datafiles)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(CHARS, max_size=8), st.integers(1, 50), st.booleans()), max_size=20
    )
)
def test_directory_file_names_are_unique(items: list[tuple[str, int, bool]]) -> None:
    d = Directory(items)
    candidates = {(n, True) for n, _, is_dir in items if is_dir}
    candidates |= {(n, i, False) for n, i, is_dir in items if not is_dir}
    assert len(d) == len(candidates)
    assert len({e.file_name for e in d.entries}) == len(d)
    for entry in d.entries:
        assert d[entry.file_name] is entry
