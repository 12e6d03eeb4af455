"""Parser and compiler of the emulator's ICAT query language (icat-rest.md §4).

Execution against data is tested in test_catalogue_query.py; here: syntax,
error messages, INCLUDE rules and the shape of the generated SQL.
"""

from __future__ import annotations

import pytest

from idsfs.emulator.query import (
    Agg,
    BoolOp,
    Cmp,
    Lit,
    Path,
    UserParam,
    build_include,
    compile_search,
    parse_get,
    parse_search,
    tokenize,
)
from idsfs.emulator.schema import ENTITIES, ICATException, parse_timestamp_literal


def bad_param(fn, *args) -> str:
    with pytest.raises(ICATException) as info:
        fn(*args)
    assert info.value.code == "BAD_PARAMETER"
    assert info.value.status == 400
    assert info.value.offset is None
    return info.value.message


def test_tokens_keywords_case_insensitive_names_case_sensitive():
    toks = tokenize("select DiStInCt ds FROM Dataset ds where ds.name = 'a''b'")
    kinds = [(t.kind, t.value) for t in toks]
    assert kinds[0] == ("KW", "SELECT")
    assert kinds[1] == ("KW", "DISTINCT")
    assert ("NAME", "Dataset") in kinds
    assert ("STR", "a'b") in kinds
    assert kinds[-1][0] == "EOF"


def test_tokens_operators_and_literals():
    toks = tokenize("a != 1 <> 2.5 <= >= {ts 2014-01-01 12:00:00} :user *")
    vals = [(t.kind, t.value) for t in toks[:-1]]
    assert vals == [
        ("NAME", "a"),
        ("OP", "<>"),
        ("INT", "1"),
        ("OP", "<>"),
        ("REAL", "2.5"),
        ("OP", "<="),
        ("OP", ">="),
        ("TS", "2014-01-01 12:00:00"),
        ("PARAM", "user"),
        ("PUNCT", "*"),
    ]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ('SELECT ds FROM Dataset ds WHERE ds.name = "x"', "Double-quoted"),
        ("SELECT ds FROM Dataset ds WHERE ds.name = 'x", "Unterminated string"),
        ("SELECT ds FROM Dataset ds WHERE ds.modTime > {ts 2014-01-01}", "timestamp"),
        ("SELECT ds FROM Dataset ds WHERE ds.modTime > {2014-01-01 00:00:00}", "timestamp"),
        ("SELECT ds FROM Dataset ds WHERE ds.modTime > {ts 2014-13-01 00:00:00}", "timestamp"),
        ("SELECT ds FROM Dataset ds WHERE ds.name = 'x' ;", "Unexpected character ';'"),
        ("SELECT ds FROM dataset ds", "Unknown entity type 'dataset'"),
        ("SELECT ds FROM Dataset ds JOIN FETCH ds.datafiles df", "FETCH"),
        ("SELECT ds Dataset ds", "Expected FROM"),
        ("SELECT FROM Dataset ds", "select item"),
        ("SELECT ds FROM Dataset ds WHERE", "operand"),
        ("SELECT ds FROM Dataset ds WHERE ds.name", "comparison operator"),
        ("SELECT ds FROM Dataset ds LIMIT 5", "','"),
        ("SELECT ds FROM Dataset ds LIMIT a, 5", "integer offset"),
        ("SELECT ds FROM Dataset ds LIMIT 0, x", "count or '*'"),
        ("SELECT ds FROM Dataset ds WHERE ds.id = :other", "Unknown parameter :other"),
        ("SELECT ds FROM Dataset ds, Dataset ds", "defined twice"),
        ("SELECT ds FROM Dataset ds INCLUDE 2", "INCLUDE accepts the integer 1 only"),
        ("SELECT ds FROM Dataset ds INCLUDE 1, ds.investigation", "INCLUDE 1 cannot be combined"),
        ("SELECT ds FROM Dataset ds INCLUDE ds.investigation, 1", "INCLUDE 1 cannot be combined"),
        ("SELECT ds FROM Dataset ds INCLUDE Investigation", "must contain a '.'"),
        ("SELECT ds FROM Dataset ds WHERE ds.id IN (ds.id)", "literals only"),
        ("SELECT ds FROM Dataset ds WHERE SOUNDEX(ds.name) = 'x'", "not supported"),
        ("SELECT inv FROM Investigation inv INCLUDE inv.facility ORDER BY inv.name", "ORDER"),
        ("SELECT ds FROM Dataset ds LIMIT 0, 1 WHERE ds.id = 1", "must come before INCLUDE"),
        ("UPDATE Dataset ds SET ds.name = 'x'", "Expected SELECT"),
        ("", "Expected SELECT or an entity name"),
    ],
)
def test_syntax_errors_are_bad_parameter_with_useful_message(query, fragment):
    message = bad_param(parse_search, query)
    assert fragment in message


