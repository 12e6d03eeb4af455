"""Reading through a real mount: cat, cp -r, sha256sum, dd at offsets, mmap,
parallel readers, the kernel page cache across opens, two-level archived data."""

from __future__ import annotations

import concurrent.futures
import errno
import filecmp
import hashlib
import json
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest
from mountharness import demo_files, idsfs_command, wait_until

from idsfs.emulator import demo

pytestmark = pytest.mark.mount

RAW = Path("DEMO/DEMO-2024-001/1/raw")  # online in two-level mode too
ARCHIVED = Path("DEMO/DEMO-2024-001/1/processed data")  # starts archived (two-level)


def run(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in argv], capture_output=True, timeout=120, check=check)


def expected(emu, spec: demo.FileSpec, offset: int = 0, length: int | None = None) -> bytes:
    return demo.expected_bytes(emu.seed, spec, offset, length)


def get_data_requests(emu) -> int:
    return emu.counters().get("ids/getData", {}).get("requests", 0)


def bytes_served(m) -> int:
    """Bytes the daemon's block cache has answered reads with (``idsfs status``)."""
    status = json.loads(run(*idsfs_command(), "status", "--json", m.path).stdout)
    return status["cache"]["bytes_served"]


def test_cat_and_sha256sum_of_every_file(mount, demo_emulator) -> None:
    emu = demo_emulator
    m = mount(emu)
    files = demo_files(emu)  # single-level: all online
    for rel, spec in files.items():
        assert run("cat", m.path / rel).stdout == expected(emu, spec), rel
    listing = run("sha256sum", *[m.path / rel for rel in files]).stdout.decode()
    got = {}
    for line in listing.splitlines():
        digest, name = line.split(maxsplit=1)
        got[Path(name).relative_to(m.path)] = digest
    assert got == {rel: hashlib.sha256(expected(emu, spec)).hexdigest()
                   for rel, spec in files.items()}


def test_cp_r_copies_a_dataset(mount, demo_emulator, tmp_path: Path) -> None:
    emu = demo_emulator
    m = mount(emu)
    target = tmp_path / "copy"
    run("cp", "-r", m.path / RAW, target)
    files = {rel.relative_to(RAW): spec for rel, spec in demo_files(emu).items()
             if rel.is_relative_to(RAW)}
    copied = {p.relative_to(target) for p in target.rglob("*") if p.is_file()}
    assert copied == set(files)
    for rel, spec in files.items():
        assert (target / rel).read_bytes() == expected(emu, spec), rel
    # and the same again with cmp against the mount (page cache or not, same bytes)
    for rel in files:
        assert filecmp.cmp(target / rel, m.path / RAW / rel, shallow=False)


