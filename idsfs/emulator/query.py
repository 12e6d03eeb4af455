"""ICAT's query language (the subset of icat-rest.md §4), parsed and compiled to SQLite.

Two entry points:

* :func:`parse_search` — a search query: ``SELECT [DISTINCT] items FROM ...
  [WHERE ...] [GROUP BY ... [HAVING ...]] [ORDER BY ...]`` followed by
  ``[INCLUDE ...] [LIMIT offset, count]`` in either order; or the old-style
  bare form ``Entity [INCLUDE Type, ...]``.
* :func:`parse_get` — the query of a get-by-id: ``Entity [var] [INCLUDE 1 |
  var.path [AS v], ... | Type, ...]``.

:func:`compile_search` turns a parsed search into one parameterised SQL
statement (user text is only ever bound as a parameter, never spliced into the
SQL) with the authorisation conditions of :mod:`.policy` built in, plus the
description needed to decode the result rows. INCLUDEs become an
:class:`IncludeNode` tree that the catalogue evaluates with one batched query
per step.

Semantics follow JPQL as ICAT uses it: a path through a many-to-one
relationship (``df.dataset.investigation.name``) is an implicit inner join,
except that ``x.rel.id`` reads the foreign-key column directly; collections are
navigated only with ``JOIN``; duplicates are kept unless ``DISTINCT`` is given.
As in ICAT, the authorisation restriction applies to the entity each SELECT
item reaches (``SELECT df.dataset.name`` is filtered by the READ rule of
Dataset), not to other joined variables; rows the user may not read are
silently absent.

All errors are :class:`~.schema.ICATException` with code ``BAD_PARAMETER`` and
a message naming the problem and its position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .schema import (
    BOOLEAN,
    COMMON_FIELDS,
    DATE,
    DOUBLE,
    ENTITIES,
    INTEGER,
    LONG,
    STRING,
    EntityDef,
    ManyToOne,
    OneToMany,
    bad,
    parse_date,
    parse_timestamp_literal,
    q,
)

KEYWORDS = frozenset(
    {
        "SELECT", "DISTINCT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "BETWEEN", "LIKE",
        "ESCAPE", "IS", "NULL", "EMPTY", "MEMBER", "OF", "JOIN", "LEFT", "OUTER", "INNER",
        "FETCH", "AS", "ORDER", "BY", "ASC", "DESC", "GROUP", "HAVING", "INCLUDE", "LIMIT",
        "TRUE", "FALSE",
    }
)  # fmt: skip
AGGREGATES = frozenset({"COUNT", "SUM", "MIN", "MAX", "AVG"})
FUNCTIONS = frozenset({"UPPER", "LOWER", "LENGTH", "TRIM", "CONCAT", "ABS"})

_COMMON_KIND = {"id": LONG, "createId": STRING, "createTime": DATE, "modId": STRING,
                "modTime": DATE}  # fmt: skip

# --------------------------------------------------------------------------------------
# tokens

_TOKEN_RE = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<ts>\{ts\s[^}]*\})
    |(?P<brace>[{}])
    |(?P<str>'(?:[^']|'')*')
    |(?P<badstr>')
    |(?P<dq>")
    |(?P<real>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?)
    |(?P<int>\d+)
    |(?P<param>:[A-Za-z_][A-Za-z0-9_]*)
    |(?P<name>[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*)
    |(?P<op><>|!=|<=|>=|=|<|>)
    |(?P<punct>[(),*+\-/])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    """One token: ``kind`` is KW, NAME, INT, REAL, STR, TS, PARAM, OP, PUNCT or EOF.

    Constructing one never raises.
    """

    kind: str
    value: str
    pos: int

    def show(self) -> str:
        """The token as shown in error messages. Never raises."""
        return "end of query" if self.kind == "EOF" else repr(self.value)


def tokenize(text: str) -> list[Token]:
    """Split a query into tokens; raises BAD_PARAMETER on characters that cannot start one."""
    out: list[Token] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise bad(f"Unexpected character {text[pos]!r} at position {pos} of the query")
        kind = m.lastgroup or ""
        value = m.group()
        if kind == "ws":
            pass
        elif kind == "ts":
            out.append(Token("TS", value[4:-1].strip(), pos))
        elif kind == "brace":
            raise bad(
                f"Badly formed timestamp at position {pos}: expected {{ts yyyy-mm-dd hh:mm:ss}}"
            )
        elif kind == "str":
            out.append(Token("STR", value[1:-1].replace("''", "'"), pos))
        elif kind == "badstr":
            raise bad(f"Unterminated string starting at position {pos} of the query")
        elif kind == "dq":
            raise bad(f"Double-quoted strings are not allowed (position {pos}); use single quotes")
        elif kind == "real":
            out.append(Token("REAL", value, pos))
        elif kind == "int":
            out.append(Token("INT", value, pos))
        elif kind == "param":
            out.append(Token("PARAM", value[1:], pos))
        elif kind == "name":
            if "." not in value and value.upper() in KEYWORDS:
                out.append(Token("KW", value.upper(), pos))
            else:
                out.append(Token("NAME", value, pos))
        elif kind == "op":
            out.append(Token("OP", "<>" if value == "!=" else value, pos))
        else:
            out.append(Token("PUNCT", value, pos))
        pos = m.end()
    out.append(Token("EOF", "", n))
    return out


# --------------------------------------------------------------------------------------
# syntax tree


@dataclass(frozen=True)
class Path:
    """``var.f1.f2``: ``var`` lower-cased (variables are case-insensitive).

    Constructing one never raises.
    """

    var: str
    fields: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Agg:
    """``COUNT/SUM/MIN/MAX/AVG([DISTINCT] path)``. Constructing one never raises."""

    func: str
    distinct: bool
    arg: Path


@dataclass(frozen=True)
class Lit:
    """A literal; ``kind`` is int, real, str, bool or ts (value = epoch ms).

    Constructing one never raises.
    """

    value: Any
    kind: str


@dataclass(frozen=True)
class UserParam:
    """``:user``. Constructing one never raises."""


@dataclass(frozen=True)
class Func:
    """A scalar function call (UPPER, LOWER, LENGTH, TRIM, CONCAT, ABS).

    Constructing one never raises.
    """

    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Cmp:
    """``left op right`` with op one of = <> < <= > >=. Constructing one never raises."""

    op: str
    left: Any
    right: Any


@dataclass(frozen=True)
class Like:
    """``left [NOT] LIKE pattern [ESCAPE c]``. Constructing one never raises."""

    left: Any
    pattern: Any
    escape: Any
    negated: bool


@dataclass(frozen=True)
class InList:
    """``left [NOT] IN (values)``. Constructing one never raises."""

    left: Any
    values: tuple[Any, ...]
    negated: bool


@dataclass(frozen=True)
class Between:
    """``left [NOT] BETWEEN low AND high``. Constructing one never raises."""

    left: Any
    low: Any
    high: Any
    negated: bool


@dataclass(frozen=True)
class IsNull:
    """``operand IS [NOT] NULL``. Constructing one never raises."""

    operand: Any
    negated: bool


@dataclass(frozen=True)
class IsEmpty:
    """``collection IS [NOT] EMPTY``. Constructing one never raises."""

    path: Path
    negated: bool


@dataclass(frozen=True)
class BoolOp:
    """``AND``/``OR`` of several conditions. Constructing one never raises."""

    op: str
    parts: tuple[Any, ...]


@dataclass(frozen=True)
class Not:
    """``NOT cond``. Constructing one never raises."""

    cond: Any


@dataclass(frozen=True)
class FromItem:
    """A FROM element: ``root``/``cross`` (entity) or ``inner``/``left`` (path) joins.

    Constructing one never raises.
    """

    kind: str
    var: str
    entity: str | None = None
    path: Path | None = None


@dataclass
class IncludeSpec:
    """An INCLUDE clause: ``one`` (INCLUDE 1), new-style paths, or old-style type names.

    Constructing one never raises.
    """

    one: bool = False
    paths: list[tuple[Path, str | None]] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    pos: int = 0


@dataclass
class SearchQuery:
    """A parsed search query. Constructing one never raises."""

    distinct: bool
    items: list[Any]
    froms: list[FromItem]
    where: Any = None
    group_by: list[Path] = field(default_factory=list)
    having: Any = None
    order: list[tuple[Any, bool]] = field(default_factory=list)
    include: IncludeSpec | None = None
    offset: int = 0
    count: int | None = None
    limited: bool = False


@dataclass
class GetQuery:
    """A parsed get-by-id query: entity, variable, include. Constructing one never raises."""

    entity: str
    var: str
    include: IncludeSpec | None


# --------------------------------------------------------------------------------------
# parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    # token helpers
    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Token:
        t = self.toks[self.i]
        if t.kind != "EOF":
            self.i += 1
        return t

    def at_kw(self, *words: str) -> bool:
        t = self.peek()
        return t.kind == "KW" and t.value in words

    def accept_kw(self, *words: str) -> Token | None:
        if self.at_kw(*words):
            return self.next()
        return None

    def at_punct(self, p: str) -> bool:
        t = self.peek()
        return t.kind == "PUNCT" and t.value == p

    def accept_punct(self, p: str) -> bool:
        if self.at_punct(p):
            self.next()
            return True
        return False

    def error(self, expected: str, tok: Token | None = None) -> Exception:
        t = tok or self.peek()
        return bad(f"Expected {expected} but found {t.show()} at position {t.pos} of the query")

    def expect_kw(self, word: str) -> Token:
        t = self.accept_kw(word)
        if t is None:
            raise self.error(word)
        return t

    def expect_punct(self, p: str) -> None:
        if not self.accept_punct(p):
            raise self.error(f"'{p}'")

    def expect_name(self, what: str) -> Token:
        t = self.peek()
        if t.kind != "NAME":
            raise self.error(what)
        return self.next()

    def expect_eof(self) -> None:
        t = self.peek()
        if t.kind != "EOF":
            if t.kind == "KW" and t.value == "FETCH":
                raise bad("The FETCH keyword is not permitted")
            if t.kind == "KW" and t.value in ("WHERE", "GROUP", "HAVING", "ORDER"):
                raise bad(
                    f"Unexpected {t.value} at position {t.pos} of the query: WHERE, GROUP BY, "
                    "HAVING and ORDER BY must come before INCLUDE and LIMIT"
                )
            raise bad(f"Unexpected {t.show()} at position {t.pos} of the query")

    # pieces
    def path(self, tok: Token) -> Path:
        parts = tok.value.split(".")
        return Path(parts[0].lower(), tuple(parts[1:]), tok.value)

    def variable(self) -> str:
        t = self.expect_name("an identification variable")
        if "." in t.value:
            raise bad(f"Identification variable {t.value!r} must not contain a '.'")
        return t.value.lower()

    def entity_name(self) -> Token:
        t = self.expect_name("an entity name")
        if t.value not in ENTITIES:
            raise bad(f"Unknown entity type {t.value!r} at position {t.pos} of the query")
        return t

    # SELECT query
    def search(self) -> SearchQuery:
        if not self.at_kw("SELECT"):
            t = self.peek()
            if t.kind == "NAME" and t.value in ENTITIES:
                return self.old_style()
            if t.kind == "NAME" and t.value.split(".")[0] in ENTITIES:
                raise bad(
                    f"Old-style query {t.value!r} is not supported by this ICAT emulator: "
                    "use SELECT or a bare entity name"
                )
            raise self.error("SELECT or an entity name")
        self.next()
        distinct = self.accept_kw("DISTINCT") is not None
        items = [self.select_item()]
        while self.accept_punct(","):
            items.append(self.select_item())
        query = SearchQuery(distinct, items, self.from_clause())
        if self.accept_kw("WHERE"):
            query.where = self.condition()
        if self.accept_kw("GROUP"):
            self.expect_kw("BY")
            query.group_by.append(self.path(self.expect_name("a path")))
            while self.accept_punct(","):
                query.group_by.append(self.path(self.expect_name("a path")))
            if self.accept_kw("HAVING"):
                query.having = self.condition()
        if self.accept_kw("ORDER"):
            self.expect_kw("BY")
            query.order.append(self.order_item())
            while self.accept_punct(","):
                query.order.append(self.order_item())
        for _ in range(2):
            if self.at_kw("INCLUDE") and query.include is None:
                query.include = self.include_clause(old_style=False)
            elif self.at_kw("LIMIT") and not query.limited:
                self.limit_clause(query)
        self.expect_eof()
        return query

    def old_style(self) -> SearchQuery:
        g = self.get()
        query = SearchQuery(False, [Path(g.var, (), g.var)], [FromItem("root", g.var, g.entity)])
        query.include = g.include
        return query

    def select_item(self) -> Any:
        t = self.peek()
        if t.kind == "NAME" and t.value.upper() in AGGREGATES and self.peek(1).value == "(":
            return self.aggregate()
        if t.kind != "NAME":
            raise self.error("a select item (variable, path or aggregate)")
        return self.path(self.next())

    def aggregate(self) -> Agg:
        func = self.next().value.upper()
        self.expect_punct("(")
        distinct = self.accept_kw("DISTINCT") is not None
        arg = self.path(self.expect_name("a variable or path"))
        self.expect_punct(")")
        return Agg(func, distinct, arg)

    def from_clause(self) -> list[FromItem]:
        self.expect_kw("FROM")
        entity = self.entity_name().value
        self.accept_kw("AS")
        froms = [FromItem("root", self.variable(), entity)]
        while True:
            if self.accept_punct(","):
                t = self.peek()
                if t.kind == "KW" and t.value == "IN":
                    self.next()
                    self.expect_punct("(")
                    path = self.path(self.expect_name("a collection path"))
                    self.expect_punct(")")
                    self.accept_kw("AS")
                    froms.append(FromItem("inner", self.variable(), path=path))
                elif t.kind == "NAME" and "." in t.value:
                    path = self.path(self.next())
                    self.accept_kw("AS")
                    froms.append(FromItem("inner", self.variable(), path=path))
                else:
                    ent = self.entity_name().value
                    self.accept_kw("AS")
                    froms.append(FromItem("cross", self.variable(), ent))
                continue
            kind = None
            if self.accept_kw("LEFT"):
                self.accept_kw("OUTER")
                kind = "left"
            elif self.accept_kw("INNER"):
                kind = "inner"
            if self.at_kw("JOIN"):
                self.next()
                if self.at_kw("FETCH"):
                    raise bad("The FETCH keyword is not permitted")
                t = self.expect_name("a relationship path")
                if "." not in t.value:
                    raise bad(f"JOIN needs a path like var.field, not {t.value!r}")
                path = self.path(t)
                self.accept_kw("AS")
                froms.append(FromItem(kind or "inner", self.variable(), path=path))
                continue
            if kind is not None:
                raise self.error("JOIN")
            break
        seen: set[str] = set()
        for f in froms:
            if f.var in seen:
                raise bad(f"Identification variable {f.var!r} is defined twice in the FROM clause")
            seen.add(f.var)
        return froms

    def order_item(self) -> tuple[Any, bool]:
        t = self.peek()
        if t.kind == "NAME" and t.value.upper() in AGGREGATES and self.peek(1).value == "(":
            expr: Any = self.aggregate()
        else:
            expr = self.path(self.expect_name("a path in ORDER BY"))
        desc = False
        if self.accept_kw("DESC"):
            desc = True
        else:
            self.accept_kw("ASC")
        return expr, desc

    def limit_clause(self, query: SearchQuery) -> None:
        self.expect_kw("LIMIT")
        t = self.next()
        if t.kind != "INT":
            raise self.error("an integer offset after LIMIT", t)
        self.expect_punct(",")
        c = self.next()
        if c.kind == "PUNCT" and c.value == "*":
            count = None
        elif c.kind == "INT":
            count = int(c.value)
        else:
            raise self.error("an integer count or '*' in LIMIT", c)
        query.offset, query.count, query.limited = int(t.value), count, True

    def include_clause(self, old_style: bool) -> IncludeSpec:
        start = self.expect_kw("INCLUDE")
        spec = IncludeSpec(pos=start.pos)
        t = self.peek()
        if t.kind == "INT":
            if t.value != "1":
                raise bad(f"INCLUDE accepts the integer 1 only, not {t.value}")
            self.next()
            spec.one = True
            if self.at_punct(","):
                raise bad("INCLUDE 1 cannot be combined with other INCLUDE paths")
            return spec
        while True:
            if self.peek().kind == "INT":
                raise bad("INCLUDE 1 cannot be combined with other INCLUDE paths")
            t = self.expect_name("an INCLUDE path")
            if "." in t.value:
                path = self.path(t)
                var = None
                if self.accept_kw("AS") or self.peek().kind == "NAME":
                    var = self.variable()
                spec.paths.append((path, var))
            else:
                if not old_style:
                    raise bad(f"Path {t.value} in the INCLUDE clause must contain a '.'")
                if t.value not in ENTITIES:
                    raise bad(f"Unknown entity type {t.value!r} in the INCLUDE clause")
                spec.types.append(t.value)
            if not self.accept_punct(","):
                break
        if spec.paths and spec.types:
            raise bad("INCLUDE mixes paths and entity type names")
        return spec

    # get query
    def get(self) -> GetQuery:
        t = self.entity_name()
        var = t.value.lower() + "$"
        if self.peek().kind == "NAME":
            var = self.variable()
        include = None
        if self.at_kw("INCLUDE"):
            include = self.include_clause(old_style=True)
        self.expect_eof()
        return GetQuery(t.value, var, include)

    # conditions
    def condition(self) -> Any:
        parts = [self.conjunction()]
        while self.accept_kw("OR"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else BoolOp("OR", tuple(parts))

    def conjunction(self) -> Any:
        parts = [self.negation()]
        while self.accept_kw("AND"):
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else BoolOp("AND", tuple(parts))

    def negation(self) -> Any:
        if self.accept_kw("NOT"):
            return Not(self.negation())
        if self.at_punct("("):
            # a parenthesised condition (operands never start with '(')
            self.next()
            cond = self.condition()
            self.expect_punct(")")
            return cond
        return self.predicate()

    def predicate(self) -> Any:
        left = self.operand()
        if self.accept_kw("IS"):
            negated = self.accept_kw("NOT") is not None
            if self.accept_kw("NULL"):
                return IsNull(left, negated)
            if self.accept_kw("EMPTY"):
                if not isinstance(left, Path):
                    raise bad("IS EMPTY needs a collection path")
                return IsEmpty(left, negated)
            raise self.error("NULL or EMPTY")
        negated = self.accept_kw("NOT") is not None
        if self.accept_kw("LIKE"):
            pattern = self.operand()
            escape = self.operand() if self.accept_kw("ESCAPE") else None
            return Like(left, pattern, escape, negated)
        if self.accept_kw("IN"):
            self.expect_punct("(")
            values = [self.operand()]
            while self.accept_punct(","):
                values.append(self.operand())
            self.expect_punct(")")
            for v in values:
                if not isinstance(v, Lit | UserParam):
                    raise bad("IN accepts a list of literals only")
            return InList(left, tuple(values), negated)
        if self.accept_kw("BETWEEN"):
            low = self.operand()
            self.expect_kw("AND")
            high = self.operand()
            return Between(left, low, high, negated)
        if self.at_kw("MEMBER"):
            raise bad("MEMBER OF is not supported by this ICAT emulator")
        if negated:
            raise self.error("LIKE, IN or BETWEEN after NOT")
        t = self.peek()
        if t.kind == "OP":
            self.next()
            return Cmp(t.value, left, self.operand())
        raise self.error("a comparison operator")

    def operand(self) -> Any:
        t = self.peek()
        if t.kind == "NAME":
            up = t.value.upper()
            if self.peek(1).kind == "PUNCT" and self.peek(1).value == "(":
                if up in AGGREGATES:
                    return self.aggregate()
                if up in FUNCTIONS:
                    self.next()
                    self.next()
                    args = [self.operand()]
                    while self.accept_punct(","):
                        args.append(self.operand())
                    self.expect_punct(")")
                    return Func(up, tuple(args))
                raise bad(f"Function {t.value} is not supported by this ICAT emulator")
            return self.path(self.next())
        if t.kind == "INT":
            self.next()
            return Lit(int(t.value), "int")
        if t.kind == "REAL":
            self.next()
            return Lit(float(t.value), "real")
        if t.kind == "STR":
            self.next()
            return Lit(t.value, "str")
        if t.kind == "TS":
            self.next()
            return Lit(parse_timestamp_literal(t.value), "ts")
        if t.kind == "KW" and t.value in ("TRUE", "FALSE"):
            self.next()
            return Lit(t.value == "TRUE", "bool")
        if t.kind == "PARAM":
            self.next()
            if t.value.lower() != "user":
                raise bad(f"Unknown parameter :{t.value} (only :user is defined)")
            return UserParam()
        if t.kind == "PUNCT" and t.value == "-":
            self.next()
            n = self.next()
            if n.kind == "INT":
                return Lit(-int(n.value), "int")
            if n.kind == "REAL":
                return Lit(-float(n.value), "real")
            raise self.error("a number after '-'", n)
        raise self.error("an operand (path, literal or :user)")


def parse_search(text: str) -> SearchQuery:
    """Parse a search query; raises BAD_PARAMETER (ICATException) on any syntax error."""
    return _Parser(text).search()


def parse_get(text: str) -> GetQuery:
    """Parse the query of a get-by-id; raises BAD_PARAMETER on any syntax error."""
    return _Parser(text).get()


# --------------------------------------------------------------------------------------
# INCLUDE trees


@dataclass
class IncludeNode:
    """One included entity type: ``children`` maps a relationship field to its node.

    Constructing one never raises.
    """

    entity: EntityDef
    children: dict[str, IncludeNode] = field(default_factory=dict)

    def count_steps(self) -> int:
        """The number of include steps in this subtree. Never raises."""
        return sum(1 + c.count_steps() for c in self.children.values())


def _relation_target(e: EntityDef, name: str) -> EntityDef | None:
    """Target of relationship ``name`` of ``e``; None for a phantom; BAD_PARAMETER if none."""
    if name in e.many_by_name:
        return ENTITIES[e.many_by_name[name].target]
    if name in e.ones_by_name:
        return ENTITIES[e.ones_by_name[name].target]
    if name in e.phantoms:
        return None
    raise bad(f"Problem with INCLUDE clause: {name} is not a relationship field of {e.name}")


def build_include(root: EntityDef, var: str, spec: IncludeSpec | None) -> IncludeNode | None:
    """The include tree of ``spec`` for entities of type ``root`` selected as ``var``.

    Raises BAD_PARAMETER for unknown variables or fields and for a step listed
    twice (redundant path).
    """
    if spec is None:
        return None
    node = IncludeNode(root)
    if spec.one:
        for m in root.many:
            node.children[m.name] = IncludeNode(ENTITIES[m.target])
        return node
    if spec.types:
        wanted = list(dict.fromkeys(spec.types))
        remaining = set(wanted)
        queue = [node]
        while queue and remaining:
            cur = queue.pop(0)
            rels: list[tuple[str, str]] = [(m.name, m.target) for m in cur.entity.many]
            rels += [(o.name, o.target) for o in cur.entity.ones]
            for name, target in rels:
                if target in remaining:
                    remaining.discard(target)
                    child = IncludeNode(ENTITIES[target])
                    cur.children[name] = child
                    queue.append(child)
        if remaining:
            raise bad(
                f"Problem with INCLUDE clause: {', '.join(sorted(remaining))} "
                f"cannot be reached from {root.name}"
            )
        return node
    vars_: dict[str, IncludeNode] = {var: node}
    for path, alias in spec.paths:
        if path.var not in vars_:
            raise bad(f"Variable {path.var} mentioned in INCLUDE clause is not defined")
        cur = vars_[path.var]
        if not path.fields:
            raise bad(f"Path {path.text} in the INCLUDE clause must contain a '.'")
        for f in path.fields:
            if is_phantom(cur):
                raise bad(f"Problem with INCLUDE clause: nothing can follow the empty {path.text}")
            if f in cur.children:
                raise bad(f"Redundant INCLUDE: the step {f} of {path.text} is listed twice")
            target = _relation_target(cur.entity, f)
            child = _PhantomNode(cur.entity) if target is None else IncludeNode(target)
            cur.children[f] = child
            cur = child
        if alias is not None:
            if alias in vars_:
                raise bad(f"Variable {alias} mentioned in INCLUDE clause is already defined")
            vars_[alias] = cur
    return node


class _PhantomNode(IncludeNode):
    """An included phantom relationship: always empty."""

    def __init__(self, owner: EntityDef) -> None:
        super().__init__(owner)


def is_phantom(node: IncludeNode) -> bool:
    """True for an INCLUDE step through a phantom relationship (always empty). Never raises."""
    return isinstance(node, _PhantomNode)


# --------------------------------------------------------------------------------------
# compiler


@dataclass
class Item:
    """How to decode one SELECT item: ``entity`` (with column span) or a scalar ``kind``.

    Constructing one never raises.
    """

    entity: EntityDef | None
    start: int
    width: int
    kind: str | None = None


@dataclass
class CompiledSearch:
    """SQL + parameters of a search, and how to turn rows into ICAT JSON.

    Constructing one never raises.
    """

    sql: str
    params: dict[str, Any]
    items: list[Item]
    include: IncludeNode | None
    sql_limit: int
    count: int | None


@dataclass
class _EntityRef:
    """An entity-valued path: joined ``alias``, or only known by ``id_sql`` (FK column)."""

    entity: EntityDef
    alias: str | None
    id_sql: str
    owner_alias: str | None = None
    rel: ManyToOne | None = None


@dataclass
class _Attr:
    sql: str
    kind: str
    owner: _EntityRef


@dataclass
class _Coll:
    owner_alias: str
    rel: OneToMany


class _Compiler:
    def __init__(self, query: SearchQuery, user: str, restricted: bool) -> None:
        self.query = query
        self.restricted = restricted
        self.params: dict[str, Any] = {"u": user}
        self.vars: dict[str, tuple[str, EntityDef]] = {}
        self.joins: list[str] = []
        self.implicit: dict[tuple[str, str], str] = {}
        self.n_alias = 0

    # helpers
    def new_alias(self) -> str:
        a = f"t{self.n_alias}"
        self.n_alias += 1
        return a

    def param(self, value: Any) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f":{name}"

    def join_many(self, alias: str, rel: ManyToOne, kind: str = "JOIN") -> str:
        key = (alias, rel.name)
        if key in self.implicit:
            return self.implicit[key]
        target = ENTITIES[rel.target]
        new = self.new_alias()
        self.joins.append(f"{kind} {target.table} {new} ON {new}.id = {alias}.{q(rel.column)}")
        self.implicit[key] = new
        return new

    # FROM
    def compile_from(self) -> str:
        root = self.query.froms[0]
        assert root.entity is not None
        e0 = ENTITIES[root.entity]
        a0 = self.new_alias()
        self.vars[root.var] = (a0, e0)
        for f in self.query.froms[1:]:
            if f.kind == "cross":
                assert f.entity is not None
                e = ENTITIES[f.entity]
                a = self.new_alias()
                self.joins.append(f"CROSS JOIN {e.table} {a}")
                self.vars[f.var] = (a, e)
                continue
            assert f.path is not None
            alias, e = self.var(f.path)
            fields = f.path.fields
            for fname in fields[:-1]:
                if fname not in e.many_by_name:
                    raise bad(
                        f"{e.name} has no many-to-one relationship field {fname} "
                        f"(in JOIN {f.path.text})"
                    )
                alias = self.join_many(alias, e.many_by_name[fname])
                e = ENTITIES[e.many_by_name[fname].target]
            last = fields[-1]
            sql_kind = "LEFT JOIN" if f.kind == "left" else "JOIN"
            a = self.new_alias()
            if last in e.many_by_name:
                rel = e.many_by_name[last]
                t = ENTITIES[rel.target]
                self.joins.append(f"{sql_kind} {t.table} {a} ON {a}.id = {alias}.{q(rel.column)}")
            elif last in e.ones_by_name:
                orel = e.ones_by_name[last]
                t = ENTITIES[orel.target]
                col = t.many_by_name[orel.mapped_by].column
                self.joins.append(f"{sql_kind} {t.table} {a} ON {a}.{q(col)} = {alias}.id")
            elif last in e.phantoms:
                raise bad(f"{e.name}.{last} is not supported by this ICAT emulator")
            else:
                raise bad(f"{e.name} has no relationship field {last} (in JOIN {f.path.text})")
            self.vars[f.var] = (a, t)
        return f"{e0.table} {a0}"

    def var(self, path: Path) -> tuple[str, EntityDef]:
        if path.var not in self.vars:
            raise bad(f"Identification variable {path.var!r} in {path.text} is not defined")
        return self.vars[path.var]

    # paths
    def resolve(self, path: Path) -> _EntityRef | _Attr | _Coll:
        alias, e = self.var(path)
        ref = _EntityRef(e, alias, f"{alias}.id")
        fields = path.fields
        for i, f in enumerate(fields):
            last = i == len(fields) - 1
            cur_alias = ref.alias if ref.alias is not None else self.force(ref)
            e = ref.entity
            if f in COMMON_FIELDS or f in e.attr_by_name:
                if not last:
                    raise bad(f"{e.name}.{f} is not a relationship (in {path.text})")
                kind = _COMMON_KIND[f] if f in _COMMON_KIND else e.attr_by_name[f].kind
                return _Attr(f"{cur_alias}.{q(f)}", kind, ref)
            if f in e.many_by_name:
                rel = e.many_by_name[f]
                target = ENTITIES[rel.target]
                id_sql = f"{cur_alias}.{q(rel.column)}"
                if not last and fields[i + 1] == "id" and i + 1 == len(fields) - 1:
                    owner = _EntityRef(target, None, id_sql, cur_alias, rel)
                    return _Attr(id_sql, LONG, owner)
                ref = _EntityRef(target, None, id_sql, cur_alias, rel)
                continue
            if f in e.ones_by_name:
                if not last:
                    raise bad(
                        f"{e.name}.{f} is a collection and cannot be navigated in a path "
                        f"({path.text}); use JOIN"
                    )
                return _Coll(cur_alias, e.ones_by_name[f])
            if f in e.phantoms:
                raise bad(f"{e.name}.{f} is not supported by this ICAT emulator")
            raise bad(f"{e.name} has no field {f} (in {path.text})")
        return ref

    def force(self, ref: _EntityRef) -> str:
        """Join the table of an entity reference (inner join, JPQL path semantics)."""
        if ref.alias is None:
            assert ref.owner_alias is not None and ref.rel is not None
            ref.alias = self.join_many(ref.owner_alias, ref.rel)
            ref.id_sql = f"{ref.alias}.id"
        return ref.alias

    # operands and conditions
    def operand(self, node: Any, peer_kind: str | None = None) -> tuple[str, str | None]:
        if isinstance(node, Path):
            r = self.resolve(node)
            if isinstance(r, _Attr):
                return r.sql, r.kind
            if isinstance(r, _EntityRef):
                return r.id_sql, LONG
            raise bad(f"Collection {node.text} cannot be used as a value")
        if isinstance(node, Lit):
            if node.kind == "bool":
                return self.param(1 if node.value else 0), BOOLEAN
            if node.kind == "ts":
                return self.param(node.value), DATE
            if node.kind == "str" and peer_kind == DATE:
                return self.param(_date_from_string(node.value)), DATE
            kind = {"int": LONG, "real": DOUBLE, "str": STRING}[node.kind]
            return self.param(node.value), kind
        if isinstance(node, UserParam):
            return ":u", STRING
        if isinstance(node, Func):
            args = [self.operand(a)[0] for a in node.args]
            if node.name == "CONCAT":
                if len(args) < 2:
                    raise bad("CONCAT needs at least two arguments")
                return "(" + " || ".join(args) + ")", STRING
            if len(args) != 1:
                raise bad(f"{node.name} takes exactly one argument")
            kind = LONG if node.name == "LENGTH" else (DOUBLE if node.name == "ABS" else STRING)
            return f"{node.name}({args[0]})", kind
        if isinstance(node, Agg):
            return self.aggregate(node)
        raise bad(f"Unsupported operand {node!r}")

    def pair(self, left: Any, right: Any) -> tuple[str, str]:
        """Compile two compared operands; a string literal facing a date becomes a date."""
        lk = self.kind_hint(left)
        rk = self.kind_hint(right)
        ls, _ = self.operand(left, rk)
        rs, _ = self.operand(right, lk)
        return ls, rs

    def kind_hint(self, node: Any) -> str | None:
        if isinstance(node, Path):
            r = self.resolve(node)
            return r.kind if isinstance(r, _Attr) else None
        if isinstance(node, Lit) and node.kind == "ts":
            return DATE
        return None

    def cond(self, node: Any) -> str:
        if isinstance(node, BoolOp):
            return "(" + f" {node.op} ".join(self.cond(p) for p in node.parts) + ")"
        if isinstance(node, Not):
            return f"(NOT {self.cond(node.cond)})"
        if isinstance(node, Cmp):
            ls, rs = self.pair(node.left, node.right)
            return f"({ls} {node.op} {rs})"
        if isinstance(node, Like):
            ls, ps = self.pair(node.left, node.pattern)
            sql = f"{ls} {'NOT ' if node.negated else ''}LIKE {ps}"
            if node.escape is not None:
                sql += f" ESCAPE {self.operand(node.escape)[0]}"
            return f"({sql})"
        if isinstance(node, InList):
            lk = self.kind_hint(node.left)
            ls, _ = self.operand(node.left)
            vals = ", ".join(self.operand(v, lk)[0] for v in node.values)
            return f"({ls} {'NOT ' if node.negated else ''}IN ({vals}))"
        if isinstance(node, Between):
            lk = self.kind_hint(node.left)
            ls, _ = self.operand(node.left)
            lo, _ = self.operand(node.low, lk)
            hi, _ = self.operand(node.high, lk)
            return f"({ls} {'NOT ' if node.negated else ''}BETWEEN {lo} AND {hi})"
        if isinstance(node, IsNull):
            if isinstance(node.operand, Path):
                r = self.resolve(node.operand)
                if isinstance(r, _Coll):
                    raise bad(f"Use IS EMPTY for the collection {node.operand.text}")
                sql = r.sql if isinstance(r, _Attr) else r.id_sql
            else:
                sql, _ = self.operand(node.operand)
            return f"({sql} IS {'NOT ' if node.negated else ''}NULL)"
        if isinstance(node, IsEmpty):
            r = self.resolve(node.path)
            if not isinstance(r, _Coll):
                raise bad(f"IS EMPTY needs a collection path, not {node.path.text}")
            child = ENTITIES[r.rel.target]
            col = child.many_by_name[r.rel.mapped_by].column
            exists = f"EXISTS (SELECT 1 FROM {child.table} c WHERE c.{q(col)} = {r.owner_alias}.id)"
            return f"(NOT {exists})" if not node.negated else f"({exists})"
        raise bad(f"Unsupported condition {node!r}")

    def aggregate(self, agg: Agg) -> tuple[str, str | None]:
        r = self.resolve(agg.arg)
        if isinstance(r, _Coll):
            raise bad(f"{agg.func} of the collection {agg.arg.text} is not supported")
        sql = r.sql if isinstance(r, _Attr) else r.id_sql
        kind = r.kind if isinstance(r, _Attr) else LONG
        d = "DISTINCT " if agg.distinct else ""
        if agg.func == "COUNT":
            return f"COUNT({d}{sql})", "count"
        if agg.func in ("SUM", "AVG") and kind not in (LONG, INTEGER, DOUBLE):
            raise bad(f"{agg.func} needs a numeric field, not {agg.arg.text}")
        if agg.func == "AVG":
            return f"AVG({d}{sql})", DOUBLE
        return f"{agg.func}({d}{sql})", kind

    # authorisation of the entity a select item reaches
    def authz(self, ref: _EntityRef, seen: set[tuple[str, str]], out: list[str]) -> None:
        if not self.restricted:
            return
        key = (ref.entity.name, ref.alias or ref.id_sql)
        if key in seen:
            return
        seen.add(key)
        if ref.alias is not None:
            col = policy.alias_columns(ref.alias)
        else:
            col = policy.id_columns(ref.entity.name, ref.id_sql)
        cond = policy.read_condition(ref.entity.name, col)
        if cond is not None:
            out.append(f"({cond})")

    def compile(self, max_entities: int) -> CompiledSearch:
        query = self.query
        from_sql = self.compile_from()
        cols: list[str] = []
        items: list[Item] = []
        auth: list[str] = []
        seen: set[tuple[str, str]] = set()
        for it in query.items:
            if isinstance(it, Agg):
                sql, kind = self.aggregate(it)
                r = self.resolve(it.arg)
                owner = r.owner if isinstance(r, _Attr) else r
                assert isinstance(owner, _EntityRef)
                self.authz(owner, seen, auth)
                items.append(Item(None, len(cols), 1, kind))
                cols.append(sql)
                continue
            r = self.resolve(it)
            if isinstance(r, _Coll):
                raise bad(f"Cannot select the collection {it.text}; use JOIN")
            if isinstance(r, _EntityRef):
                alias = self.force(r)
                self.authz(r, seen, auth)
                items.append(Item(r.entity, len(cols), len(r.entity.columns)))
                cols.extend(f"{alias}.{q(c)}" for c in r.entity.columns)
            else:
                self.authz(r.owner, seen, auth)
                items.append(Item(None, len(cols), 1, r.kind))
                cols.append(r.sql)
        include = None
        if query.include is not None:
            first = query.items[0]
            if len(query.items) != 1 or not isinstance(first, Path) or first.fields:
                raise bad(
                    "INCLUDE is only valid when the SELECT clause is a single entity variable"
                )
            include = build_include(self.vars[first.var][1], first.var, query.include)
        where = [self.cond(query.where)] if query.where is not None else []
        where += auth
        group = [self.operand(p)[0] for p in query.group_by]
        having = self.cond(query.having) if query.having is not None else None
        order = []
        for expr, desc in query.order:
            sql = self.operand(expr)[0]
            order.append(f"{sql} DESC" if desc else sql)
        # the joins are complete only now
        parts = ["SELECT", "DISTINCT" if query.distinct else "", ", ".join(cols), "FROM", from_sql]
        parts += self.joins
        if where:
            parts += ["WHERE", " AND ".join(where)]
        if group:
            parts += ["GROUP BY", ", ".join(group)]
        if having:
            parts += ["HAVING", having]
        if order:
            parts += ["ORDER BY", ", ".join(order)]
        count = query.count
        sql_limit = max_entities + 1 if count is None or count > max_entities else count
        parts.append(f"LIMIT {int(sql_limit)} OFFSET {int(query.offset)}")
        sql = " ".join(p for p in parts if p)
        return CompiledSearch(sql, self.params, items, include, sql_limit, count)


def _date_from_string(text: str) -> int:
    """A string literal compared with a date: ICAT date or ``yyyy-mm-dd hh:mm:ss``."""
    if "T" in text:
        return parse_date(text)
    return parse_timestamp_literal(text)


def compile_search(
    query: SearchQuery, user: str, restricted: bool, max_entities: int
) -> CompiledSearch:
    """Compile a parsed search to SQL for ``user``.

    ``restricted``: add the READ conditions of the policy (False for root and
    the reader account). The SQL fetches at most ``max_entities + 1`` rows when
    the query's LIMIT count is absent or larger, so that the caller can detect
    an oversized result. Raises BAD_PARAMETER for unknown names and invalid
    constructs.
    """
    return _Compiler(query, user, restricted).compile(max_entities)
