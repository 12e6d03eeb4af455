"""Client tests that need no server: DataSelection (M1, M2, M9), the error
tree and its translation (M5, M7), redaction, Version, the entity model."""

from __future__ import annotations

import datetime as dt
import json
import pickle
from types import SimpleNamespace

import pytest

from idsfs import errors
from idsfs.errors import (
    ICATError,
    ICATObjectExistsError,
    ICATSessionError,
    IDSBadRequestError,
    IDSError,
    IDSNotFoundError,
    IDSResponseError,
    ServerError,
    TransportError,
    TruncatedStreamError,
    icat_error_from_response,
    ids_error_from_response,
    redact,
)
from idsfs.ids import DataSelection, Version
from idsfs.model import (
    DataCollection,
    Datafile,
    Dataset,
    Entity,
    Facility,
    Investigation,
    entity_from_json,
    format_date,
    parse_date,
)

# --------------------------------------------------------------------------- M1


def test_m1_selection_from_id_dict() -> None:
    sel = DataSelection({"investigationIds": [1], "datasetIds": (2, 3), "datafileIds": {4}})
    assert sel.invIds == {1}
    assert sel.dsIds == {2, 3}
    assert sel.dfIds == {4}
    assert len(sel) == 4


@pytest.mark.parametrize("container", [list, set, tuple, lambda xs: (x for x in xs)])
def test_m1_selection_from_entities(container) -> None:
    objs = [Investigation(id=1), Dataset(id=2), Datafile(id=3), Datafile(id=4)]
    sel = DataSelection(container(objs))
    assert (sel.invIds, sel.dsIds, sel.dfIds) == ({1}, {2}, {3, 4})


def test_m1_selection_from_python_icat_like_objects() -> None:
    # Objects that only carry BeanName and id (as python-icat entities do).
    objs = [SimpleNamespace(BeanName="Dataset", id=7), SimpleNamespace(BeanName="Datafile", id=8)]
    sel = DataSelection(objs)
    assert sel.dsIds == {7} and sel.dfIds == {8}


def test_m1_selection_from_datacollection() -> None:
    dc = entity_from_json({"DataCollection": {
        "id": 1,
        "dataCollectionDatasets": [{"id": 10, "dataset": {"id": 5}}, {"id": 11}],
        "dataCollectionDatafiles": [{"datafile": {"id": 9}}],
        "dataCollectionInvestigations": [{"investigation": {"id": 3}}],
    }})
    assert isinstance(dc, DataCollection)
    sel = DataSelection([dc])
    assert (sel.invIds, sel.dsIds, sel.dfIds) == ({3}, {5}, {9})
    # python-icat style object without dataCollectionInvestigations
    legacy = SimpleNamespace(
        BeanName="DataCollection",
        id=2,
        dataCollectionDatasets=[SimpleNamespace(dataset=SimpleNamespace(id=6))],
        dataCollectionDatafiles=[SimpleNamespace(datafile=None)],
    )
    sel = DataSelection([legacy])
    assert sel.dsIds == {6} and not sel.dfIds and not sel.invIds


def test_m1_extend_with_selection_is_union() -> None:
    a = DataSelection({"datafileIds": [1, 2]})
    b = DataSelection({"datafileIds": [2, 3], "datasetIds": [9]})
    a.extend(b)
    assert a.dfIds == {1, 2, 3} and a.dsIds == {9}
    assert b.dfIds == {2, 3}
    assert a == DataSelection({"datafileIds": [3, 2, 1], "datasetIds": [9]})


def test_m1_str_and_empty() -> None:
    sel = DataSelection()
    assert len(sel) == 0
    assert str(DataSelection({"datafileIds": [5]})) == "{invIds:set(), dsIds:set(), dfIds:{5}}"


# --------------------------------------------------------------------------- M2


def test_m2_fill_params_only_non_empty() -> None:
    params: dict[str, str] = {}
    DataSelection({"datasetIds": [30, 4, 12]}).fillParams(params)
    assert params == {"datasetIds": "4,12,30"}
    params = {"sessionId": "x"}
    DataSelection().fillParams(params)
    assert params == {"sessionId": "x"}


def test_m2_invalid_elements() -> None:
    with pytest.raises(TypeError):
        DataSelection([1, 2])
    with pytest.raises(TypeError):
        DataSelection(42)
    with pytest.raises(TypeError):
        DataSelection("12345678-aaaa-bbbb-cccc-123456789012")
    with pytest.raises(ValueError):
        DataSelection([Facility(id=1)])
    with pytest.raises(ValueError):
        DataSelection([SimpleNamespace(BeanName="Sample", id=3)])
    with pytest.raises(ValueError):
        DataSelection({"datafileId": [1]})  # typo in the key
    with pytest.raises(ValueError):
        DataSelection({"datafileIds": ["x"]})
    with pytest.raises(ValueError):
        DataSelection([Datafile()])  # no id


