"""Write path, handler level: create/write/close uploads with put; what the tree shows."""

from __future__ import annotations

import os
from pathlib import Path

from writekit import DS, WriteTree, crc_hex, datafiles_named, stored_bytes


def dataset_id_of(t: WriteTree, xattrs: dict[str, str]) -> int:
    return int(xattrs["user.ids.id"])


def test_create_write_close_stores_one_datafile(fresh_emu, wtree) -> None:
    t = wtree(fresh_emu)
    data = os.urandom(300_000)

    async def body(t: WriteTree) -> None:
        ds_ino = await t.ino(DS)
        ds_id = int((await t.ops.getxattr(ds_ino, b"user.ids.id", t.ctx)).decode())
        fresh_emu.counters.reset()
        fh, ino = await t.create(f"{DS}/new.bin")
        await t.write_all(fh, data)
        attr = await t.ops.getattr(ino, t.ctx)
        assert attr.st_size == len(data)
        assert fresh_emu.counters.get("ids/put") == 0
        assert await t.close(fh) == 0
        assert fresh_emu.counters.get("ids/put") == 1
        rows = datafiles_named(fresh_emu, ds_id, "new.bin")
        assert len(rows) == 1
        did, size, checksum, location = rows[0]
        assert size == len(data) and checksum == crc_hex(data) and location
        assert stored_bytes(fresh_emu, did) == data
        # the tree shows the datafile at once, with its id
        assert "new.bin" in await t.names(DS)
        assert await t.xattr(f"{DS}/new.bin", "user.ids.id") == str(did)
        assert (await t.walk(f"{DS}/new.bin")).st_size == len(data)
        assert await t.read_file(f"{DS}/new.bin") == data
        assert not list(t.spool.glob("*.data"))

    t.run(body)


def test_errno_table_and_docs_agree() -> None:
    """Every exception class of fs.ERRNO_TABLE has its row in docs/semantics.md."""
    import errno as errno_module

    from idsfs.fs import ERRNO_TABLE

    doc = (Path(__file__).resolve().parents[2] / "docs" / "semantics.md").read_text()
    table = doc[doc.index("## Errors"):doc.index("## Reading")]
    for cls, code in ERRNO_TABLE:
        rows = [line for line in table.splitlines()
                if f"`{cls.__name__}`" in line or f".{cls.__name__}`" in line]
        if cls.__name__ in ("IdsfsError",):
            rows = [line for line in table.splitlines() if "other `IdsfsError`" in line]
        assert rows, f"{cls.__name__} is missing from the errno table of docs/semantics.md"
        if code is not None:
            assert any(errno_module.errorcode[code] in row for row in rows), (cls, rows)
