#!/usr/bin/env python3
"""Benchmark: ``cp`` of a large file into a real mount, against ``curl -T`` put.

Starts an emulator in a child process (no demo data), creates as ICAT root a
dataset that ``alice`` may write, and measures in one run, interleaved,
``--repeat`` times (medians and [min-max] are printed):

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
* **pyfuse3 + one put**: ``cp`` of the file into a minimal pyfuse3 file system
  that sends each write at once as a chunk of one ``PUT /ids/put`` on its trio
  thread and answers the close when the emulator has answered (no spool, no
  CRC32, nothing kept for a retry): what the simplest pyfuse3 + HTTP design
  reaches, to compare the daemon with;
* **cp to a local file**, for information;
* CPU seconds per GB of ``curl``/``cp``, of the daemon (its FUSE thread and the
  others, which upload) and of the emulator, and the CPU other processes used meanwhile
  (``foreign``: figures are only worth something when it is near 0; with
  ``--quiet-wait`` the script waits for an idle machine before each measurement).

Each stored datafile is checked (ICAT size and CRC32 of the source) and then
deleted, so that the emulator's storage does not grow by the file's size per
measurement. Target (issue 5): cp >= 0.8 of curl; the script prints PASS/FAIL
and exits 1 on FAIL.

Needs root and /dev/fuse; it re-runs itself inside a private mount namespace
(``unshare --mount --propagation private``), so no mount is left behind.
Run: ``.venv/bin/python tests/bench/bench_write.py [--size 1G --repeat 5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import benchkit as bk

from idsfs.config import parse_size
from idsfs.icat import ICATClient
from idsfs.ids import DataSelection, IDSClient

MB, MiB = bk.MB, bk.MiB

#: What the baseline file systems share: a root holding one writable file,
#: ``f`` (inode 2) whose size ``size()`` says, opened with ``direct_io`` as the
#: mount opens files being written; ``serve(fs, fsname)`` mounts it on ``argv[1]``.
ONE_FILE_FS = r"""
import errno, os, stat, sys
import pyfuse3, trio

class OneFile(pyfuse3.Operations):
    def size(self):
        raise NotImplementedError
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == 1 else (stat.S_IFREG | 0o644)
        a.st_size = self.size() if inode == 2 else 0
        a.st_blksize = 8 << 20
        a.attr_timeout = a.entry_timeout = 0
        return a
    async def lookup(self, parent, name, ctx=None):
        if parent == 1 and name == b"f":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)
    async def create(self, parent, name, mode, flags, ctx):
        return await self.open(2, flags, ctx), await self.getattr(2)
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode)
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)
    async def flush(self, fh):
        pass
    async def release(self, fh):
        pass

def serve(fs, fsname):
    pyfuse3.init(fs, sys.argv[1], {f"fsname={fsname}", "default_permissions"})
    try:
        trio.run(pyfuse3.main, 64)
    finally:
        pyfuse3.close(unmount=True)
"""

#: A pyfuse3 file system with one writable file whose writes go to a local file.
MEMFS = ONE_FILE_FS + r"""
FD = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

class FS(OneFile):
    def size(self):
        return os.fstat(FD).st_size
    async def open(self, inode, flags, ctx):
        if flags & os.O_TRUNC or flags & os.O_CREAT:
            os.ftruncate(FD, 0)
        return pyfuse3.FileInfo(fh=2, direct_io=True)
    async def write(self, fh, off, buf):
        return os.pwrite(FD, buf, off)

serve(FS(), "benchwrite")
"""


#: A pyfuse3 file system with one writable file whose writes go, as they come,
#: into the chunked body of one ``PUT /ids/put`` sent on the trio thread; the
#: close waits for the answer. No spool, no CRC32, nothing kept for a retry:
#: what the simplest pyfuse3 + HTTP design reaches. The put URL (it holds a
#: session id) comes on stdin, never in argv.
PUTFS = ONE_FILE_FS + r"""
from urllib.parse import urlsplit

URL = urlsplit(sys.stdin.readline().strip())

