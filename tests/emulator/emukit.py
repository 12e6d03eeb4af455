"""Small shared helpers of the emulator tests (fixtures are in conftest.py)."""

from __future__ import annotations

from idsfs.emulator import Emulator

ROOT_USER = "simple/root"


def minimal_dataset(emu: Emulator, members: tuple[str, ...] = ()) -> tuple[int, int]:
    """Facility ``F`` with investigation ``I`` and its empty dataset ``d``, made as root
    through the catalogue; ``members`` (user names of the ``simple`` authenticator)
    become InvestigationUsers of ``I``. Returns (dataset id, DatafileFormat id)."""
    root, cat = ROOT_USER, emu.catalogue
    (fac,) = cat.write(root, [{"Facility": {"name": "F"}}])
    (it,) = cat.write(root, [{"InvestigationType": {"name": "t", "facility": {"id": fac}}}])
    (dt,) = cat.write(root, [{"DatasetType": {"name": "t", "facility": {"id": fac}}}])
    (fmt,) = cat.write(
        root, [{"DatafileFormat": {"name": "f", "version": "1", "facility": {"id": fac}}}]
    )
    inv = {"name": "I", "visitId": "v", "title": "t", "facility": {"id": fac}, "type": {"id": it}}
    (inv_id,) = cat.write(root, [{"Investigation": inv}])
    for name in members:
        (user,) = cat.write(root, [{"User": {"name": f"simple/{name}"}}])
        cat.write(root, [{"InvestigationUser": {
            "role": "r", "user": {"id": user}, "investigation": {"id": inv_id}}}])
    (ds,) = cat.write(
        root, [{"Dataset": {"name": "d", "investigation": {"id": inv_id}, "type": {"id": dt}}}]
    )
    return ds, fmt
