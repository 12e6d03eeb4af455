#!/usr/bin/env python3
"""Benchmark: idsfs ``IDSClient.put`` against ``curl -T`` (and python-icat).

Starts a single-level emulator and uploads one local file of ``--size``
bytes (default 1 GiB) ``--repeat`` times with each of:

* curl ``-T FILE`` to ``PUT /ids/put?...`` (the baseline; Content-Length body);
* idsfs ``IDSClient.put(open(FILE, "rb"), ...)`` (chunked, CRC32 while sending);
* python-icat ``icat.ids.IDSClient.put`` (chunked, 8 KiB blocks), for information.

Same emulator, same run, interleaved. Each upload is checked (curl: the
JSON size; the clients verify the CRC32). Prints the median throughput and
the ratios to curl; exits 1 when idsfs is below ``--min-ratio`` (default
0.9) of curl. Run: ``.venv/bin/python tests/bench/bench_put.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from bench_getdata import MB, make_file, setup, start_emulator

from idsfs.ids import IDSClient

_names = itertools.count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="uploads per client")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    parser.add_argument("--no-python-icat", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idsfs-bench-") as tmp:
        tmpdir = Path(tmp)
        with start_emulator(tmpdir) as emu:
            return bench(emu, tmpdir, args)


def bench(emu: object, tmpdir: Path, args: argparse.Namespace) -> int:
    sid, ds, fmt = setup(emu)  # type: ignore[arg-type]
    src = tmpdir / "blob"
    make_file(src, args.size)
    ids_url = emu.ids_url.rstrip("/")  # type: ignore[attr-defined]
    ids = IDSClient(ids_url, sid)

    def curl() -> int:
        query = urlencode({"sessionId": sid, "name": f"curl{next(_names)}",
                           "datasetId": ds, "datafileFormatId": fmt})
        out = subprocess.run(
            ["curl", "-s", "-S", "-f", "-T", str(src), "-H",
             "Content-Type: application/octet-stream", f"{ids_url}/put?{query}"],
            check=True, capture_output=True, text=True,
        )
        return int(json.loads(out.stdout)["size"])

    def ours() -> int:
        with open(src, "rb") as f:
            ids.put(f, f"idsfs{next(_names)}", ds, fmt)
        return args.size

    runners: dict[str, Callable[[], int]] = {"curl -T": curl, "idsfs put": ours}
    if not args.no_python_icat:
        try:
            import icat.ids as pyicat_ids

            theirs = pyicat_ids.IDSClient(ids_url, sessionId=sid)

            def pyicat() -> int:
                with open(src, "rb") as f:
                    theirs.put(f, f"pyicat{next(_names)}", ds, fmt)
                return args.size

            runners["python-icat put"] = pyicat
        except ImportError:
            pass

    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            got = run()
            elapsed = time.perf_counter() - start
            if got != args.size:
                print(f"{name}: stored {got} bytes, expected {args.size}", file=sys.stderr)
                return 1
            speeds[name].append(args.size / elapsed)
    med = {name: statistics.median(v) for name, v in speeds.items()}
    print(f"put of {args.size} bytes, median of {args.repeat} runs:")
    for name, v in med.items():
        print(f"  {name:16s} {v / MB:8.0f} MB/s   ratio to curl {v / med['curl -T']:.2f}")
    ok = med["idsfs put"] >= args.min_ratio * med["curl -T"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
