#!/usr/bin/env python3
"""Benchmark: reading a datafile through a real mount, against curl getData.

Starts an emulator in a child process (no demo data), stores as ICAT root a
datafile of ``--size`` bytes (default 1 GiB) and one of ``--rss-size`` bytes
(default 2 GiB) in a dataset ``alice`` may read, then measures in one run,
interleaved, ``--repeat`` times (medians and [min-max] are printed):

* **curl**: ``getData`` of the datafile (alice's session) to /dev/null: the
  baseline throughput, and curl's time to the first byte;
* **transfer alone**: the same datafile read in this process through
  ``idsfs.transfer`` and the block cache (1 MiB reads, no FUSE, no kernel page
  cache): what the read path costs without the FUSE layer;
* **pyfuse3 ceiling**: ``dd`` of a file of the same size from a minimal pyfuse3
  file system that answers every read from one buffer in memory (same kernel
  readahead, ``max_tasks``, no network): what the FUSE layer alone allows here;
* **minimal pyfuse3 + getData**: ``dd`` of the datafile through a minimal
  pyfuse3 file system that answers the kernel's reads from one ``getData``
  response read on its trio thread (no block cache, no checks, no thread): what
  the simplest design with HTTP reaches, to compare the daemon with;
* **cold**: ``dd bs=1M`` of the file through a fresh mount (``--cache-size``,
  kernel readahead as the daemon sets it): throughput, the IDS requests the
  emulator counted, CPU seconds per GB of the daemon (and of its FUSE thread and
  its stream threads), of ``dd`` and of the emulator, and the time the daemon's
  and the emulator's threads spent runnable but waiting for a CPU;
* **first byte**: ``open`` + the first 4 KiB ``read`` of a file not read yet;
* **warm**: the same ``dd`` again (kernel page cache, kept across opens);
* **RSS**: the daemon's peak resident memory (``VmHWM``) while ``dd`` copies the
  ``--rss-size`` file to /dev/null through a mount with a 256 MiB cache.

Every measurement also records the CPU time other processes used meanwhile
(``foreign``): figures are only worth something when it is near 0. With
``--quiet-wait`` the script waits for an idle machine before each measurement.

Targets (issue 4): cold >= 0.8 of curl, warm >= 1 GB/s, RSS <= cache + 100 MiB;
the script prints PASS/FAIL for each and exits 1 if one fails. The bytes read
through the first mount are checked (SHA-256 of the page cache the cold read
filled).

Needs root and /dev/fuse; it re-runs itself inside a private mount namespace
(``unshare --mount --propagation private``), so no mount is left behind.
Run: ``.venv/bin/python tests/bench/bench_read.py [--size 1G --rss-size 2G]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import benchkit as bk

from idsfs.config import parse_size
from idsfs.icat import ICATClient
from idsfs.ids import IDSClient

MB, MiB = bk.MB, bk.MiB

#: What the baseline file systems share: a read-only root holding one file,
#: ``file`` (inode 2) of ``argv[2]`` bytes, mounted on ``argv[1]`` with the
#: kernel readahead ``argv[3]`` KiB; ``run(fs, fsname, on_start)`` serves it
#: and prints "ready" once the mount answers.
ONE_FILE_FS = r"""
import errno, os, stat, sys
import pyfuse3, trio

MNT, SIZE, READAHEAD_KB = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class OneFile(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_size = stat.S_IFDIR | 0o555, 0
        elif inode == 2:
            e.st_mode, e.st_size = stat.S_IFREG | 0o444, SIZE
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.attr_timeout = e.entry_timeout = 300
        return e
    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"file":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)

def set_readahead():
    st = os.stat(MNT)  # answered by the running loop
    bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(bdi, "w") as f:
            f.write(READAHEAD_KB)
    except OSError:
        pass
    print("ready", flush=True)

