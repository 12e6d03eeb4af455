"""Shared parts of the benchmark scripts in ``tests/bench/``.

The scripts are standalone programs run on demand (never by pytest). Each one
measures idsfs against a baseline in the same run and prints ratios; this
module gives them one way to:

* run as root in a private mount namespace (:func:`enter_private_namespace`),
  so that no mount outlives the script;
* start the emulator in a child process and mounts of it
  (:func:`start_emulator`, :func:`start_mount`, from the mount-test harness);
* create the ICAT objects a benchmark needs (:func:`make_investigation`,
  :func:`make_dataset`) and files to store (:func:`make_source`);
* run the baselines with ``curl`` without putting a session id in ``argv``
  (:func:`curl_get`, :func:`curl_put`) and ``dd`` (:func:`dd`);
* account for the machine: CPU seconds of processes (:func:`cpu_seconds`),
  CPU seconds used by *other* processes while something was measured
  (:class:`Measure`), waiting for a quiet machine (:func:`wait_quiet`) and the
  load average (:func:`load_line`);
* print medians with their spread (:class:`Series`) and ratios.

A benchmark is only worth its numbers on a quiet machine: every measurement
records the CPU time that other processes used meanwhile (``foreign``), and
the scripts print it, so that a disturbed run can be recognised (and, with
``--quiet-wait``, they wait for the machine to be idle before each
measurement).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

__all__ = [
    "MB",
    "USERS",
    "EmulatorProcess",
    "Measure",
    "MiB",
    "Mounted",
    "Series",
    "add_mount_bench_options",
    "busy_seconds",
    "cpu_seconds",
    "curl_get",
    "curl_put",
    "dd",
    "enter_private_namespace",
    "load_line",
    "make_dataset",
    "make_investigation",
    "make_source",
    "median_ratio",
    "quiet_waiter",
    "start_emulator",
    "start_mount",
    "teardown_mount",
    "thread_cpu",
    "thread_cpu_delta",
    "wait_quiet",
]

MB = 1_000_000
MiB = 1 << 20

_NS_FLAG = "IDSFS_BENCH_IN_NAMESPACE"
_TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- process set-up


def enter_private_namespace(script: str, argv: Sequence[str]) -> int | None:
    """Re-run ``script`` as root inside ``unshare --mount --propagation private``.

    Returns the child's exit status when this process started it (the caller
    returns it), 2 when the machine cannot mount (not root, no ``/dev/fuse``),
    or ``None`` when already inside the namespace (go on).
    """
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("needs root and /dev/fuse", file=sys.stderr)
        return 2
    if os.environ.get(_NS_FLAG) == "1":
        return None
    env = dict(os.environ, **{_NS_FLAG: "1"})
    return subprocess.call(["unshare", "--mount", "--propagation", "private",
                            sys.executable, script, *argv], env=env)


# ----------------------------------------------------------------------------- CPU and load


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of ``pid``: ``{tid: (name, seconds)}``."""
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8",
                      errors="replace") as f:
                text = f.read()
        except FileNotFoundError:  # ended meanwhile
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def thread_cpu_delta(before: dict[int, tuple[str, float]],
                     after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two :func:`thread_cpu` snapshots, summed by thread name.

    Threads that ended in between are missing (compare with the process total).
    """
    out: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        used = seconds - before.get(tid, (name, 0.0))[1]
        if used > 0:
            out[name] = out.get(name, 0.0) + used
    return out


def busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
    return (user + nice + system + irq + softirq) / _TICK


def load_line() -> str:
    """The load average as ``load 0.12 0.30 0.41`` (1, 5, 15 minutes)."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_quiet(max_cores: float = 0.1, window: float = 1.0, timeout: float = 600.0) -> float:
    """Wait until the machine used less than ``max_cores`` cores over ``window`` seconds.

    Returns the seconds waited (``timeout`` when it never became quiet; the
    caller goes on and the measurement's ``foreign`` figure shows it).
    """
    start = time.monotonic()
    while True:
        before = busy_seconds()
        time.sleep(window)
        if (busy_seconds() - before) / window < max_cores:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return timeout


def add_mount_bench_options(parser: argparse.ArgumentParser, mount_option_help: str) -> None:
    """The options every mount benchmark has: ``--repeat``, ``--mount-option``, ``--quiet-wait``."""
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mount-option", action="append", default=[], help=mount_option_help)
    parser.add_argument("--quiet-wait", action="store_true",
                        help="wait for an idle machine before each measurement")


def quiet_waiter(quiet_wait: bool) -> Callable[[], float]:
    """:func:`wait_quiet` when ``--quiet-wait`` was given, else a function that waits not."""
    return wait_quiet if quiet_wait else (lambda: 0.0)


@dataclass
class Measure:
    """Wall time and CPU of one measured operation (see :meth:`run`).

    Attributes:
        seconds: wall-clock time.
        cpu: CPU seconds of each watched process (by the names given).
        child_cpu: CPU seconds of the child commands run by :meth:`command`.
        foreign: CPU seconds that every other process (and the kernel's
            threads) used meanwhile: what disturbed the measurement.
        load: the 1-minute load average when it started.
    """

    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    child_cpu: float = 0.0
    foreign: float = 0.0
    load: float = 0.0

    @classmethod
    @contextmanager
    def run(cls, watch: dict[str, int] | None = None) -> Iterator[Measure]:
        """Measure the body of the ``with`` block; ``watch`` maps names to pids.

        The CPU of this process and of the children it waited for in the block
        (``resource.RUSAGE_CHILDREN``) counts as ours, not as foreign.
        """
        import resource

        watch = dict(watch or {})
        m = cls(load=os.getloadavg()[0])
        own0 = resource.getrusage(resource.RUSAGE_SELF)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = {name: cpu_seconds(pid) for name, pid in watch.items()}
        busy0 = busy_seconds()
        t0 = time.perf_counter()
        yield m
        m.seconds = time.perf_counter() - t0
        busy = busy_seconds() - busy0
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m.cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in watch.items()}
        own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
        m.child_cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
        m.foreign = max(0.0, busy - own - m.child_cpu - sum(m.cpu.values()))


