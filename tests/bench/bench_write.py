#!/usr/bin/env python3
"""Benchmark: ``cp`` of a large file into a real mount, against ``curl -T`` put.

Starts an emulator in a child process (no demo data), creates as ICAT root a
dataset that ``alice`` may write, and measures in one run, interleaved,
``--repeat`` times (medians are printed):

* **curl -T**: ``PUT /ids/put`` of the source file with alice's session (a
  Content-Length body read from the file): the baseline;
* **cp**: ``cp SOURCE MOUNT/.../dataset/`` through a mount of alice, timed until
  ``cp`` exits, i.e. until the ``close`` that returns only once IDS has the
  file with the right CRC32 (a live upload streams the file while ``cp``
  writes it; see idsfs/upload.py);
* **cp, upload at close**: the same with ``--live-upload 0`` (the file is sent
  whole when ``cp`` closes it);
* **pyfuse3 ceiling**: ``cp`` of the file into a minimal pyfuse3 file system
  whose write handler only writes the bytes into a local file (no upload): what
  the FUSE layer plus a spool write allow on this machine;
* **cp to the spool disk**: ``cp`` of the same file to a plain local file (the
  page-cache write speed, for information);
* the daemon's and the emulator's CPU seconds per GB.

Each stored datafile is checked (ICAT size and CRC32 of the source). Target
(issue 5): cp >= 0.8 of curl; the script prints PASS/FAIL and exits 1 on FAIL.

Needs root and /dev/fuse; it re-runs itself inside a private mount namespace
(``unshare --mount --propagation private``), so no mount is left behind.
Run: ``.venv/bin/python tests/bench/bench_write.py [--size 1G --repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "mount"))

from mountharness import (  # noqa: E402
    USERS,
    EmulatorProcess,
    Mounted,
    start_emulator,
    start_mount,
    teardown_mount,
)

from idsfs.config import parse_size  # noqa: E402
from idsfs.icat import ICATClient  # noqa: E402

#: A pyfuse3 file system with one writable file whose writes go to a local file.
MEMFS = r"""
import errno, os, stat, sys
import pyfuse3, trio

FD = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

class FS(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == 1 else (stat.S_IFREG | 0o644)
        a.st_size = os.fstat(FD).st_size if inode == 2 else 0
        a.st_blksize = 8 << 20
        a.attr_timeout = a.entry_timeout = 0
        return a
    async def lookup(self, parent, name, ctx=None):
        if parent == 1 and name == b"f":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)
    async def create(self, parent, name, mode, flags, ctx):
        os.ftruncate(FD, 0)
        return pyfuse3.FileInfo(fh=2), await self.getattr(2)
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=2)
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode)
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)
    async def write(self, fh, off, buf):
        return os.pwrite(FD, buf, off)
    async def flush(self, fh):
        pass
    async def release(self, fh):
        pass

pyfuse3.init(FS(), sys.argv[1], {"fsname=benchwrite", "default_permissions"})
try:
    trio.run(pyfuse3.main, 64)
finally:
    pyfuse3.close(unmount=True)