def test_m2_failed_extend_adds_nothing() -> None:
    sel = DataSelection({"datafileIds": [1]})
    with pytest.raises(ValueError):
        sel.extend([Datafile(id=2), Facility(id=3)])
    assert sel.dfIds == {1}


# --------------------------------------------------------------------------- errors


def test_error_tree_relations() -> None:
    assert issubclass(IDSBadRequestError, IDSError)
    assert issubclass(IDSError, ServerError)
    assert issubclass(ICATError, ServerError)
    assert issubclass(ServerError, errors.IdsfsError)
    assert issubclass(TransportError, errors.IdsfsError)
    assert issubclass(IDSResponseError, IDSError)
    assert issubclass(TruncatedStreamError, IDSResponseError)
    assert issubclass(TruncatedStreamError, errors.ConnectionLostError)
    assert issubclass(errors.TransportTimeoutError, TimeoutError)
    assert issubclass(errors.VersionMethodError, errors.IdsfsError)
    for name in errors.__all__:
        assert hasattr(errors, name)


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "BadRequestException", errors.IDSBadRequestError),
        (503, "DataNotOnlineException", errors.IDSDataNotOnlineError),
        (403, "InsufficientPrivilegesException", errors.IDSInsufficientPrivilegesError),
        (500, "InsufficientStorageException", errors.IDSInsufficientStorageError),
        (500, "InternalException", errors.IDSInternalError),
        (404, "NotFoundException", errors.IDSNotFoundError),
        (501, "NotImplementedException", errors.IDSNotImplementedError),
    ],
)
def test_m5_ids_codes(status: int, code: str, cls: type) -> None:
    body = json.dumps({"code": code, "message": "m \u00e9"}).encode()
    exc = ids_error_from_response(status, body)
    assert type(exc) is cls
    assert (exc.status, exc.type, exc.code, exc.message, exc.offset) == (
        status, code, code, "m \u00e9", None)
    assert str(exc) == "m \u00e9"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "BAD_PARAMETER", errors.ICATParameterError),
        (403, "SESSION", errors.ICATSessionError),
        (403, "INSUFFICIENT_PRIVILEGES", errors.ICATPrivilegesError),
        (404, "NO_SUCH_OBJECT_FOUND", errors.ICATNoObjectError),
        (412, "OBJECT_ALREADY_EXISTS", errors.ICATObjectExistsError),
        (412, "VALIDATION", errors.ICATValidationError),
        (500, "INTERNAL", errors.ICATInternalError),
        (501, "NOT_IMPLEMENTED", errors.ICATNotImplementedError),
    ],
)
def test_icat_codes(status: int, code: str, cls: type) -> None:
    exc = icat_error_from_response(status, b'{"code": "%s", "message": "x", "offset": 1}'
                                   % code.encode())
    assert type(exc) is cls
    assert (exc.status, exc.type, exc.offset) == (status, code, 1)


def test_icat_negative_offset_is_none() -> None:
    exc = icat_error_from_response(412, b'{"code":"VALIDATION","message":"x","offset":-1}')
    assert exc.offset is None


@pytest.mark.parametrize(
    "body",
    [b"<html>Service Unavailable</html>", b"", b'{"code": "NOT_IMPLEMENTED", "message": "no"}',
     b'["a"]', b"\xff\xfe garbage", '{"code":"Weird","message":"é"}'.encode()],
)
def test_m7_unknown_or_bad_bodies_give_plain_ids_error(body: bytes) -> None:
    exc = ids_error_from_response(501, body, "Not Implemented")
    assert type(exc) is IDSError
    assert exc.status == 501


def test_error_messages_redact_sessions() -> None:
    sid = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    exc = icat_error_from_response(
        403, b'{"code":"SESSION","message":"Unable to find user by sessionid: %s"}'
        % sid.encode(), secrets=[sid])
    assert isinstance(exc, ICATSessionError)
    assert sid not in str(exc) and sid not in repr(exc)
    plain = ids_error_from_response(502, b"bad gateway for /ids/getData?sessionId=" + sid.encode())
    assert sid not in str(plain)