def test_position_is_reported():
    message = bad_param(parse_search, "SELECT ds FROM Dataset ds WHERE ds.name == 'x'")
    assert "position 41" in message


def test_select_items_and_aggregates():
    q = parse_search(
        "SELECT DISTINCT ds.id, COUNT(DISTINCT df), sum(df.fileSize), MIN(df.modTime) "
        "FROM Dataset ds JOIN ds.datafiles df GROUP BY ds.id"
    )
    assert q.distinct
    assert q.items[0] == Path("ds", ("id",), "ds.id")
    assert q.items[1] == Agg("COUNT", True, Path("df", (), "df"))
    assert q.items[2] == Agg("SUM", False, Path("df", ("fileSize",), "df.fileSize"))
    assert q.froms[1].kind == "inner"
    assert q.group_by == [Path("ds", ("id",), "ds.id")]


def test_variables_are_case_insensitive():
    q = parse_search("SELECT DS FROM Dataset ds WHERE Ds.name = 'x'")
    assert q.items[0].var == "ds"
    assert q.where.left.var == "ds"


def test_where_precedence_and_not():
    q = parse_search(
        "SELECT ds FROM Dataset ds WHERE NOT ds.id = 1 AND ds.id = 2 OR (ds.id = 3 AND ds.id = 4)"
    )
    w = q.where
    assert isinstance(w, BoolOp) and w.op == "OR"
    assert isinstance(w.parts[0], BoolOp) and w.parts[0].op == "AND"
    assert isinstance(w.parts[1], BoolOp) and w.parts[1].op == "AND"


def test_literals():
    q = parse_search(
        "SELECT ds FROM Dataset ds WHERE ds.name = 'Person''s file' AND ds.complete = TRUE "
        "AND ds.fileSize > -5 AND ds.modTime > {ts 2014-01-01 12:00:00} AND ds.createId = :user"
    )
    parts = q.where.parts
    assert parts[0] == Cmp("=", Path("ds", ("name",), "ds.name"), Lit("Person's file", "str"))
    assert parts[1].right == Lit(True, "bool")
    assert parts[2].right == Lit(-5, "int")
    assert parts[3].right == Lit(parse_timestamp_literal("2014-01-01 12:00:00"), "ts")
    assert parts[4].right == UserParam()


def test_limit_star_and_include_either_order():
    q1 = parse_search("SELECT ds FROM Dataset ds INCLUDE ds.investigation LIMIT 10, *")
    q2 = parse_search("SELECT ds FROM Dataset ds LIMIT 10, * INCLUDE ds.investigation")
    for q in (q1, q2):
        assert (q.offset, q.count, q.limited) == (10, None, True)
        assert q.include is not None and q.include.paths[0][0].fields == ("investigation",)


def test_from_forms():
    q = parse_search(
        "SELECT df FROM Datafile df, df.dataset ds, IN(ds.investigation.datasets) d2, "
        "Facility AS f LEFT OUTER JOIN ds.datafiles AS d3 INNER JOIN df.datafileFormat fmt"
    )
    kinds = [(f.kind, f.var) for f in q.froms]
    assert kinds == [
        ("root", "df"),
        ("inner", "ds"),
        ("inner", "d2"),
        ("cross", "f"),
        ("left", "d3"),
        ("inner", "fmt"),
    ]


def test_old_style_bare_entity():
    q = parse_search("Dataset")
    assert q.froms[0].entity == "Dataset"
    assert q.items == [Path(q.froms[0].var, (), q.froms[0].var)]
    q2 = parse_search("Datafile INCLUDE Dataset, Investigation")
    assert q2.include is not None and q2.include.types == ["Dataset", "Investigation"]
    assert "Old-style query" in bad_param(parse_search, "Facility.id")


def test_get_query_forms():
    g = parse_get("Dataset")
    assert g.entity == "Dataset" and g.include is None
    g = parse_get("Dataset ds INCLUDE ds.investigation.facility")
    assert g.var == "ds"
    node = build_include(ENTITIES["Dataset"], g.var, g.include)
    assert node is not None
    assert list(node.children) == ["investigation"]
    assert list(node.children["investigation"].children) == ["facility"]
    g = parse_get("Datafile INCLUDE Dataset, Investigation, Facility")
    node = build_include(ENTITIES["Datafile"], g.var, g.include)
    assert node is not None
    inv = node.children["dataset"].children["investigation"]
    assert list(inv.children) == ["facility"]
    g = parse_get("Investigation inv INCLUDE 1")
    node = build_include(ENTITIES["Investigation"], g.var, g.include)
    assert node is not None and set(node.children) == {"facility", "type"}
    assert "Unknown entity type" in bad_param(parse_get, "Nothing")
    assert "Unexpected" in bad_param(parse_get, "Dataset ds ds2")