# ----------------------------------------------------------------------------- statistics


class Series:
    """Repeated measurements of one quantity: median and spread."""

    def __init__(self, values: Iterable[float] = ()) -> None:
        self.values = list(values)

    def add(self, value: float) -> None:
        """Add one measurement."""
        self.values.append(value)

    @property
    def median(self) -> float:
        """The median (``nan`` when empty)."""
        return statistics.median(self.values) if self.values else float("nan")

    def fmt(self, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
        """``median unit [min-max]`` with the values divided by ``scale``."""
        if not self.values:
            return "-"
        lo, hi = min(self.values) / scale, max(self.values) / scale
        text = f"{self.median / scale:.{digits}f}{unit}"
        if len(self.values) > 1:
            text += f" [{lo:.{digits}f}-{hi:.{digits}f}]"
        return text


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Series:
    """Ratios of measurements taken in pairs (the same repeat), as a Series."""
    return Series(a / b for a, b in zip(numerators, denominators, strict=True) if b)


# ----------------------------------------------------------------------------- data and catalogue


def make_source(path: Path, size: int, block: int = 16 * MiB) -> tuple[str, int]:
    """Write ``size`` bytes of random data to ``path``; return (SHA-256 hex, CRC32).

    One random block is repeated with its first 8 bytes replaced by the block
    number, so that misplaced blocks show in the checksum.
    """
    pattern = bytearray(os.urandom(block))
    digest = hashlib.sha256()
    crc = 0
    with open(path, "wb") as f:
        index = 0
        left = size
        while left:
            pattern[:8] = index.to_bytes(8, "big")
            piece = memoryview(pattern)[: min(left, block)]
            f.write(piece)
            digest.update(piece)
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
            index += 1
    return digest.hexdigest(), crc & 0xFFFFFFFF


@dataclass(frozen=True)
class Investigation:
    """Ids of what :func:`make_investigation` created."""

    facility: int
    investigation: int
    datafile_format: int
    dataset_type: int


def make_investigation(icat: Any, name: str, *, facility: str = "BENCH",
                       member: str = "alice", format_name: str = "binary") -> Investigation:
    """As ICAT root (``icat`` logged in): a facility with a datafile format, an
    investigation ``name`` (visit ``1``) with ``member`` as its PI, and a dataset type."""
    fac = icat.create({"Facility": {"name": facility}})
    fmt = icat.create({"DatafileFormat": {"name": format_name, "version": "1",
                                          "facility": {"id": fac}}})
    itype = icat.create({"InvestigationType": {"name": "t", "facility": {"id": fac}}})
    dtype = icat.create({"DatasetType": {"name": "raw", "facility": {"id": fac}}})
    icat.create({"DatasetType": {"name": "processed", "facility": {"id": fac}}})
    user = icat.create({"User": {"name": f"simple/{member}"}})
    inv = icat.create({"Investigation": {"name": name, "visitId": "1", "title": name,
                                         "facility": {"id": fac}, "type": {"id": itype}}})
    icat.create({"InvestigationUser": {"role": "PI", "user": {"id": user},
                                       "investigation": {"id": inv}}})
    return Investigation(fac, inv, fmt, dtype)


def make_dataset(icat: Any, where: Investigation, name: str, *, complete: bool = False) -> int:
    """A dataset ``name`` in the investigation of ``where``; returns its id."""
    return int(icat.create({"Dataset": {"name": name, "complete": complete,
                                        "investigation": {"id": where.investigation},
                                        "type": {"id": where.dataset_type}}}))


def root_icat(emu: EmulatorProcess) -> Any:
    """An ICATClient of the emulator logged in as ICAT root (close it when done)."""
    from idsfs.icat import ICATClient

    icat = ICATClient(emu.icat_url)
    icat.login("simple", {"username": "root", "password": USERS["root"]})
    return icat


def login(emu: EmulatorProcess, user: str = "alice") -> str:
    """A session id of ``user`` (the session stays open)."""
    from idsfs.icat import ICATClient

    icat = ICATClient(emu.icat_url)
    try:
        return str(icat.login("simple", {"username": user, "password": USERS[user]}))
    finally:
        icat.close()


# ----------------------------------------------------------------------------- commands


@contextmanager
def _curl_config(lines: Sequence[str]) -> Iterator[str]:
    """A private curl config file (``-K``): URLs with session ids stay off ``argv``."""
    fd, name = tempfile.mkstemp(suffix=".curl")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        yield name
    finally:
        os.unlink(name)


def curl_get(url: str) -> tuple[float, float, int]:
    """``curl`` GET of ``url`` to /dev/null: (seconds, seconds to the first byte, bytes)."""
    with _curl_config([f'url = "{url}"', 'output = "/dev/null"']) as config:
        start = time.perf_counter()
        done = subprocess.run(["curl", "-s", "-S", "-f", "-K", config, "-w",
                               "%{time_starttransfer} %{size_download}"],
                              check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    ttfb, size = done.stdout.split()
    return seconds, float(ttfb), int(size)


def curl_put(url: str, source: Path) -> tuple[float, str]:
    """``curl -T source`` (PUT with Content-Length) to ``url``: (seconds, answer body)."""
    with _curl_config([f'url = "{url}"', f'upload-file = "{source}"',
                       'header = "Content-Type: application/octet-stream"']) as config:
        start = time.perf_counter()
        done = subprocess.run(["curl", "-s", "-S", "-f", "-K", config],
                              check=True, capture_output=True, text=True)
        return time.perf_counter() - start, done.stdout


def dd(path: Path, block: str = "1M") -> tuple[float, int]:
    """``dd if=path of=/dev/null bs=block``: (seconds, bytes read)."""
    start = time.perf_counter()
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={block}"], check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    copied = [line for line in done.stderr.splitlines() if "bytes" in line and "copied" in line]
    return seconds, int(copied[-1].split()[0]) if copied else path.stat().st_size


def read_into_page_cache(path: Path) -> None:
    """Read ``path`` once so that every contender finds it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        while f.readinto(buf):
            pass


def machine_line() -> str:
    """CPUs, kernel and Python of this machine, for the report's first line."""
    return (f"{os.cpu_count()} CPUs, Linux {os.uname().release}, Python "
            f"{sys.version.split()[0]}, {load_line()}")
