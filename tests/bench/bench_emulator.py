#!/usr/bin/env python3
"""Benchmark: emulator getData throughput to curl on 127.0.0.1, against a baseline.

Stores one file of ``--size`` bytes (default 1 GiB) in a fresh single-level
emulator through IDS ``put``, then downloads it ``--repeat`` times with curl:

* from the emulator: ``GET /ids/getData?sessionId=...&datafileIds=N`` (raw
  single file, sessionId mode: Content-Length, sendfile);
* from ``python -m http.server`` serving the very same file (baseline).

Prints MB/s of each (median of the runs) and the ratio emulator / baseline,
measured in the same run. Run: ``.venv/bin/python tests/bench/bench_emulator.py``.
Exits 1 if a download is short or the emulator is below ``--min-gbps``
(default 1.0 GB/s, the requirement of issue 2), 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from idsfs.emulator import Emulator, EmulatorSettings

MB = 1_000_000


def curl(url: str) -> tuple[int, float]:
    """Download ``url`` to /dev/null with curl; return (bytes, bytes per second)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(float(out[0])), float(out[1])


def chunks(size: int) -> Iterator[bytes]:
    block = os.urandom(1 << 20)
    left = size
    while left > 0:
        piece = block[: min(left, len(block))]
        left -= len(piece)
        yield piece


def setup(emu: Emulator) -> tuple[int, int]:
    """Facility, investigation and dataset; returns (dataset id, datafile format id)."""
    cat, root = emu.catalogue, "simple/root"
    (fac,) = cat.write(root, [{"Facility": {"name": "BENCH"}}])
    (itype,) = cat.write(root, [{"InvestigationType": {"name": "t", "facility": {"id": fac}}}])
    (dtype,) = cat.write(root, [{"DatasetType": {"name": "t", "facility": {"id": fac}}}])
    (fmt,) = cat.write(
        root, [{"DatafileFormat": {"name": "bin", "version": "1", "facility": {"id": fac}}}]
    )
    inv_body = {"name": "I", "visitId": "1", "title": "t", "facility": {"id": fac}}
    inv_body["type"] = {"id": itype}
    (inv,) = cat.write(root, [{"Investigation": inv_body}])
    (ds,) = cat.write(
        root, [{"Dataset": {"name": "ds", "investigation": {"id": inv}, "type": {"id": dtype}}}]
    )
    return ds, fmt


def start_http_server(directory: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"port (\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"http.server did not report its port: {line!r}")
    return proc, int(m.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="file size in bytes")
    parser.add_argument("--repeat", type=int, default=3, help="downloads per server")
    parser.add_argument("--min-gbps", type=float, default=1.0, help="required GB/s")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        print("curl is needed", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="bench-emulator-"))
    settings = EmulatorSettings(users={"root": "bench"}, roots={"root"}, data_dir=tmp / "data")
    baseline = None
    try:
        with Emulator(settings) as emu:
            ds, fmt = setup(emu)
            sid = emu.login("root")
            t0 = time.monotonic()
            r = requests.put(
                emu.ids_url + "/put",
                params={"sessionId": sid, "name": "big.bin", "datasetId": ds,
                        "datafileFormatId": fmt},
                data=chunks(args.size),
                headers={"Content-Type": "application/octet-stream"},
            )  # fmt: skip
            r.raise_for_status()
            upload = args.size / (time.monotonic() - t0)
            df_id, location = r.json()["id"], r.json()["location"]
            path = emu.storage.main_path(location.replace("\\'", "'").replace("\\\\", "\\"))
            baseline, port = start_http_server(path.parent)
            url_emu = f"{emu.ids_url}/getData?sessionId={sid}&datafileIds={df_id}"
            url_base = f"http://127.0.0.1:{port}/{path.name}"
            emu_rates, base_rates = [], []
            for _ in range(args.repeat):  # interleaved, so both see the same machine state
                for url, rates in ((url_emu, emu_rates), (url_base, base_rates)):
                    got, rate = curl(url)
                    if got != args.size:
                        print(f"short download from {url}: {got} bytes", file=sys.stderr)
                        return 1
                    rates.append(rate)
            e, b = statistics.median(emu_rates), statistics.median(base_rates)
            print(f"file size                 {args.size / MB:10.1f} MB")
            print(f"put (requests, chunked)   {upload / MB:10.1f} MB/s")
            print(f"emulator getData -> curl  {e / MB:10.1f} MB/s  (runs: "
                  + ", ".join(f"{x / MB:.0f}" for x in emu_rates) + ")")  # fmt: skip
            print(f"http.server -> curl       {b / MB:10.1f} MB/s  (runs: "
                  + ", ".join(f"{x / MB:.0f}" for x in base_rates) + ")")  # fmt: skip
            print(f"ratio emulator/http.server {e / b:9.2f}")
            return 0 if e >= args.min_gbps * 1000 * MB else 1
    finally:
        if baseline is not None:
            baseline.kill()
            baseline.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
