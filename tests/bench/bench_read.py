#!/usr/bin/env python3
"""Benchmark: reading a datafile through a real mount, against curl getData.

Starts an emulator in a child process (no demo data), stores as ICAT root a
datafile of ``--size`` bytes (default 1 GiB) and one of ``--rss-size`` bytes
(default 2 GiB) in a dataset ``alice`` may read, then measures in one run,
interleaved, ``--repeat`` times (medians are printed):

* **curl**: ``getData`` of the datafile (alice's session) to /dev/null: the
  baseline throughput, and curl's time to the first byte;
* **transfer alone**: the same datafile read in this process through
  ``idsfs.transfer`` and the block cache (1 MiB reads, no FUSE, no kernel page
  cache): what the read path costs without the FUSE layer;
* **pyfuse3 ceiling**: ``dd`` of a file of the same size from a minimal pyfuse3
  file system that answers every read from one buffer in memory (same kernel
  readahead, ``max_tasks``, no network): what the FUSE layer alone allows here;
* **cold**: ``dd bs=1M`` of the file through a fresh mount (``--cache-size``,
  kernel readahead as the daemon sets it): throughput, the IDS requests the
  emulator counted, the daemon's CPU seconds per GB;
* **first byte**: ``open`` + the first 4 KiB ``read`` of a file not read yet;
* **warm**: the same ``dd`` again (kernel page cache, kept across opens);
* **RSS**: the daemon's peak resident memory (``VmHWM``) while ``dd`` copies the
  ``--rss-size`` file to /dev/null through a mount with a 256 MiB cache.

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
from idsfs.ids import IDSClient  # noqa: E402

_NS_FLAG = "IDSFS_BENCH_IN_NAMESPACE"

#: A pyfuse3 file system with one file served from memory (the ceiling baseline).
MEMFS = r"""
import errno, os, stat, sys
import pyfuse3, trio

SIZE = int(sys.argv[2])
DATA = memoryview(bytes(range(256)) * (1 << 12))  # 1 MiB pattern

class MemFS(pyfuse3.Operations):
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
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)
    async def read(self, fh, off, size):
        size = max(0, min(size, SIZE - off))
        start = off % (1 << 20)
        if start + size <= len(DATA):
            return DATA[start:start + size]
        return bytes(size)

def set_readahead():
    st = os.stat(sys.argv[1])  # answered by the running loop
    bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(bdi, "w") as f:
            f.write(sys.argv[3])
    except OSError:
        pass
    print("ready", flush=True)

async def serve():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, set_readahead)
        await pyfuse3.main(max_tasks=64)