class FS(OneFile):
    def __init__(self):
        super().__init__()
        self.sock, self.written = None, 0
    def size(self):
        return self.written
    async def open(self, inode, flags, ctx):
        self.sock, self.written = trio.socket.socket(), 0
        await self.sock.connect((URL.hostname, URL.port))
        await self.send([f"PUT {URL.path}?{URL.query} HTTP/1.1\r\nHost: {URL.netloc}\r\n"
                         "Content-Type: application/octet-stream\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode()])
        return pyfuse3.FileInfo(fh=2, direct_io=True)
    async def send(self, parts):
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = await self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if views and sent:
                views[0] = views[0][sent:]
    async def write(self, fh, off, buf):
        if off != self.written:
            raise pyfuse3.FUSEError(errno.ESPIPE)
        await self.send([b"%x\r\n" % len(buf), buf, b"\r\n"])
        self.written += len(buf)
        return len(buf)
    async def flush(self, fh):
        if self.sock is None:
            return
        await self.send([b"0\r\n\r\n"])
        answer = b""
        while b"\r\n\r\n" not in answer:
            got = await self.sock.recv(65536)
            if not got:
                raise pyfuse3.FUSEError(errno.EIO)
            answer += got
        self.sock.close()
        self.sock = None
        if answer.split()[1] not in (b"200", b"201"):
            raise pyfuse3.FUSEError(errno.EIO)

serve(FS(), "benchput")
"""


def ceiling(work: Path, src: Path, source: str = MEMFS, stdin: str = "") -> tuple[float, float]:
    """``cp`` into a minimal pyfuse3 file system (:data:`MEMFS` or :data:`PUTFS`).

    ``stdin`` is written to its standard input. Returns (seconds, its CPU seconds).
    """
    mnt = work / "memfs"
    mnt.mkdir(exist_ok=True)
    script = work / "memfs.py"
    script.write_text(source)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(work / "memfs.data")],
                            stdin=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(stdin + "\n")
    proc.stdin.close()
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the pyfuse3 baseline did not mount")
            time.sleep(0.05)
        bk.read_into_page_cache(src)
        cpu0 = bk.cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(mnt / "f")], check=True)
        return time.perf_counter() - t0, bk.cpu_seconds(proc.pid) - cpu0
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(20)
        with contextlib.suppress(OSError):
            os.unlink(work / "memfs.data")


class Store:
    """Alice's view of the dataset: checks stored datafiles and deletes them."""

    def __init__(self, emu: bk.EmulatorProcess, session: str, dataset: int) -> None:
        self.icat = ICATClient(emu.icat_url, sessionId=session)
        self.ids = IDSClient(emu.ids_url, session)
        self.dataset = dataset

    def check_and_delete(self, name: str, size: int, crc: int) -> None:
        """Raise SystemExit unless ``name`` is stored with ``size`` and ``crc``; delete it."""
        rows = self.icat.search(f"SELECT df.id, df.fileSize, df.checksum FROM Datafile df WHERE "
                                f"df.dataset.id = {self.dataset} AND df.name = '{name}'")
        if len(rows) != 1 or tuple(rows[0][1:]) != (size, f"{crc:x}"):
            raise SystemExit(f"FAIL: {name} stored as {rows}, expected {(size, f'{crc:x}')}")
        self.ids.delete(DataSelection({"datafileIds": [rows[0][0]]}))

    def close(self) -> None:
        self.icat.close()
        self.ids.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="size of the copied file (default 1G)")
    parser.add_argument("--min-ratio", type=float, default=0.8)
    bk.add_mount_bench_options(parser, "extra idsfs mount argument (repeatable)")
    args = parser.parse_args()
    rc = bk.enter_private_namespace(__file__, sys.argv[1:])
    if rc is not None:
        return rc

    print(bk.machine_line())
    work = Path(tempfile.mkdtemp(prefix="bench-write-"))
    mounts: list[bk.Mounted] = []
    emu = bk.start_emulator(work / "emulator", demo=False)
    quiet = bk.quiet_waiter(args.quiet_wait)
    try:
        icat = bk.root_icat(emu)
        inv = bk.make_investigation(icat, "write")
        dataset = bk.make_dataset(icat, inv, "ds")
        icat.close()
        src = work / "source.bin"
        _, crc = bk.make_source(src, args.size)
        session = bk.login(emu, "alice")
        store = Store(emu, session, dataset)
        gb = args.size / 1e9
        S = bk.Series
        speed = {k: S() for k in ("curl", "cp", "cp0", "ceiling", "minimal", "local")}
        foreign = {k: S() for k in ("curl", "cp", "cp0")}
        cpu = {k: {p: S() for p in ("client", "daemon", "FUSE thread", "other threads",
                                    "emulator")} for k in ("curl", "cp", "cp0")}
        ceiling_cpu, minimal_cpu = S(), S()

        def record(key: str, m: bk.Measure, threads: dict[str, float] | None = None) -> None:
            speed[key].add(args.size / m.seconds)
            foreign[key].add(m.foreign)
            cpu[key]["client"].add(m.child_cpu / gb)
            cpu[key]["emulator"].add(m.cpu["emulator"] / gb)
            if threads is not None:  # the other threads upload (and may have ended)
                fuse = threads.get("idsfs", 0.0)
                cpu[key]["daemon"].add(m.cpu["daemon"] / gb)
                cpu[key]["FUSE thread"].add(fuse / gb)
                cpu[key]["other threads"].add((m.cpu["daemon"] - fuse) / gb)

        def curl_put(i: int) -> None:
            name = f"curl{i}.bin"
            query = urlencode({"sessionId": session, "name": name, "datasetId": dataset,
                               "datafileFormatId": inv.datafile_format})
            bk.read_into_page_cache(src)
            quiet()
            with bk.Measure.run({"emulator": emu.process.pid}) as m:
                _, answer = bk.curl_put(f"{emu.ids_url.rstrip('/')}/put?{query}", src)
            if json.loads(answer).get("size") != args.size:
                raise SystemExit(f"FAIL: curl put answered {answer[:200]}")
            record("curl", m)
            store.check_and_delete(name, args.size, crc)

        def cp_into_mount(key: str, i: int, *extra: str) -> None:
            spool = work / f"spool-{key}-{i}"
            m_ = bk.start_mount(work / f"mount-{key}-{i}", emu, "--spool-dir", str(spool),
                                *extra, *args.mount_option, register=mounts.append)
            assert m_.pid is not None
            target_dir = m_.path / "BENCH" / "write" / "1" / "ds"
            os.listdir(target_dir)  # the listing is not what is measured
            bk.read_into_page_cache(src)
            quiet()
            threads0 = bk.thread_cpu(m_.pid)
            with bk.Measure.run({"daemon": m_.pid, "emulator": emu.process.pid}) as m:
                subprocess.run(["cp", str(src), str(target_dir / f"{key}{i}.bin")], check=True)
            record(key, m, bk.thread_cpu_delta(threads0, bk.thread_cpu(m_.pid)))
            store.check_and_delete(f"{key}{i}.bin", args.size, crc)
            bk.teardown_mount(m_)
            mounts.remove(m_)

        for i in range(args.repeat):
            curl_put(i)
            cp_into_mount("cp", i)
            cp_into_mount("cp0", i, "--live-upload", "0")
            quiet()
            seconds, used = ceiling(work, src)
            speed["ceiling"].add(args.size / seconds)
            ceiling_cpu.add(used / gb)
            name = f"minimal{i}.bin"
            query = urlencode({"sessionId": session, "name": name, "datasetId": dataset,
                               "datafileFormatId": inv.datafile_format})
            bk.read_into_page_cache(src)
            quiet()
            seconds, used = ceiling(work, src, PUTFS, f"{emu.ids_url.rstrip('/')}/put?{query}")
            store.check_and_delete(name, args.size, crc)
            speed["minimal"].add(args.size / seconds)
            minimal_cpu.add(used / gb)
            bk.read_into_page_cache(src)
            quiet()
            t0 = time.perf_counter()
            subprocess.run(["cp", str(src), str(work / "local.bin")], check=True)
            speed["local"].add(args.size / (time.perf_counter() - t0))
            os.unlink(work / "local.bin")
            print(f"  repeat {i + 1}: curl {speed['curl'].values[-1] / MB:.0f} MB/s, cp "
                  f"{speed['cp'].values[-1] / MB:.0f} MB/s (foreign CPU "
                  f"{foreign['cp'].values[-1]:.2f} s, {bk.load_line()})", flush=True)
        store.close()

        ratio = bk.median_ratio(speed["cp"].values, speed["curl"].values)
        names = {"curl": "curl -T put", "cp": "cp into the mount", "cp0": "cp, upload at close",
                 "ceiling": "pyfuse3 ceiling", "minimal": "pyfuse3 + one put",
                 "local": "cp to a local file"}
        print(f"\nwriting a {args.size / 2**30:g} GiB file, median [min-max] of {args.repeat} "
              f"(mount options {args.mount_option or '-'}; {bk.load_line()}):")
        for key, name in names.items():
            line = f"  {name:22s} {speed[key].fmt(MB, unit=' MB/s')}"
            if key == "ceiling":
                line += f"; its CPU {ceiling_cpu.fmt(1, 2)} s/GB"
            if key == "minimal":
                line += f" (minimal, no spool); its CPU {minimal_cpu.fmt(1, 2)} s/GB"
            if key in cpu:
                parts = [f"{p} {s.fmt(1, 2)}" for p, s in cpu[key].items() if s.values]
                line += f"; CPU-s/GB: {', '.join(parts)}; foreign {foreign[key].fmt(1, 2, ' s')}"
            print(line)
        verdict = "PASS" if ratio.median >= args.min_ratio else "FAIL"
        print(f"  cp / curl = {ratio.fmt(1, 2)}, cp at close / curl = "
              f"{bk.median_ratio(speed['cp0'].values, speed['curl'].values).fmt(1, 2)}, "
              f"ceiling / curl = "
              f"{bk.median_ratio(speed['ceiling'].values, speed['curl'].values).fmt(1, 2)}, "
              f"minimal pyfuse3 + put / curl = "
              f"{bk.median_ratio(speed['minimal'].values, speed['curl'].values).fmt(1, 2)} "
              f"(target cp / curl >= {args.min_ratio}): {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        for m_ in mounts:
            bk.teardown_mount(m_)
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