def run(fs, fsname, on_start=None):
    async def serve():
        async with trio.open_nursery() as nursery:
            if on_start is not None:
                on_start(nursery)
            nursery.start_soon(trio.to_thread.run_sync, set_readahead)
            await pyfuse3.main(max_tasks=64)
    pyfuse3.init(fs, MNT, {f"fsname={fsname}", "ro"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
"""

#: A pyfuse3 file system with one file served from memory (the ceiling baseline).
MEMFS = ONE_FILE_FS + r"""
DATA = memoryview(bytes(range(256)) * (1 << 12))  # 1 MiB pattern

class MemFS(OneFile):
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)
    async def read(self, fh, off, size):
        size = max(0, min(size, SIZE - off))
        start = off % (1 << 20)
        if start + size <= len(DATA):
            return DATA[start:start + size]
        return bytes(size)

run(MemFS(), "memfs")
"""

#: A minimal pyfuse3 file system whose one file is the body of one getData
#: response, read sequentially on the trio thread into reused 1 MiB buffers (no
#: block cache, no checks, no thread): what the simplest pyfuse3 + HTTP design reaches.
#: The URL (it holds a session id) comes on stdin, never in argv.
HTTPFS = ONE_FILE_FS + r"""
from urllib.parse import urlsplit

URL = urlsplit(sys.stdin.readline().strip())
BLOCK = 1 << 20

class Body:
    def __init__(self):
        self.blocks, self.served, self.free = {}, {}, []
        self.arrived = trio.Event()

    async def run(self):
        sock = trio.socket.socket()
        await sock.connect((URL.hostname, URL.port))
        await sock.send(f"GET {URL.path}?{URL.query} HTTP/1.1\r\nHost: {URL.netloc}\r\n"
                        "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await sock.recv(65536)
        status, rest = head.split(b"\r\n\r\n", 1)
        assert status.split()[1] == b"200", status
        offset = index = 0
        while offset < SIZE:
            n = min(BLOCK, SIZE - offset)
            buf = self.free.pop() if self.free and n == BLOCK else bytearray(n)
            view = memoryview(buf)
            got = len(rest[:n])
            view[:got], rest = rest[:n], rest[n:]
            while got < n:
                r = await sock.recv_into(view[got:])
                assert r, "the body ended early"
                got += r
            self.blocks[index] = buf
            index, offset = index + 1, offset + n
            self.arrived.set()
            self.arrived = trio.Event()

    async def read(self, off, size):
        i = off // BLOCK
        while i not in self.blocks:
            await self.arrived.wait()
        buf = self.blocks[i]
        out = memoryview(buf)[off - i * BLOCK:off - i * BLOCK + size]
        self.served[i] = self.served.get(i, 0) + len(out)
        if self.served[i] >= len(buf):
            del self.blocks[i]
            self.free.append(buf)
        return out

class HttpFS(OneFile):
    def __init__(self):
        super().__init__()
        self.nursery = self.body = None
    async def open(self, inode, flags, ctx):
        if self.body is None:
            self.body = Body()
            self.nursery.start_soon(self.body.run)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)
    async def read(self, fh, off, size):
        size = max(0, min(size, SIZE - off))
        parts = []
        while size:
            part = await self.body.read(off, size)
            parts.append(part)
            off, size = off + len(part), size - len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

fs = HttpFS()
run(fs, "httpfs", lambda nursery: setattr(fs, "nursery", nursery))
"""


@dataclass
class Stored:
    path_in_mount: str  # relative to the mount point
    datafile_id: int
    size: int
    sha256: str


def populate(emu: bk.EmulatorProcess, work: Path, sizes: dict[str, int]) -> dict[str, Stored]:
    """As ICAT root: an investigation alice may read, a dataset, the files put through IDS."""
    icat = bk.root_icat(emu)
    try:
        inv = bk.make_investigation(icat, "READ", format_name="bin")
        ds = bk.make_dataset(icat, inv, "data", complete=True)
        ids = IDSClient(emu.ids_url, icat.sessionId)
        stored = {}
        for name, size in sizes.items():
            src = work / f"{name}.src"
            digest, _ = bk.make_source(src, size, block=MiB)
            with open(src, "rb") as f:
                df = ids.put(f, name, ds, inv.datafile_format)
            src.unlink()
            stored[name] = Stored(f"BENCH/READ/1/data/{name}", df, size, digest)
        ids.close()
        return stored
    finally:
        icat.close()


def transfer_read(emu: bk.EmulatorProcess, session: str, df: int, cache_size: int) -> float:
    """Read datafile ``df`` with idsfs.transfer in this process; return bytes per second."""
    import trio

    from idsfs.aio import ThreadBridge
    from idsfs.blockcache import BlockCache
    from idsfs.model import Datafile
    from idsfs.transfer import Transfer

    ids = IDSClient(emu.ids_url, session)
    icat = ICATClient(emu.icat_url, sessionId=session)
    record = icat.get(Datafile, df)
    result: list[float] = []

    async def main() -> None:
        # with the daemon's allocator tuning (block buffers recycled from the heap)
        transfer = Transfer(ids, ThreadBridge(16), BlockCache(cache_size), restore_wait=60,
                            malloc_tuning=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(transfer.run)
            reader = await transfer.open(record)
            start = time.perf_counter()
            offset = 0
            while True:
                view = await reader.read(offset, MiB)
                if not len(view):
                    break
                offset += len(view)
            result.append(offset / (time.perf_counter() - start))
            await reader.close()
            await transfer.aclose()

    try:
        trio.run(main)
    finally:
        ids.close()
        icat.close()
    return result[0]


def baseline_read(work: Path, name: str, source: str, size: int, readahead_kb: int,
                  stdin: str = "") -> tuple[float, float]:
    """Mount the baseline file system ``source`` (MEMFS or HTTPFS), ``dd`` its file once.

    ``stdin`` is written to the file system's standard input (HTTPFS reads its
    URL there). Returns (bytes per second, the file system's CPU seconds per GB).
    """
    mnt = work / name
    mnt.mkdir(exist_ok=True)
    script = work / f"{name}.py"
    script.write_text(source)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(size),
                             str(readahead_kb)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(stdin + "\n")
        proc.stdin.close()
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {name} baseline did not mount")
        cpu0 = bk.cpu_seconds(proc.pid)
        seconds, got = bk.dd(mnt / "file")
        if got != size:
            raise RuntimeError(f"the {name} baseline gave {got} bytes, not {size}")
        return got / seconds, (bk.cpu_seconds(proc.pid) - cpu0) / (got / 1e9)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return digest.hexdigest()
            digest.update(view[:n])


def first_byte(path: Path) -> float:
    """Seconds from ``open`` to the end of the first 4 KiB ``read``."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 4096)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def runq_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a CPU
    (``/proc/<pid>/task/*/schedstat``, second field); 0.0 where unavailable."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def ids_requests(emu: bk.EmulatorProcess) -> dict[str, int]:
    return {name: c.get("requests", 0) for name, c in emu.counters().items()
            if name.startswith("ids/") and c.get("requests", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30,
                        help="size of the datafile read cold and warm (default 1G)")
    parser.add_argument("--rss-size", type=parse_size, default=2 << 30,
                        help="size of the datafile copied for the RSS figure (default 2G)")
    parser.add_argument("--cache-size", type=parse_size, default=256 << 20,
                        help="--cache-size of the mounts (default 256M)")
    parser.add_argument("--readahead-kb", type=int, default=8192,
                        help="read_ahead_kb of the pyfuse3 baseline (the daemon's default: 8192)")
    bk.add_mount_bench_options(
        parser, "extra idsfs mount argument (repeatable), e.g. --readahead=16M")
    args = parser.parse_args()
    rc = bk.enter_private_namespace(__file__, sys.argv[1:])
    if rc is not None:
        return rc

    print(bk.machine_line())
    work = Path(tempfile.mkdtemp(prefix="bench-read-"))
    mounts: list[bk.Mounted] = []
    emu = bk.start_emulator(work / "emulator", demo=False)
    mount_args = ["--cache-size", str(args.cache_size), *args.mount_option]
    quiet = bk.quiet_waiter(args.quiet_wait)
    try:
        t0 = time.perf_counter()
        stored = populate(emu, work, {"cold.bin": args.size, "rss.bin": args.rss_size,
                                      "first.bin": 4 * MiB})
        print(f"stored {args.size + args.rss_size} bytes in {time.perf_counter() - t0:.1f} s")
        session = bk.login(emu, "alice")
        cold_file = stored["cold.bin"]
        gb = cold_file.size / 1e9
        url = (f"{emu.ids_url.rstrip('/')}/getData?sessionId={session}"
               f"&datafileIds={cold_file.datafile_id}")
        S = bk.Series
        curl, curl_ttfb, curl_emu, curl_foreign = S(), S(), S(), S()
        alone, ceiling, ceiling_cpu, minimal, minimal_cpu = S(), S(), S(), S(), S()
        cold, warm, mount_ttfb, foreign = S(), S(), S(), S()
        daemon_wait, emu_wait = S(), S()
        cpu: dict[str, bk.Series] = {k: S() for k in
                                     ("daemon", "fuse thread", "stream threads", "dd", "emulator")}
        requests_seen = []
        for i in range(args.repeat):
            quiet()
            with bk.Measure.run({"emulator": emu.process.pid}) as m:
                seconds, ttfb, size = bk.curl_get(url)
            assert size == cold_file.size, (size, cold_file.size)
            curl.add(size / seconds)
            curl_ttfb.add(ttfb)
            curl_emu.add(m.cpu["emulator"] / gb)
            curl_foreign.add(m.foreign)
            quiet()
            alone.add(transfer_read(emu, session, cold_file.datafile_id, args.cache_size))
            quiet()
            speed, ceiling_cpu_gb = baseline_read(work, "memfs", MEMFS, cold_file.size,
                                                  args.readahead_kb)
            ceiling.add(speed)
            ceiling_cpu.add(ceiling_cpu_gb)
            quiet()
            speed, minimal_cpu_gb = baseline_read(work, "httpfs", HTTPFS, cold_file.size,
                                                args.readahead_kb, stdin=url)
            minimal.add(speed)
            minimal_cpu.add(minimal_cpu_gb)

            m_ = bk.start_mount(work / f"mount{i}", emu, *mount_args, register=mounts.append)
            assert m_.pid is not None
            path = m_.path / cold_file.path_in_mount
            os.stat(path)  # the listing is not what is measured
            mount_ttfb.add(first_byte(m_.path / stored["first.bin"].path_in_mount))
            emu.reset_counters()
            quiet()
            threads0 = bk.thread_cpu(m_.pid)
            waits0 = runq_wait(m_.pid), runq_wait(emu.process.pid)
            with bk.Measure.run({"daemon": m_.pid, "emulator": emu.process.pid}) as m:
                seconds, size = bk.dd(path)
            by_thread = bk.thread_cpu_delta(threads0, bk.thread_cpu(m_.pid))
            daemon_wait.add((runq_wait(m_.pid) - waits0[0]) / seconds)
            emu_wait.add((runq_wait(emu.process.pid) - waits0[1]) / seconds)
            cold.add(size / seconds)
            foreign.add(m.foreign)
            cpu["daemon"].add(m.cpu["daemon"] / gb)
            cpu["emulator"].add(m.cpu["emulator"] / gb)
            cpu["dd"].add(m.child_cpu / gb)
            cpu["fuse thread"].add(by_thread.pop("idsfs", 0.0) / gb)
            cpu["stream threads"].add(sum(by_thread.values()) / gb)
            requests_seen.append(ids_requests(emu))
            seconds, size = bk.dd(path)
            warm.add(size / seconds)
            if i == 0 and sha256_of(path) != cold_file.sha256:  # what the daemon delivered
                print("FAIL: the bytes read through the mount differ", file=sys.stderr)
                return 1
            bk.teardown_mount(m_)
            mounts.remove(m_)
            print(f"  repeat {i + 1}: curl {curl.values[-1] / MB:.0f} MB/s, cold "
                  f"{cold.values[-1] / MB:.0f} MB/s (foreign CPU {m.foreign:.2f} s, "
                  f"{bk.load_line()})", flush=True)

        # Peak RSS while copying the big file with a 256 MiB cache.
        rss_cache = 256 << 20
        m_ = bk.start_mount(work / "mount-rss", emu, *args.mount_option, "--cache-size",
                            str(rss_cache), register=mounts.append)
        assert m_.pid is not None
        rss_path = m_.path / stored["rss.bin"].path_in_mount
        os.stat(rss_path)
        base_rss = status_kib(m_.pid, "VmRSS") * 1024
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(status_kib(m_.pid, "VmRSS") * 1024)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds, size = bk.dd(rss_path)
        done.set()
        sampler.join()
        peak = status_kib(m_.pid, "VmHWM") * 1024
        rss_speed = size / seconds
        bk.teardown_mount(m_)
        mounts.remove(m_)

        ratio = bk.median_ratio(cold.values, curl.values)
        limit = rss_cache + 100 * MiB
        print(f"\nreading a {cold_file.size / 2**30:g} GiB datafile, median [min-max] of "
              f"{args.repeat} (cache {args.cache_size / MiB:g} MiB, mount options "
              f"{args.mount_option or '-'}; {bk.load_line()}):")
        print(f"  curl getData          {curl.fmt(MB, unit=' MB/s')}, first byte "
              f"{curl_ttfb.fmt(1e-3, 1, ' ms')}; emulator {curl_emu.fmt(1, 2)} CPU-s/GB")
        print(f"  transfer alone        {alone.fmt(MB, unit=' MB/s')} (no FUSE)")
        print(f"  pyfuse3 from memory   {ceiling.fmt(MB, unit=' MB/s')} (the FUSE ceiling; its "
              f"CPU {ceiling_cpu.fmt(1, 2)} s/GB)")
        print(f"  pyfuse3 + one getData {minimal.fmt(MB, unit=' MB/s')} (minimal, no cache; its "
              f"CPU {minimal_cpu.fmt(1, 2)} s/GB)")
        print(f"  mount, cold (dd 1M)   {cold.fmt(MB, unit=' MB/s')}, first byte "
              f"{mount_ttfb.fmt(1e-3, 1, ' ms')} (open + 4 KiB read)")
        print(f"  mount, warm (dd 1M)   {warm.fmt(MB, unit=' MB/s')}")
        print("  CPU-s/GB of a cold read: " + ", ".join(
            f"{name} {series.fmt(1, 2)}" for name, series in cpu.items()))
        print(f"  waiting for a CPU (run queue) during a cold read, per second of it: daemon "
              f"threads {daemon_wait.fmt(1, 2, ' s')}, emulator {emu_wait.fmt(1, 2, ' s')}")
        print(f"  foreign CPU during the cold reads {foreign.fmt(1, 2, ' s')}, during curl "
              f"{curl_foreign.fmt(1, 2, ' s')}")
        print(f"  ratio cold / curl {ratio.fmt(1, 2)}, cold / pyfuse3 ceiling "
              f"{bk.median_ratio(cold.values, ceiling.values).fmt(1, 2)}, ceiling / curl "
              f"{bk.median_ratio(ceiling.values, curl.values).fmt(1, 2)},\n"
              f"  minimal pyfuse3 + getData / curl "
              f"{bk.median_ratio(minimal.values, curl.values).fmt(1, 2)}")
        print(f"  IDS requests of a cold read: {requests_seen[-1]}")
        print(f"  copy of {size / 2**30:g} GiB with a 256 MiB cache: {rss_speed / MB:.0f} MB/s, "
              f"daemon RSS before {base_rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
              f"(sampled max {max(samples, default=0) / MiB:.0f} MiB)")
        checks = [
            (f"cold / curl = {ratio.median:.2f} >= 0.8", ratio.median >= 0.8),
            (f"warm = {warm.median / 1e9:.2f} GB/s >= 1", warm.median >= 1e9),
            (f"peak RSS {peak / MiB:.0f} MiB <= cache + 100 MiB = {limit / MiB:.0f} MiB",
             peak <= limit),
        ]
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}: {text}")
        return 0 if all(ok for _, ok in checks) else 1
    finally:
        for m_ in mounts:
            bk.teardown_mount(m_)
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