def main():
    pyfuse3.init(MemFS(), sys.argv[1], {"fsname=memfs", "ro"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)

main()
"""


def transfer_read(emu: EmulatorProcess, session: str, df: int, cache_size: int) -> float:
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
        transfer = Transfer(ids, ThreadBridge(16), BlockCache(cache_size), restore_wait=60)
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


def memfs_read(work: Path, size: int, readahead_kb: int) -> tuple[float, float]:
    """Mount MEMFS, ``dd`` its file once (cold); return (bytes per second, CPU s per GB)."""
    mnt = work / "memfs"
    mnt.mkdir(exist_ok=True)
    script = work / "memfs.py"
    script.write_text(MEMFS)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(size),
                             str(readahead_kb)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the pyfuse3 baseline did not mount")
        cpu0 = cpu_seconds(proc.pid)
        seconds, got = dd(mnt / "file")
        return got / seconds, (cpu_seconds(proc.pid) - cpu0) / (got / 1e9)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
MB = 1_000_000
MiB = 1 << 20


def make_source(path: Path, size: int) -> str:
    """Write ``size`` bytes (a random MiB whose first 8 bytes are the MiB index); return SHA-256."""
    block = bytearray(os.urandom(MiB))
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        index = 0
        left = size
        while left:
            block[:8] = index.to_bytes(8, "big")
            piece = memoryview(block)[: min(left, MiB)]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
            index += 1
    return digest.hexdigest()


@dataclass
class Stored:
    path_in_mount: str  # relative to the mount point
    datafile_id: int
    size: int
    sha256: str


def populate(emu: EmulatorProcess, work: Path, sizes: dict[str, int]) -> dict[str, Stored]:
    """Create facility/investigation/dataset readable by alice and put the files."""
    icat = ICATClient(emu.icat_url)
    session = icat.login("simple", {"username": "root", "password": USERS["root"]})
    try:
        fac = icat.create({"Facility": {"name": "BENCH"}})
        itype = icat.create({"InvestigationType": {"name": "t", "facility": {"id": fac}}})
        dtype = icat.create({"DatasetType": {"name": "t", "facility": {"id": fac}}})
        fmt = icat.create({"DatafileFormat": {"name": "bin", "version": "1",
                                              "facility": {"id": fac}}})
        alice = icat.create({"User": {"name": "simple/alice"}})
        inv = icat.create({"Investigation": {"name": "READ", "visitId": "1", "title": "read",
                                             "facility": {"id": fac}, "type": {"id": itype}}})
        icat.create({"InvestigationUser": {"role": "PI", "user": {"id": alice},
                                           "investigation": {"id": inv}}})
        ds = icat.create({"Dataset": {"name": "data", "complete": True,
                                      "investigation": {"id": inv}, "type": {"id": dtype}}})
        ids = IDSClient(emu.ids_url, session)
        stored = {}
        for name, size in sizes.items():
            src = work / f"{name}.src"
            digest = make_source(src, size)
            with open(src, "rb") as f:
                df = ids.put(f, name, ds, fmt)
            src.unlink()
            stored[name] = Stored(f"BENCH/READ/1/data/{name}", df, size, digest)
        ids.close()
        return stored
    finally:
        icat.close()


def curl_get(emu: EmulatorProcess, session: str, df: int) -> tuple[float, float, int]:
    """curl getData to /dev/null: (seconds, seconds to first byte, bytes)."""
    url = f"{emu.ids_url.rstrip('/')}/getData?sessionId={session}&datafileIds={df}"
    config = tempfile.NamedTemporaryFile("w", delete=False, suffix=".curl")  # noqa: SIM115
    try:
        os.chmod(config.name, 0o600)
        config.write(f'url = "{url}"\noutput = "/dev/null"\n')  # the session stays off argv
        config.close()
        start = time.perf_counter()
        done = subprocess.run(
            ["curl", "-s", "-S", "-f", "-K", config.name, "-w",
             "%{time_starttransfer} %{size_download}"],
            check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    finally:
        os.unlink(config.name)
    ttfb, size = done.stdout.split()
    return seconds, float(ttfb), int(size)


def dd(path: Path) -> tuple[float, int]:
    """``dd if=path of=/dev/null bs=1M``: (seconds, bytes)."""
    start = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   capture_output=True)
    return time.perf_counter() - start, path.stat().st_size


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def ids_requests(emu: EmulatorProcess) -> dict[str, int]:
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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--readahead-kb", type=int, default=8192,
                        help="read_ahead_kb of the pyfuse3 baseline (the daemon's default: 8192)")
    parser.add_argument("--mount-option", action="append", default=[],
                        help="extra idsfs mount argument (repeatable), e.g. --readahead=16M")
    args = parser.parse_args()

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    if os.environ.get(_NS_FLAG) != "1":
        env = dict(os.environ, **{_NS_FLAG: "1"})
        return subprocess.call(["unshare", "--mount", "--propagation", "private",
                                sys.executable, __file__, *sys.argv[1:]], env=env)

    work = Path(tempfile.mkdtemp(prefix="bench-read-"))
    mounts: list[Mounted] = []
    emu = start_emulator(work / "emulator", demo=False)
    mount_args = ["--cache-size", str(args.cache_size), *args.mount_option]
    try:
        t0 = time.perf_counter()
        stored = populate(emu, work, {"cold.bin": args.size, "rss.bin": args.rss_size,
                                      "first.bin": 4 * MiB})
        print(f"stored {args.size + args.rss_size} bytes in {time.perf_counter() - t0:.1f} s")
        icat = ICATClient(emu.icat_url)
        session = icat.login("simple", {"username": "alice", "password": USERS["alice"]})
        cold_file = stored["cold.bin"]

        curl_speed, curl_ttfb, cold_speed, warm_speed, mount_ttfb = [], [], [], [], []
        ceiling, ceiling_cpu, alone = [], [], []
        cpu_per_gb, requests_seen = [], []
        for i in range(args.repeat):
            seconds, ttfb, size = curl_get(emu, session, cold_file.datafile_id)
            assert size == cold_file.size, (size, cold_file.size)
            curl_speed.append(size / seconds)
            curl_ttfb.append(ttfb)
            alone.append(transfer_read(emu, session, cold_file.datafile_id, args.cache_size))
            speed, cpu = memfs_read(work, cold_file.size, args.readahead_kb)
            ceiling.append(speed)
            ceiling_cpu.append(cpu)

            m = start_mount(work / f"mount{i}", emu, *mount_args, register=mounts.append)
            assert m.pid is not None
            path = m.path / cold_file.path_in_mount
            os.stat(path)  # the listing is not what is measured
            mount_ttfb.append(first_byte(m.path / stored["first.bin"].path_in_mount))
            emu.reset_counters()
            cpu0 = cpu_seconds(m.pid)
            seconds, size = dd(path)
            cold_speed.append(size / seconds)
            cpu_per_gb.append((cpu_seconds(m.pid) - cpu0) / (cold_file.size / 1e9))
            requests_seen.append(ids_requests(emu))
            seconds, size = dd(path)
            warm_speed.append(size / seconds)
            if i == 0 and sha256_of(path) != cold_file.sha256:  # what the daemon delivered
                print("FAIL: the bytes read through the mount differ", file=sys.stderr)
                return 1
            teardown_mount(m)
            mounts.remove(m)

        # Peak RSS while copying the big file with a 256 MiB cache.
        rss_cache = 256 << 20
        m = start_mount(work / "mount-rss", emu, *args.mount_option, "--cache-size",
                        str(rss_cache), register=mounts.append)
        assert m.pid is not None
        rss_path = m.path / stored["rss.bin"].path_in_mount
        os.stat(rss_path)
        base_rss = status_kib(m.pid, "VmRSS") * 1024
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(status_kib(m.pid, "VmRSS") * 1024)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds, size = dd(rss_path)
        done.set()
        sampler.join()
        peak = status_kib(m.pid, "VmHWM") * 1024
        rss_speed = size / seconds
        teardown_mount(m)
        mounts.remove(m)
        icat.close()

        med = statistics.median
        ratio = med(cold_speed) / med(curl_speed)
        limit = rss_cache + 100 * MiB
        print(f"\nreading a {cold_file.size / 2**30:g} GiB datafile, medians of {args.repeat} "
              f"(cache {args.cache_size / MiB:g} MiB, mount options {args.mount_option or '-'}):")
        print(f"  curl getData          {med(curl_speed) / MB:8.0f} MB/s   first byte "
              f"{med(curl_ttfb) * 1000:6.1f} ms")
        print(f"  transfer alone        {med(alone) / MB:8.0f} MB/s   (no FUSE)")
        print(f"  pyfuse3 from memory   {med(ceiling) / MB:8.0f} MB/s   (the FUSE ceiling; "
              f"its CPU {med(ceiling_cpu):.2f} s per GB)")
        print(f"  mount, cold (dd 1M)   {med(cold_speed) / MB:8.0f} MB/s   first byte "
              f"{med(mount_ttfb) * 1000:6.1f} ms (open + 4 KiB read)")
        print(f"  mount, warm (dd 1M)   {med(warm_speed) / MB:8.0f} MB/s")
        print(f"  daemon CPU, cold      {med(cpu_per_gb):8.2f} s per GB")
        print(f"  ratio cold / curl {ratio:.2f}, cold / pyfuse3 ceiling "
              f"{med(cold_speed) / med(ceiling):.2f}, ceiling / curl "
              f"{med(ceiling) / med(curl_speed):.2f}")
        print(f"  IDS requests of a cold read: {requests_seen[-1]}")
        print(f"  copy of {size / 2**30:g} GiB with a 256 MiB cache: {rss_speed / MB:.0f} MB/s, "
              f"daemon RSS before {base_rss / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
              f"(sampled max {max(samples, default=0) / MiB:.0f} MiB)")
        checks = [
            (f"cold / curl = {ratio:.2f} >= 0.8", ratio >= 0.8),
            (f"warm = {med(warm_speed) / 1e9:.2f} GB/s >= 1", med(warm_speed) >= 1e9),
            (f"peak RSS {peak / MiB:.0f} MiB <= cache + 100 MiB = {limit / MiB:.0f} MiB",
             peak <= limit),
        ]
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}: {text}")
        return 0 if all(ok for _, ok in checks) else 1
    finally:
        for m in mounts:
            teardown_mount(m)
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
