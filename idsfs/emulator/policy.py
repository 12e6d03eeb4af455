"""The emulator's authorisation policy (icat-rest.md §5) as SQL conditions.

Root users (``settings.roots``, as ``simple/<name>``) may do everything; the IDS
reader account :data:`READER` may read everything and nothing else. Every other
user is governed by this table:

==========================================================  ==================================
Entity                                                      READ / CREATE, UPDATE, DELETE
==========================================================  ==================================
Facility, InvestigationType, DatasetType, DatafileFormat,   everyone / root only
User
Investigation                                               members (an InvestigationUser
                                                            links the user) / root only
InvestigationUser                                           members of its investigation
                                                            (this includes the user it names)
                                                            / root only
Dataset                                                     members of its investigation /
                                                            members whose role is a writer
                                                            role (default: any role)
Datafile                                                    as its dataset
DataCollection (+ DataCollectionDatafile/-Dataset)          its creator (``createId``) / its
                                                            creator; anybody may create one
==========================================================  ==================================

The conditions are SQL fragments over one row. ``col(name)`` gives the SQL of a
column of that row (an aliased column, or a subquery on an id expression), so
the same policy filters searches, INCLUDEs, get-by-id and write checks. The
user name is always bound as the named parameter ``:u``; the writer roles
(when restricted) as ``:wr``, a JSON array of role names.
"""

from __future__ import annotations

from collections.abc import Callable

from .schema import PUBLIC_ENTITIES

#: the internal IDS reader account: READ on everything, nothing else, no password
READER = "simple/_ids_reader"

Column = Callable[[str], str]

_MEMBER_INVS = (
    'SELECT iu."investigation_id" FROM "InvestigationUser" iu '
    'WHERE iu."user_id" IN (SELECT u.id FROM "User" u WHERE u."name" = :u)'
)
_WRITER_INVS_RESTRICTED = _MEMBER_INVS + ' AND iu."role" IN (SELECT value FROM json_each(:wr))'
_MY_COLLECTIONS = 'SELECT c.id FROM "DataCollection" c WHERE c."createId" = :u'


def read_condition(entity: str, col: Column) -> str | None:
    """SQL that is true when a non-root user may READ the row; None = everybody may.

    Never raises.
    """
    if entity in PUBLIC_ENTITIES:
        return None
    if entity == "Investigation":
        return f"{col('id')} IN ({_MEMBER_INVS})"
    if entity in ("InvestigationUser", "Dataset"):
        return f"{col('investigation_id')} IN ({_MEMBER_INVS})"
    if entity == "Datafile":
        return (
            f'{col("dataset_id")} IN (SELECT d.id FROM "Dataset" d '
            f'WHERE d."investigation_id" IN ({_MEMBER_INVS}))'
        )
    if entity == "DataCollection":
        return f"{col('createId')} = :u"
    if entity in ("DataCollectionDatafile", "DataCollectionDataset"):
        return f"{col('dataCollection_id')} IN ({_MY_COLLECTIONS})"
    return "0"


def write_condition(entity: str, col: Column, roles_restricted: bool) -> str:
    """SQL that is true when a non-root user may CREATE/UPDATE/DELETE the row.

    ``roles_restricted``: only InvestigationUser roles listed in ``:wr`` count
    as writers (otherwise any role does). Never raises.
    """
    invs = _WRITER_INVS_RESTRICTED if roles_restricted else _MEMBER_INVS
    if entity == "Dataset":
        return f"{col('investigation_id')} IN ({invs})"
    if entity == "Datafile":
        return (
            f'{col("dataset_id")} IN (SELECT d.id FROM "Dataset" d '
            f'WHERE d."investigation_id" IN ({invs}))'
        )
    if entity == "DataCollection":
        return f"{col('createId')} = :u"
    if entity in ("DataCollectionDatafile", "DataCollectionDataset"):
        return f"{col('dataCollection_id')} IN ({_MY_COLLECTIONS})"
    return "0"


def alias_columns(alias: str) -> Column:
    """A ``col`` function for a table joined under ``alias``. Never raises."""

    def col(name: str) -> str:
        return f'{alias}."{name}"'

    return col


def id_columns(table: str, id_sql: str) -> Column:
    """A ``col`` function for the row of ``table`` whose id is the SQL ``id_sql``. Never raises."""

    def col(name: str) -> str:
        if name == "id":
            return id_sql
        return f'(SELECT x."{name}" FROM "{table}" x WHERE x.id = {id_sql})'

    return col