def test_dd_at_offsets(mount, emulator_process) -> None:
    emu = emulator_process(demo_large_size=9 * 1024 * 1024 + 333)
    m = mount(emu, "--block-size", "256K")
    spec = demo_files(emu)[RAW / "large.bin"]
    path = m.path / RAW / "large.bin"
    size = spec.size
    for bs, skip, count in [(4096, 0, 1), (4096, 1000, 3), (1, 5_000_001, 777),
                            (65536, 100, 20), (1 << 20, 8, 5), (512, size // 512 - 1, 10)]:
        out = run("dd", f"if={path}", "of=/dev/stdout", f"bs={bs}", f"skip={skip}",
                  f"count={count}", "status=none").stdout
        assert out == expected(emu, spec, bs * skip, bs * count), (bs, skip, count)
    # python reads at arbitrary offsets, past EOF included
    with open(path, "rb", buffering=0) as f:
        for offset, length in [(size - 10, 100), (size, 10), (size + 5, 10), (123457, 1)]:
            f.seek(offset)
            assert f.read(length) == expected(emu, spec, offset, length)


def test_mmap_read(mount, demo_emulator) -> None:
    emu = demo_emulator
    m = mount(emu)
    spec = demo_files(emu)[RAW / "large.bin"]
    data = expected(emu, spec)
    with open(m.path / RAW / "large.bin", "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert len(mapped) == spec.size
        assert mapped[:4096] == data[:4096]
        assert mapped[spec.size - 5000:] == data[spec.size - 5000:]
        assert mapped[1_000_003:1_200_000] == data[1_000_003:1_200_000]
        assert hashlib.sha256(mapped).digest() == hashlib.sha256(data).digest()


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_sixteen_parallel_readers_of_different_files(mount, demo_emulator) -> None:
    emu = demo_emulator
    m = mount(emu)
    files = sorted(demo_files(emu).items(), key=lambda kv: -kv[1].size)[:16]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(_read_file, [m.path / rel for rel, _ in files]))
    for (rel, spec), data in zip(files, results, strict=True):
        assert data == expected(emu, spec), rel


def test_sixteen_parallel_readers_of_one_file(mount, emulator_process) -> None:
    emu = emulator_process(demo_large_size=12 * 1024 * 1024 + 5)
    m = mount(emu)
    spec = demo_files(emu)[RAW / "large.bin"]
    path = m.path / RAW / "large.bin"
    os.stat(path)
    emu.reset_counters()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(_read_file, [path] * 16))
    data = expected(emu, spec)
    assert all(r == data for r in results)
    counters = emu.counters()["ids/getData"]
    # one fetch per block: a stream or two, never a download per reader
    assert counters["requests"] <= 3
    assert counters["bytes_sent"] <= 2 * spec.size


def test_reopen_reads_from_the_page_cache(mount, emulator_process) -> None:
    emu = emulator_process()
    m = mount(emu)
    spec = demo_files(emu)[RAW / "large.bin"]
    path = m.path / RAW / "large.bin"
    assert path.read_bytes() == expected(emu, spec)
    requests = get_data_requests(emu)
    assert requests >= 1
    for _ in range(3):
        assert path.read_bytes() == expected(emu, spec)
    assert get_data_requests(emu) == requests  # keep_cache: nothing asked again


def test_direct_reads_bypass_the_page_cache(mount, emulator_process, tmp_path: Path) -> None:
    """--direct-reads: right bytes through cp, dd at offsets and read-back; every read
    reaches the daemon (a second read is served from its block cache, no new getData);
    shared mappings are refused (ENODEV), private ones work."""
    emu = emulator_process(demo_large_size=5 * 1024 * 1024 + 77)
    m = mount(emu, "--direct-reads")
    spec = demo_files(emu)[RAW / "large.bin"]
    data = expected(emu, spec)
    path = m.path / RAW / "large.bin"
    run("cp", path, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data
    out = run("dd", f"if={path}", "of=/dev/stdout", "bs=4096", "skip=300", "count=5",
              "status=none").stdout
    assert out == data[300 * 4096:305 * 4096]
    requests = get_data_requests(emu)
    served = bytes_served(m)
    assert _read_file(path) == data
    assert get_data_requests(emu) == requests  # from the block cache
    assert bytes_served(m) >= served + len(data)  # the kernel asked the daemon again
    with open(path, "rb") as f:
        with pytest.raises(OSError) as exc:
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert exc.value.errno == errno.ENODEV
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mapped:
            assert mapped[1_000_000:1_000_100] == data[1_000_000:1_000_100]


def test_archived_files_are_restored_once_and_read(mount, emulator_process) -> None:
    emu = emulator_process(storage="dataset", restore_delay=0.5)
    m = mount(emu, "--restore-wait", "30s")
    files = {rel: spec for rel, spec in demo_files(emu).items() if rel.is_relative_to(ARCHIVED)}
    assert files
    first = next(iter(files))
    assert os.getxattr(m.path / first, "user.ids.status") == b"ARCHIVED"
    emu.reset_counters()
    paths = [m.path / rel for rel in files] * 4  # every file by four readers at once
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        futures = [pool.submit(_read_file, p) for p in paths]
        deadline = time.monotonic() + 20
        while (status := os.getxattr(m.path / first, "user.ids.status")) == b"ARCHIVED":
            assert time.monotonic() < deadline, "the reads never asked for a restore"
            time.sleep(0.02)
        assert status == b"RESTORING"
        results = [f.result(timeout=60) for f in futures]
    for path, data in zip(paths, results, strict=True):
        assert data == expected(emu, files[path.relative_to(m.path)])
    counters = emu.counters()
    # one prepareData per file (each restores the dataset once), never one per read
    assert counters["ids/prepareData"]["requests"] == len(files)
    assert counters["ids/getData"]["requests"] == len(files)
    assert os.getxattr(m.path / first, "user.ids.status") == b"ONLINE"


def _os_read(path: Path, size: int = 1 << 20) -> bytes:
    """One read(2) of up to ``size`` bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def test_a_failing_read_waits_restore_wait_once_for_all_its_readers(
        mount, emulator_process) -> None:
    # The kernel repeats a failed readahead read for one page, and readers that
    # waited for the same pages each ask again: without the daemon's hold of a
    # failed read, one reader waited 2 x --restore-wait and the k-th parallel
    # reader k x.
    import concurrent.futures

    emu = emulator_process(storage="dataset", restore_delay=8.0)
    m = mount(emu, "--restore-wait", "1s")
    rel = next(rel for rel in demo_files(emu) if rel.is_relative_to(ARCHIVED))

    def timed_failure() -> float:
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            _os_read(m.path / rel)
        assert info.value.errno == errno.ENODATA
        return time.monotonic() - start

    assert 1.0 <= timed_failure() < 1.8
    # the kernel's repeat got the held answer: logged once, not once per read
    assert wait_until(lambda: "ENODATA" in m.log_text(), 2)
    assert m.log_text().count("ENODATA") == 1, m.log_text()
    time.sleep(2.5)  # past the hold: the next readers wait again, once
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        took = list(pool.map(lambda _: timed_failure(), range(4)))
    assert max(took) < 1.8, took


def test_restore_wait_then_enodata(mount, emulator_process) -> None:
    emu = emulator_process(storage="dataset", restore_delay=3.0)
    m = mount(emu, "--restore-wait", "0.3s")
    rel = next(rel for rel in demo_files(emu) if rel.is_relative_to(ARCHIVED))
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        _os_read(m.path / rel)
    assert info.value.errno == errno.ENODATA
    assert time.monotonic() - start < 3.0
    # Python's buffered files raise it too (EAGAIN would come back as None / a short read)
    with pytest.raises(OSError) as info, open(m.path / rel, "rb") as f:
        f.read()
    assert info.value.errno == errno.ENODATA
    assert os.getxattr(m.path / rel, "user.ids.status") == b"RESTORING"
    done = run("cat", m.path / rel, check=False)
    assert done.returncode != 0 and b"No data available" in done.stderr
    # the restore goes on; later the same file reads fine, without a second restore
    assert emu.wait_idle(30)
    spec = demo_files(emu)[rel]
    deadline = time.monotonic() + 20
    while True:
        try:
            assert _os_read(m.path / rel) == expected(emu, spec)
            break
        except OSError as exc:
            assert exc.errno == errno.ENODATA and time.monotonic() < deadline
            time.sleep(0.2)
    assert emu.counters()["ids/prepareData"]["requests"] == 1
