#!/usr/bin/env python3
"""Benchmark: ``ls -lR`` over 10,000 datafiles in 100 datasets through a real mount.

Starts an emulator (child process, no demo data), creates as ICAT root one
investigation that ``alice`` may read with ``--datasets`` datasets of
``--files`` datafiles each (ICAT records with a location; no bytes: listing never
reads them), mounts it with ``idsfs mount`` as alice, and measures, in one run:

* **mount, cold**: ``ls -lR`` right after mounting (every listing fetched from
  ICAT), seconds and the ICAT/IDS requests the emulator counted;
* **mount, warm**: ``ls -lR`` again within the metadata TTL (no ICAT call);
* **baseline ICAT**: the same ICAT queries the mount makes (one tuple query per
  directory page), sent by one ``curl`` process over one keep-alive connection;
* **baseline local**: ``ls -lR`` of an equivalent tree of sparse files on local
  disk (same names and sizes).

Each is repeated ``--repeat`` times (a new mount for every cold run); medians
are printed with the ratios cold / ICAT baseline and cold / local. Exits 1 if a
cold ``ls -lR`` makes more than directories + 3 ICAT requests or any IDS request.

Needs root and /dev/fuse; it re-runs itself inside a private mount namespace
(``unshare --mount --propagation private``), so no mount is left behind.
Run: ``.venv/bin/python tests/bench/bench_listing.py [--datasets 100 --files 100]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit as bk
from benchkit import EmulatorProcess, Mounted, start_emulator, start_mount, teardown_mount

from idsfs.icat import ICATClient


def populate(emu: EmulatorProcess, datasets: int, files: int) -> None:
    """Create the investigation, datasets and datafiles."""
    icat = bk.root_icat(emu)
    try:
        fac = icat.create({"Facility": {"name": "BENCH"}})
        itype = icat.create({"InvestigationType": {"name": "t", "facility": {"id": fac}}})
        dtype = icat.create({"DatasetType": {"name": "t", "facility": {"id": fac}}})
        alice = icat.create({"User": {"name": "simple/alice"}})
        inv = icat.create({"Investigation": {"name": "BIG", "visitId": "1", "title": "big",
                                             "facility": {"id": fac}, "type": {"id": itype}}})
        icat.create({"InvestigationUser": {"role": "PI", "user": {"id": alice},
                                           "investigation": {"id": inv}}})
        ids = icat.create([{"Dataset": {"name": f"dataset_{d:03d}", "complete": True,
                                        "investigation": {"id": inv}, "type": {"id": dtype}}}
                           for d in range(datasets)])
        for d, did in enumerate(ids):
            for first in range(0, files, 100):  # small requests: the emulator cuts big forms
                icat.create([{"Datafile": {
                    "name": f"file_{f:05d}.dat", "dataset": {"id": did},
                    "location": f"{inv}/{did}/{f}", "fileSize": size_of(d, f),
                    "checksum": f"{d * files + f:x}",
                    "datafileModTime": "2024-05-01T10:00:00.000+00:00"}}
                    for f in range(first, min(first + 100, files))])
    finally:
        icat.close()


def size_of(dataset: int, file: int) -> int:
    return (dataset * 7919 + file * 104729) % (1 << 20)


def local_tree(root: Path, datasets: int, files: int) -> None:
    base = root / "BENCH" / "BIG" / "1"
    for d in range(datasets):
        ds = base / f"dataset_{d:03d}"
        ds.mkdir(parents=True)
        for f in range(files):
            with open(ds / f"file_{f:05d}.dat", "wb") as out:
                out.truncate(size_of(d, f))


def ls_lR(path: Path) -> tuple[float, int]:
    """Run ``ls -lR`` to /dev/null-ish; return (seconds, lines of output)."""
    start = time.perf_counter()
    done = subprocess.run(["ls", "-lR", str(path)], capture_output=True, check=True)
    seconds = time.perf_counter() - start
    return seconds, done.stdout.count(b"\n")


def icat_queries(emu: EmulatorProcess, session: str, page: int) -> list[str]:
    """The URLs of every query (page) the catalogue makes for the whole tree.

    The keyset pages are found by running the queries once with ICATClient.
    """
    from urllib.parse import urlencode

    icat = ICATClient(emu.icat_url, sessionId=session)
    queries: list[str] = []

    def paged(template: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        after = 0
        while True:
            query = template.format(after=after, count=page)
            queries.append(query)
            got = icat.search(query)
            rows.extend(got)
            if len(got) < page:
                return rows
            after = got[-1][0]

    try:
        facilities = paged("SELECT f.id, f.name, f.fullName, f.description, f.modTime "
                           "FROM Facility f WHERE f.id > {after} ORDER BY f.id LIMIT 0, {count}")
        for fac in facilities:
            investigations = paged(
                "SELECT inv.id, inv.name, inv.visitId, inv.title, inv.doi, inv.modTime "
                f"FROM Investigation inv WHERE inv.facility.id = {fac[0]} "
                "AND inv.id > {after} ORDER BY inv.id LIMIT 0, {count}")
            for inv in investigations:
                datasets = paged(
                    "SELECT ds.id, ds.name, ds.description, ds.doi, ds.location, ds.modTime "
                    f"FROM Dataset ds WHERE ds.investigation.id = {inv[0]} "
                    "AND ds.id > {after} ORDER BY ds.id LIMIT 0, {count}")
                for ds in datasets:
                    paged(
                        "SELECT df.id, df.name, df.fileSize, df.modTime, df.datafileModTime, "
                        "df.datafileCreateTime, df.checksum, df.location, df.description, "
                        f"df.doi FROM Datafile df WHERE df.dataset.id = {ds[0]} "
                        "AND df.location IS NOT NULL AND df.id > {after} ORDER BY df.id "
                        "LIMIT 0, {count}")
    finally:
        icat.close()
    return [f"{emu.icat_url}/entityManager?" + urlencode({"sessionId": session, "query": q})
            for q in queries]


def curl_queries(urls: list[str], work: Path) -> float:
    """Fetch every URL with one curl process (keep-alive); return seconds."""
    config = work / "curl.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for u in urls:
            f.write(f'url = "{u}"\noutput = "/dev/null"\n')
    start = time.perf_counter()
    subprocess.run(["curl", "-s", "-S", "-f", "-K", str(config)], check=True)
    return time.perf_counter() - start


def requests_by_prefix(counters: dict[str, Any], prefix: str) -> int:
    return sum(c.get("requests", 0) for name, c in counters.items() if name.startswith(prefix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=100)
    parser.add_argument("--files", type=int, default=100, help="datafiles per dataset")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=1000,
                        help="page size of the ICAT baseline (the daemon's default is 1000)")
    args = parser.parse_args()

    rc = bk.enter_private_namespace(__file__, sys.argv[1:])
    if rc is not None:
        return rc

    work = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    mounts: list[Mounted] = []
    emu = start_emulator(work / "emulator", demo=False)
    try:
        t0 = time.perf_counter()
        populate(emu, args.datasets, args.files)
        total_files = args.datasets * args.files
        print(f"populated {total_files} datafiles in {args.datasets} datasets "
              f"in {time.perf_counter() - t0:.1f} s")
        directories = 4 + args.datasets  # root, facility, name, visit, datasets

        cold, warm, cold_icat, cold_ids = [], [], [], []
        for i in range(args.repeat):
            m = start_mount(work / f"mount{i}", emu, register=mounts.append)
            emu.reset_counters()
            seconds, lines = ls_lR(m.path)
            counters = emu.counters()
            cold.append(seconds)
            cold_icat.append(requests_by_prefix(counters, "icat/"))
            cold_ids.append(requests_by_prefix(counters, "ids/"))
            expected_lines = total_files + 2 * directories + args.datasets + 3
            if lines < total_files:
                print(f"ls -lR printed {lines} lines, expected about {expected_lines}",
                      file=sys.stderr)
                return 1
            emu.reset_counters()
            warm.append(ls_lR(m.path)[0])
            if requests_by_prefix(emu.counters(), "icat/"):
                print("warm ls -lR asked ICAT", file=sys.stderr)
            teardown_mount(m)
            mounts.remove(m)

        session = bk.login(emu, "alice")
        urls = icat_queries(emu, session, args.page_size)
        baseline_icat = [curl_queries(urls, work) for _ in range(args.repeat)]

        local = work / "local"
        local_tree(local, args.datasets, args.files)
        subprocess.run(["ls", "-lR", str(local)], capture_output=True, check=True)  # warm up
        baseline_local = [ls_lR(local)[0] for _ in range(args.repeat)]

        med = statistics.median
        print(f"\nls -lR over {total_files} datafiles in {args.datasets} datasets "
              f"({directories} directories), medians of {args.repeat}:")
        print(f"  mount, cold          {med(cold):8.3f} s   ICAT requests {max(cold_icat)}, "
              f"IDS requests {max(cold_ids)}")
        print(f"  mount, warm          {med(warm):8.3f} s")
        print(f"  baseline ICAT (curl) {med(baseline_icat):8.3f} s   ({len(urls)} queries)")
        print(f"  baseline local disk  {med(baseline_local):8.3f} s")
        print(f"  ratio cold / ICAT baseline  {med(cold) / med(baseline_icat):6.2f}")
        print(f"  ratio cold / local          {med(cold) / med(baseline_local):6.2f}")
        print(f"  ratio warm / local          {med(warm) / med(baseline_local):6.2f}")
        limit = len(urls) + 3  # one query per listing page + properties (+ login, probe)
        print(f"  ICAT requests allowed: {limit} ({len(urls)} listing pages + 3)")
        if max(cold_icat) > limit or max(cold_ids) > 0:
            print(f"FAIL: more than {limit} ICAT requests or some IDS request", file=sys.stderr)
            return 1
        return 0
    finally:
        for m in mounts:
            teardown_mount(m)
        emu.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