"""

_NS_FLAG = "IDSFS_BENCH_IN_NAMESPACE"
MB = 1_000_000
MiB = 1 << 20


def setup(emu: EmulatorProcess) -> tuple[int, int]:
    """As root: facility, format, types, an investigation alice is member of, a dataset.

    Returns (dataset id, datafile format id).
    """
    root = ICATClient(emu.icat_url)
    root.login("simple", {"username": "root", "password": USERS["root"]})
    try:
        fac = root.create({"Facility": {"name": "BENCH"}})
        fmt = root.create({"DatafileFormat": {"name": "binary", "version": "1",
                                              "facility": {"id": fac}}})
        root.create({"DatasetType": {"name": "processed", "facility": {"id": fac}}})
        itype = root.create({"InvestigationType": {"name": "t", "facility": {"id": fac}}})
        dtype = root.create({"DatasetType": {"name": "raw", "facility": {"id": fac}}})
        inv = root.create({"Investigation": {"name": "write", "visitId": "1", "title": "w",
                                             "facility": {"id": fac}, "type": {"id": itype}}})
        alice = root.create({"User": {"name": "simple/alice"}})
        root.create({"InvestigationUser": {"role": "PI", "user": {"id": alice},
                                           "investigation": {"id": inv}}})
        ds = root.create({"Dataset": {"name": "ds", "complete": False,
                                      "investigation": {"id": inv}, "type": {"id": dtype}}})
        return ds, fmt
    finally:
        root.close()


def make_source(path: Path, size: int) -> int:
    """Write ``size`` random-looking bytes (a 16 MiB random block repeated); return CRC32."""
    block = os.urandom(16 * MiB)
    crc = 0
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[:min(left, len(block))]
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc & 0xFFFFFFFF


def drop_caches_of(path: Path) -> None:
    """Have the source in the page cache for every contender alike (read it once)."""
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def curl_put(emu: EmulatorProcess, session: str, dataset: int, fmt: int, src: Path,
             name: str) -> float:
    query = urlencode({"sessionId": session, "name": name, "datasetId": dataset,
                       "datafileFormatId": fmt})
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-S", "-f", "-T", str(src), "-o", "/dev/null",
                    f"{emu.ids_url.rstrip('/')}/put?{query}"], check=True)
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ceiling(work: Path, src: Path) -> float:
    """Seconds of ``cp`` into the minimal pyfuse3 file system of :data:`MEMFS`."""
    mnt = work / "memfs"
    mnt.mkdir(exist_ok=True)
    script = work / "memfs.py"
    script.write_text(MEMFS)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(work / "memfs.data")])
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the pyfuse3 baseline did not mount")
            time.sleep(0.05)
        drop_caches_of(src)
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(mnt / "f")], check=True)
        return time.perf_counter() - t0
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(20)
        with contextlib.suppress(OSError):
            os.unlink(work / "memfs.data")


def check_stored(icat: ICATClient, dataset: int, name: str, size: int, crc: int) -> None:
    rows = icat.search(f"SELECT df.fileSize, df.checksum FROM Datafile df WHERE "
                       f"df.dataset.id = {dataset} AND df.name = '{name}'")
    if rows != [(size, f"{crc:x}")]:
        raise SystemExit(f"FAIL: {name} stored as {rows}, expected {(size, f'{crc:x}')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="size of the copied file (default 1G)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=0.8)
    parser.add_argument("--mount-option", action="append", default=[],
                        help="extra idsfs mount argument (repeatable)")
    args = parser.parse_args()

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    if os.environ.get(_NS_FLAG) != "1":
        env = dict(os.environ, **{_NS_FLAG: "1"})
        return subprocess.call(["unshare", "--mount", "--propagation", "private",
                                sys.executable, __file__, *sys.argv[1:]], env=env)

    work = Path(tempfile.mkdtemp(prefix="bench-write-"))
    mounts: list[Mounted] = []
    emu = start_emulator(work / "emulator", demo=False)
    try:
        dataset, fmt = setup(emu)
        src = work / "source.bin"
        crc = make_source(src, args.size)
        icat = ICATClient(emu.icat_url)
        session = icat.login("simple", {"username": "alice", "password": USERS["alice"]})
        times: dict[str, list[float]] = {k: [] for k in
                                          ("curl", "cp", "cp0", "ceiling", "local")}
        cpu: dict[str, list[float]] = {k: [] for k in ("curl", "cp", "cp0")}
        gb = args.size / 1e9

        def cp_into_mount(key: str, i: int, *extra: str) -> None:
            spool = work / f"spool-{key}-{i}"
            m = start_mount(work / f"mount-{key}-{i}", emu, "--spool-dir", str(spool),
                            *extra, *args.mount_option, register=mounts.append)
            assert m.pid is not None
            target_dir = m.path / "BENCH" / "write" / "1" / "ds"
            os.listdir(target_dir)  # the listing is not what is measured
            drop_caches_of(src)
            cpu0 = cpu_seconds(m.pid), cpu_seconds(emu.process.pid)
            t0 = time.perf_counter()
            subprocess.run(["cp", str(src), str(target_dir / f"{key}{i}.bin")], check=True)
            times[key].append(time.perf_counter() - t0)
            cpu[key].append((cpu_seconds(m.pid) - cpu0[0]
                             + cpu_seconds(emu.process.pid) - cpu0[1]) / gb)
            check_stored(icat, dataset, f"{key}{i}.bin", args.size, crc)
            teardown_mount(m)
            mounts.remove(m)

        for i in range(args.repeat):
            drop_caches_of(src)
            e0 = cpu_seconds(emu.process.pid)
            times["curl"].append(curl_put(emu, session, dataset, fmt, src, f"curl{i}.bin"))
            cpu["curl"].append((cpu_seconds(emu.process.pid) - e0) / gb)
            check_stored(icat, dataset, f"curl{i}.bin", args.size, crc)
            cp_into_mount("cp", i)
            cp_into_mount("cp0", i, "--live-upload", "0")
            times["ceiling"].append(ceiling(work, src))
            drop_caches_of(src)
            t0 = time.perf_counter()
            subprocess.run(["cp", str(src), str(work / "local.bin")], check=True)
            times["local"].append(time.perf_counter() - t0)
            os.unlink(work / "local.bin")
        icat.close()

        med = statistics.median

        def speed(key: str) -> float:
            return args.size / med(times[key])

        ratio = speed("cp") / speed("curl")
        print(f"\nwriting a {args.size / 2**30:g} GiB file, medians of {args.repeat} "
              f"(mount options {args.mount_option or '-'}):")
        print(f"  curl -T put              {speed('curl') / MB:6.0f} MB/s  "
              f"({med(times['curl']):.2f} s; emulator CPU {med(cpu['curl']):.2f} s/GB)")
        print(f"  cp into the mount        {speed('cp') / MB:6.0f} MB/s  "
              f"({med(times['cp']):.2f} s until close returned; daemon + emulator CPU "
              f"{med(cpu['cp']):.2f} s/GB)")
        print(f"  cp, upload at close      {speed('cp0') / MB:6.0f} MB/s  "
              f"({med(times['cp0']):.2f} s; daemon + emulator CPU {med(cpu['cp0']):.2f} s/GB)")
        print(f"  pyfuse3 ceiling          {speed('ceiling') / MB:6.0f} MB/s  (cp into a "
              f"pyfuse3 file system that only writes a local file)")
        print(f"  cp to a local file       {speed('local') / MB:6.0f} MB/s")
        verdict = "PASS" if ratio >= args.min_ratio else "FAIL"
        print(f"  cp / curl = {ratio:.2f}, ceiling / curl = "
              f"{speed('ceiling') / speed('curl'):.2f} (target >= {args.min_ratio}): {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        for m in mounts:
            teardown_mount(m)
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
