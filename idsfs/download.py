"""Resumable downloads and uploads with progress reporting.

:func:`download` copies a ``getData`` stream to a file. When the connection
drops or stalls it asks again from the byte it reached (``offset``, i.e.
``Range: bytes=N-``), up to ``retries`` times in a row without progress, and
finally checks the byte count against the expected size (ICAT ``fileSize``
passed by the caller, else the announced ``Content-Length``). The data goes
to ``<dest>.part`` and is renamed to ``dest`` only when complete, so a
failed download never leaves a truncated file under the final name; after a
transport failure the ``.part`` file stays and ``resume=True`` continues it.

Resuming at an offset is reliable only for an unzipped single datafile (a
zip is generated anew per request and real servers stamp entry times, see
``ids-protocol.md`` §6.3), so zipped downloads restart from byte 0 instead.

:func:`upload` wraps ``IDSClient.put`` with a progress callback and fills
the file times from the local file like python-icat's ``Client.putData``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from idsfs.errors import IDSError, IDSResponseError, TransportError
from idsfs.ids import DataSelection, DataStream, IDSClient

__all__ = ["DownloadResult", "ProgressCallback", "download", "download_to", "upload"]

log = logging.getLogger("idsfs.download")

#: ``progress(bytes_done, bytes_total_or_None)``
ProgressCallback = Callable[[int, int | None], None]

PART_SUFFIX = ".part"


@dataclass(frozen=True)
class DownloadResult:
    """Outcome of :func:`download`: final path, byte count, number of resumes,
    and the file name the server suggested (``Content-Disposition``).
    Constructing one never raises.
    """

    path: Path | None
    size: int
    resumes: int
    filename: str | None


def filename_from_headers(stream: DataStream) -> str | None:
    """Return the file name of ``Content-Disposition`` (verbatim), or None. Never raises."""
    value = stream.getheader("Content-Disposition")
    if not value:
        return None
    marker = 'filename="'
    start = value.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = value.rfind('"')
    if end < start:
        return None
    return value[start:end]


def is_zipped(
    client: IDSClient, selection: DataSelection | str, zipFlag: bool = False
) -> bool:
    """Tell whether getData of ``selection`` returns a zip (the mustZip rule).

    A DataSelection is unzipped only when it holds exactly one datafile id
    and ``zipFlag`` is false. For a preparedId the server's record is asked
    (``getDatafileIds``); if it cannot tell, the answer is True (safe side).

    Never raises: when the server cannot tell, the answer is True.
    """
    if isinstance(selection, DataSelection):
        return zipFlag or not (len(selection) == 1 and len(selection.dfIds) == 1)
    try:
        response = client._call(
            "GET", "getDatafileIds", {"preparedId": selection}, idempotent=True
        )
        doc = response.json()
        return bool(doc.get("zip", True)) if isinstance(doc, dict) else True
    except (IDSError, TransportError, ValueError):
        return True


def download_to(
    client: IDSClient,
    selection: DataSelection | str,
    out: BinaryIO,
    *,
    start: int = 0,
    expected_size: int | None = None,
    progress: ProgressCallback | None = None,
    compressFlag: bool = False,
    zipFlag: bool = False,
    retries: int = 5,
    resumable: bool | None = None,
    backoff: float = 0.5,
) -> tuple[int, int, str | None]:
    """Write the data of ``selection`` to the open binary file ``out``.

    ``out`` must be positioned at byte ``start`` (the bytes before are
    already there). Returns ``(total_bytes, resumes, server_filename)``.
    When ``resumable`` is None it is derived with :func:`is_zipped`; a
    non-resumable stream that breaks is fetched again from 0 (``out`` must
    then be seekable). Raises the last TransportError after ``retries``
    failed attempts in a row, :class:`~idsfs.errors.IDSResponseError` when
    the byte count differs from ``expected_size`` / ``Content-Length``, and
    any ServerError of the IDS unchanged (DataNotOnline included: whether to
    wait for a restore is the caller's decision).
    """
    if resumable is None:
        resumable = not is_zipped(client, selection, zipFlag)
    if start and not resumable:
        raise ValueError("cannot continue a zipped download at an offset")
    done = start
    total = expected_size
    resumes = 0
    failures = 0
    filename: str | None = None
    delay = backoff

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    while True:
        offset = done if resumable else 0
        if not resumable and done:
            out.seek(0)
            out.truncate()
            done = 0
        try:
            with client.getData(
                selection, compressFlag=compressFlag, zipFlag=zipFlag, offset=offset
            ) as stream:
                if filename is None:
                    filename = filename_from_headers(stream)
                if total is None and stream.content_length is not None:
                    total = offset + stream.content_length
                if progress is not None:
                    progress(done, total)

                before = done
                try:
                    stream.copyto(out, step)
                except TransportError:
                    if done > before:
                        failures = 0
                        delay = backoff
                    raise
        except TransportError as exc:
            failures += 1
            if failures > retries:
                raise
            resumes += 1
            log.info(
                "download interrupted at byte %d (%s); %s in %.1f s (%d/%d)",
                done, exc, "resuming" if resumable else "restarting", delay, failures, retries,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        break
    if total is not None and done != total:
        raise IDSResponseError(f"download has {done} bytes, expected {total}")
    return done, resumes, filename


def download(
    client: IDSClient,
    selection: DataSelection | str,
    dest: str | os.PathLike[str],
    *,
    expected_size: int | None = None,
    progress: ProgressCallback | None = None,
    compressFlag: bool = False,
    zipFlag: bool = False,
    retries: int = 5,
    resume: bool = False,
    overwrite: bool = False,
    backoff: float = 0.5,
) -> DownloadResult:
    """Download ``selection`` into the file ``dest`` (see the module docstring).

    ``expected_size`` (e.g. the ICAT ``fileSize`` of a single datafile) is
    checked at the end. With ``resume`` an existing ``<dest>.part`` is
    continued (unzipped downloads only). Raises ``FileExistsError`` if
    ``dest`` exists and ``overwrite`` is false, plus the errors of
    :func:`download_to`. On a byte-count mismatch the ``.part`` file is
    removed; on a transport failure it is kept for a later ``resume``.
    """
    path = Path(dest)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (use overwrite=True to replace it)")
    part = path.with_name(path.name + PART_SUFFIX)
    resumable = not is_zipped(client, selection, zipFlag)
    start = 0
    mode = "wb"
    if resume and part.exists() and resumable:
        start = part.stat().st_size
        mode = "r+b"
    with open(part, mode) as out:
        if start:
            out.seek(start)
        try:
            size, resumes, filename = download_to(
                client,
                selection,
                out,
                start=start,
                expected_size=expected_size,
                progress=progress,
                compressFlag=compressFlag,
                zipFlag=zipFlag,
                retries=retries,
                resumable=resumable,
                backoff=backoff,
            )
        except TransportError:
            raise  # keep the .part file for resume=True (also for TruncatedStreamError)
        except IDSResponseError:
            out.close()
            part.unlink(missing_ok=True)
            raise
        except IDSError:
            if not start:
                out.close()
                part.unlink(missing_ok=True)
            raise
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, path)
    return DownloadResult(path, size, resumes, filename)


class _ProgressReader:
    """Binary reader that reports every block read to a progress callback."""

    def __init__(self, raw: Any, total: int | None, progress: ProgressCallback | None) -> None:
        self.raw = raw
        self.total = total
        self.progress = progress
        self.done = 0

    def fileno(self) -> int:
        return int(self.raw.fileno())

    def tell(self) -> int:
        return int(self.raw.tell())

    def readinto(self, b: Any) -> int:
        if hasattr(self.raw, "readinto"):
            n = self.raw.readinto(b)
        else:
            data = self.raw.read(len(b))
            n = len(data)
            b[:n] = data
        n = n or 0
        self.done += n
        if self.progress is not None and n:
            self.progress(self.done, self.total)
        return n


def upload(
    client: IDSClient,
    source: str | os.PathLike[str] | BinaryIO,
    name: str | None,
    datasetId: int,
    datafileFormatId: int,
    *,
    description: str | None = None,
    doi: str | None = None,
    datafileCreateTime: int | None = None,
    datafileModTime: int | None = None,
    progress: ProgressCallback | None = None,
) -> int:
    """Upload a file (path or open binary file) with ``put``; return the id.

    ``name`` defaults to the file's base name. For a path, ``datafileModTime``
    defaults to its modification time and ``datafileCreateTime`` to the
    modification time (both in epoch milliseconds, as python-icat does).
    ``progress(bytes_sent, total)`` is called per block. Errors are those of
    :meth:`IDSClient.put` plus ``OSError`` for an unreadable file.

    Raises ``ValueError`` when ``name`` is missing for an open file.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        st = path.stat()
        if name is None:
            name = path.name
        if datafileModTime is None:
            datafileModTime = int(st.st_mtime * 1000)
        if datafileCreateTime is None:
            datafileCreateTime = datafileModTime
        with open(path, "rb", buffering=0) as f:
            reader = _ProgressReader(f, st.st_size, progress)
            return client.put(reader, name, datasetId, datafileFormatId, description, doi,
                              datafileCreateTime, datafileModTime)
    if name is None:
        raise ValueError("name is required when uploading from an open file")
    total: int | None = None
    try:
        total = os.fstat(source.fileno()).st_size - source.tell()
    except (AttributeError, OSError, ValueError):
        total = None
    reader = _ProgressReader(source, total, progress)
    return client.put(reader, name, datasetId, datafileFormatId, description, doi,
                      datafileCreateTime, datafileModTime)

