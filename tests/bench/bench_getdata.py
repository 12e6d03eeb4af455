#!/usr/bin/env python3
"""Benchmark: idsfs ``IDSClient.getData`` against python-icat and curl.

Starts a single-level emulator, stores one datafile of ``--size`` bytes
(default 1 GiB) and downloads it ``--repeat`` times with each of:

* curl (``-o /dev/null``), the baseline;
* idsfs: ``IDSClient.getData(...).readinto`` into one reused 1 MiB buffer
  (what the FUSE layer does) and ``DataStream.copyto`` into /dev/null;
* python-icat: ``icat.ids.IDSClient.getData(...).read(1 MiB)`` in a loop.

All from the same emulator in the same run, in interleaved order. Prints the
median throughput of each and the ratios to curl; exits 1 when idsfs is
below ``--min-ratio`` (default 0.9) of curl or not faster than python-icat.
Run: ``.venv/bin/python tests/bench/bench_getdata.py [--size BYTES]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from idsfs.ids import DataSelection, IDSClient

MB = 1_000_000
BLOCK = 1 << 20


def make_file(path: Path, size: int) -> None:
    """Write ``size`` pseudo-random bytes (one 1 MiB random block repeated)."""
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, BLOCK)
            f.write(block[:n])
            left -= n


def run_curl(url: str) -> int:
    out = subprocess.run(
        ["curl", "-s", "-S", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout)


def run_ours_readinto(ids: IDSClient, sel: DataSelection) -> int:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    with ids.getData(sel) as stream:
        while True:
            n = stream.readinto(view)
            if not n:
                return total
            total += n


def run_ours_copyto(ids: IDSClient, sel: DataSelection) -> int:
    with open(os.devnull, "wb") as null, ids.getData(sel) as stream:
        return stream.copyto(null)


def run_pyicat(client: object, sel: object) -> int:
    total = 0
    response = client.getData(sel)  # type: ignore[attr-defined]
    try:
        while True:
            block = response.read(BLOCK)
            if not block:
                return total
            total += len(block)
    finally:
        response.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="downloads per client")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="idsfs-bench-") as tmp:
        tmpdir = Path(tmp)
        with start_emulator(tmpdir) as emu:
            return bench(emu, tmpdir, args)


def setup(emu: EmulatorProcess) -> tuple[str, int, int]:
    """Log in as root and create a dataset; return (session id, dataset id, format id)."""
    from idsfs.icat import ICATClient
    from idsfs.model import (
        DatafileFormat,
        Dataset,
        DatasetType,
        Facility,
        Investigation,
        InvestigationType,
    )

    icat = ICATClient(emu.icat_url)
    sid = icat.login("simple", {"username": "root", "password": "root-secret"})
    fac = Facility(id=icat.create(Facility(name="B")))
    it = InvestigationType(id=icat.create(InvestigationType(name="t", facility=fac)))
    dt = DatasetType(id=icat.create(DatasetType(name="t", facility=fac)))
    fmt = icat.create(DatafileFormat(name="bin", version="1", facility=fac))
    inv = Investigation(id=icat.create(Investigation(name="bench", visitId="1", title="t",
                                                     facility=fac, type=it)))
    ds = icat.create(Dataset(name="ds", investigation=inv, type=dt, complete=False))
    return sid, ds, fmt


class EmulatorProcess:
    """``idsfs emulator`` in a child process (so the benchmarked client does not
    share a GIL with the server, just as curl does not); a context manager."""

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        self.proc: subprocess.Popen[str] | None = None
        self.icat_url = self.ids_url = ""

    def __enter__(self) -> EmulatorProcess:
        pwfile = self.tmpdir / "root.pw"
        pwfile.write_text("root-secret\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "idsfs.emulator", "--port", "0", "--data",
             str(self.tmpdir / "data"), "--user", f"root:@{pwfile}", "--root", "root", "-q"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"icat=(\S+) ids=(\S+)", line)
        if not match:
            self.__exit__()
            raise RuntimeError(f"emulator did not start: {line!r}")
        self.icat_url, self.ids_url = match.group(1), match.group(2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_emulator(tmpdir: Path) -> EmulatorProcess:
    """The emulator for a benchmark: a child process with user root."""
    return EmulatorProcess(tmpdir)


def bench(emu: EmulatorProcess, tmpdir: Path, args: argparse.Namespace) -> int:
    sid, ds, fmt = setup(emu)
    src = tmpdir / "blob"
    make_file(src, args.size)
    ids = IDSClient(emu.ids_url, sid)
    with open(src, "rb") as f:
        df = ids.put(f, "blob", ds, fmt)
    sel = DataSelection({"datafileIds": [df]})
    url = f"{emu.ids_url.rstrip('/')}/getData?sessionId={sid}&datafileIds={df}"

    runners: dict[str, Callable[[], int]] = {
        "curl": lambda: run_curl(url),
        "idsfs readinto": lambda: run_ours_readinto(ids, sel),
        "idsfs copyto": lambda: run_ours_copyto(ids, sel),
    }
    try:
        import icat.ids as pyicat_ids

        theirs = pyicat_ids.IDSClient(emu.ids_url, sessionId=sid)
        their_sel = pyicat_ids.DataSelection({"datafileIds": [df]})
        runners["python-icat"] = lambda: run_pyicat(theirs, their_sel)
    except ImportError:
        print("python-icat not installed: skipped", file=sys.stderr)

    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            got = run()
            elapsed = time.perf_counter() - start
            if got != args.size:
                print(f"{name}: got {got} bytes, expected {args.size}", file=sys.stderr)
                return 1
            speeds[name].append(args.size / elapsed)

    med = {name: statistics.median(v) for name, v in speeds.items()}
    print(f"getData of {args.size} bytes, median of {args.repeat} runs:")
    for name, v in med.items():
        print(f"  {name:16s} {v / MB:8.0f} MB/s   ratio to curl {v / med['curl']:.2f}")
    ours = max(med["idsfs readinto"], med["idsfs copyto"])
    ok = med["idsfs readinto"] >= args.min_ratio * med["curl"]
    if "python-icat" in med:
        print(f"  idsfs / python-icat: {ours / med['python-icat']:.2f}")
        ok = ok and med["idsfs readinto"] > med["python-icat"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