def test_error_messages_redact_prepared_ids() -> None:
    pid = "0d9a3706-80d4-4d29-9ff3-4d65d4308a24"
    body = b'{"code":"NotFoundException","message":"The preparedId %s is not known"}'
    exc = ids_error_from_response(404, body % pid.encode())  # without knowing it
    assert isinstance(exc, IDSNotFoundError)
    assert pid not in str(exc) and pid not in repr(exc)
    assert exc.message == "The preparedId *** is not known"
    odd = ids_error_from_response(400, b'{"code":"BadRequestException","message":'
                                       b'"The preparedId parameter \'p-1x\' is bad"}',
                                  secrets=["p-1x"])
    assert "p-1x" not in str(odd)  # the value the client sent is a secret too
    assert redact(f'{{"preparedId": "{pid}"}}') == '{"preparedId": "***"}'
    assert redact("a preparedId is a token") == "a preparedId is a token"


def test_server_error_python_icat_constructor_and_pickle() -> None:
    exc = ICATObjectExistsError({"code": "OBJECT_ALREADY_EXISTS", "message": "m", "offset": 2},
                                412)
    assert (exc.message, exc.type, exc.status, exc.offset) == ("m", "OBJECT_ALREADY_EXISTS",
                                                               412, 2)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is ICATObjectExistsError and again.offset == 2
    assert IDSNotFoundError("plain").status is None


def test_redact() -> None:
    text = ("GET http://h/ids/getData?sessionId=abc-123&datafileIds=1&preparedId=p-1 "
            "PUT http://h/icat/session/abc-123 body password=hunter2 "
            '{"sessionId": "abc-123"} secret-value')
    out = redact(text, ["secret-value"])
    for secret in ("abc-123", "p-1", "hunter2", "secret-value"):
        assert secret not in out
    assert "datafileIds=1" in out


# --------------------------------------------------------------------------- Version


def test_version_compare() -> None:
    v = Version("2.1.1")
    assert v == "2.1.1" and v >= "1.11.0" and v > "1.9.0" and v < "2.10"
    assert Version("1.11.0") > "1.9.9"
    assert Version("2.1.2-SNAPSHOT") < "2.1.2"
    assert Version("2.1.2-SNAPSHOT") > "2.1.1"
    assert Version("1.0") == Version("1.0.0")
    with pytest.raises(ValueError):
        Version("abc")


# --------------------------------------------------------------------------- model


def test_model_round_trip() -> None:
    doc = {"Datafile": {
        "id": 12, "createId": "db/root", "createTime": "2024-05-01T10:00:00.000+00:00",
        "modId": "db/root", "modTime": "2024-05-01T12:00:00.000+02:00",
        "checksum": "b2f5ff47", "fileSize": 52, "location": "3/7/x", "name": "a/b.dat",
        "datafileModTime": "2024-04-30T09:00:00.000Z",
        "dataset": {"id": 7, "name": "ds1", "complete": False, "datafiles": [],
                    "investigation": {"id": 3, "facility": {"id": 1, "name": "F"}}},
        "parameters": [], "newFieldOfAFutureServer": 1}}
    df = Entity.from_json(doc)
    assert isinstance(df, Datafile)
    assert df.modTime == dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC)
    assert df.modTime.tzinfo is not None
    assert df.dataset is not None and df.dataset.investigation is not None
    assert df.dataset.investigation.facility == Facility(id=1, name="F")
    assert df.datafileFormat is None
    out = df.to_json()["Datafile"]
    assert out["dataset"] == {"id": 7}
    assert "createTime" not in out and "modId" not in out
    assert out["datafileModTime"] == "2024-04-30T09:00:00.000+00:00"
    assert Datafile.from_json(doc["Datafile"]) == df
    with pytest.raises(ValueError):
        Dataset.from_json(doc)
    with pytest.raises(ValueError):
        Entity.from_json({"id": 1})


def test_model_frozen_and_create_json() -> None:
    ds = Dataset(name="new", complete=False, investigation=Investigation(id=42))
    with pytest.raises(AttributeError):
        ds.name = "x"  # type: ignore[misc]
    assert ds.to_json() == {"Dataset": {"name": "new", "complete": False,
                                        "investigation": {"id": 42}}}
    with pytest.raises(ValueError):
        Dataset(name="x", investigation=Investigation(name="no id")).to_json()
    assert Datafile(id=3).to_json(fields=["name"]) == {"Datafile": {"id": 3, "name": None}}
    assert "Datafile(id=3" in repr(Datafile(id=3, name="a"))


def test_dates() -> None:
    d = parse_date("2014-01-01T12:00:00.000+01:00")
    assert format_date(d) == "2014-01-01T12:00:00.000+01:00"
    assert parse_date("2014-01-01T12:00:00").tzinfo is not None