def test_include_rules():
    ds = ENTITIES["Dataset"]

    def tree(text: str):
        q = parse_search(text)
        return build_include(ds, "ds", q.include)

    node = tree(
        "SELECT ds FROM Dataset ds INCLUDE ds.investigation inv, inv.facility, ds.datafiles"
    )
    assert node is not None
    assert set(node.children) == {"investigation", "datafiles"}
    assert set(node.children["investigation"].children) == {"facility"}
    # phantom relationships may be included (they stay empty)
    assert tree("SELECT ds FROM Dataset ds INCLUDE ds.parameters") is not None
    assert "listed twice" in bad_param(
        tree, "SELECT ds FROM Dataset ds INCLUDE ds.investigation, ds.investigation"
    )
    assert "listed twice" in bad_param(
        tree, "SELECT ds FROM Dataset ds INCLUDE ds.investigation.facility, ds.investigation.type"
    )
    assert "not a relationship field" in bad_param(
        tree, "SELECT ds FROM Dataset ds INCLUDE ds.name"
    )
    assert "not defined" in bad_param(tree, "SELECT ds FROM Dataset ds INCLUDE x.investigation")
    assert "already defined" in bad_param(
        tree, "SELECT ds FROM Dataset ds INCLUDE ds.investigation ds"
    )
    assert "cannot be reached" in bad_param(
        build_include, ds, "ds", parse_get("Dataset INCLUDE User").include
    )


def compiled(query: str, restricted: bool = True, max_entities: int = 100):
    return compile_search(parse_search(query), "simple/alice", restricted, max_entities)


def test_include_only_for_a_single_entity_variable():
    for query in (
        "SELECT ds.name FROM Dataset ds INCLUDE ds.investigation",
        "SELECT COUNT(ds) FROM Dataset ds INCLUDE ds.investigation",
        "SELECT ds, ds.name FROM Dataset ds INCLUDE ds.investigation",
    ):
        assert "single entity variable" in bad_param(compiled, query)


def test_user_text_is_bound_not_spliced():
    evil = "x' OR 1=1 --"
    c = compiled(
        f"SELECT ds FROM Dataset ds WHERE ds.name = '{evil.replace(chr(39), 2 * chr(39))}'"
    )
    assert evil in c.params.values()
    assert "OR 1=1" not in c.sql
    assert ":u" in c.sql and c.params["u"] == "simple/alice"


def test_fk_shortcut_and_implicit_joins():
    c = compiled("SELECT df.id FROM Datafile df WHERE df.dataset.id = 7", restricted=False)
    assert "JOIN" not in c.sql
    assert 't0."dataset_id"' in c.sql
    c = compiled(
        "SELECT df.id FROM Datafile df WHERE df.dataset.investigation.name = 'x' "
        "AND df.dataset.name = 'y'",
        restricted=False,
    )
    assert c.sql.count("JOIN") == 2  # one join per relationship step, reused


def test_authorisation_applies_to_the_selected_entity():
    c = compiled("SELECT df.dataset.name FROM Datafile df")
    # Dataset's rule restricts through its investigation
    assert 't1."investigation_id" IN' in c.sql
    c = compiled("SELECT f FROM Facility f")
    assert "WHERE" not in c.sql  # public
    c = compiled("SELECT df FROM Datafile df", restricted=False)
    assert "WHERE" not in c.sql


def test_limit_translation():
    assert "LIMIT 101 OFFSET 0" in compiled("SELECT ds FROM Dataset ds").sql
    assert "LIMIT 101 OFFSET 5" in compiled("SELECT ds FROM Dataset ds LIMIT 5, *").sql
    assert "LIMIT 101 OFFSET 0" in compiled("SELECT ds FROM Dataset ds LIMIT 0, 500").sql
    assert "LIMIT 20 OFFSET 3" in compiled("SELECT ds FROM Dataset ds LIMIT 3, 20").sql


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("SELECT ds FROM Dataset ds WHERE ds.nosuch = 1", "Dataset has no field nosuch"),
        ("SELECT ds FROM Dataset ds WHERE x.name = 'a'", "'x'"),
        ("SELECT ds FROM Dataset ds WHERE ds.datafiles.name = 'a'", "use JOIN"),
        ("SELECT ds FROM Dataset ds WHERE ds.name.x = 'a'", "not a relationship"),
        ("SELECT ds.datafiles FROM Dataset ds", "collection"),
        ("SELECT ds FROM Dataset ds JOIN ds.name n", "no relationship field name"),
        ("SELECT ds FROM Dataset ds JOIN ds.parameters p", "not supported"),
        ("SELECT SUM(ds.name) FROM Dataset ds", "numeric"),
        ("SELECT ds FROM Dataset ds WHERE ds.name IS EMPTY", "collection path"),
        ("SELECT ds FROM Dataset ds WHERE ds.datafiles IS NULL", "IS EMPTY"),
        ("SELECT ds FROM Dataset ds WHERE ds.modTime > 'yesterday'", "Badly formatted"),
    ],
)
def test_semantic_errors(query, fragment):
    assert fragment in bad_param(compiled, query)
