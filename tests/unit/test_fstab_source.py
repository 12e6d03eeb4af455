"""mountcli._fstab_source: the fstab line of an idsfs mount, found by its mount point."""

from __future__ import annotations

from pathlib import Path

from idsfs.mountcli import _fstab_source


def test_the_source_as_written_is_found_by_the_mount_point(tmp_path: Path) -> None:
    spaced = tmp_path / "my ids"
    spaced.mkdir()
    plain = tmp_path / "ids"
    plain.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# facility /ignored fuse.idsfs ro 0 0\n"
        f"sshfs#host: {plain} fuse ro 0 0\n"              # another fuse file system
        f"facility {str(spaced).replace(' ', chr(92) + '040')} fuse.idsfs ro 0 0\n"
        f"idsfs#other {plain}/ fuse ro 0 0\n"
        "\n")
    assert _fstab_source(str(spaced), str(fstab)) == "facility"
    assert _fstab_source(str(plain), str(fstab)) == "idsfs#other"
    assert _fstab_source(str(tmp_path), str(fstab)) is None
    assert _fstab_source(str(plain), str(tmp_path / "missing")) is None
    assert _fstab_source(str(plain), None) is None
