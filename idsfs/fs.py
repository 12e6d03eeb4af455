"""The FUSE file system: :class:`Operations` for pyfuse3, serving the catalogue's tree.

The tree, its attributes and extended attributes come from
:class:`idsfs.catalog.Catalog`; file contents from ``transfer``
(:mod:`idsfs.transfer`: ``open`` -> reader, ``reader.read``, ``reader.close``,
``status``). ``docs/semantics.md`` describes what users see.

Inodes
------
Every node of the tree has one inode number for the mount's lifetime: objects
with an ICAT id get ``id * 8 + tag`` (tag 1 facility, 2 investigation, 3
dataset, 4 datafile), nodes without one (investigation-name directories,
datafile path prefixes) get numbers from a counter that remembers each key
(tag 5). The inode table holds the nodes the kernel knows, with their lookup
counts: ``lookup`` and every entry ``readdir`` reports add one, ``forget``
subtracts; a node whose count drops to zero (and that no open file uses) leaves
the table. The root is never forgotten.

Directories
-----------
``opendir`` takes a snapshot of the listing; ``readdir`` serves that snapshot
for the life of the handle, so offsets stay valid while the catalogue changes.
``.`` and ``..`` come first (offsets 1 and 2) and do not count as lookups. The
kernel asks for attributes with every entry (readdirplus); the link count of a
directory (2 + subdirectories) needs that directory's own listing, so entries
whose listing is not cached get an attribute timeout of 0 and the kernel asks
``getattr`` when someone really looks at them.

Writing
-------
With an :class:`~idsfs.upload.Uploader` and ``read_only=False`` the tree can be
changed (docs/semantics.md, "Writing", is the user's view):

* ``create`` in a dataset directory or below it makes an upload whose spool
  file takes the writes; the new file is a *local entry* of the catalogue
  (``SPOOL`` node, inode from the counter, attributes from the upload, entry and
  attribute timeouts 0) until it is a datafile. ``read``, ``getattr`` and
  truncation (``setattr`` size) of it use the spool. Handles on spool files
  are opened with ``direct_io`` (unless ``direct_write`` is off): each
  ``write`` arrives here straight from the writer's buffer, without a copy into
  the kernel's page cache first (``cp`` needs a third of the CPU; on two cores
  a copy into the mount got about a quarter faster),
  reads of them come here too, and the kernel refuses ``mmap`` with
  ``MAP_SHARED`` of them (``ENODEV``).
* **When the upload happens.** ``flush`` (every ``close`` of every descriptor)
  uploads when the file was written or truncated since it was last stored and
  no other handle opened it for writing; ``close`` then returns 0 only once IDS
  has the file (CRC32 checked), else ``EIO``. A file created but never written
  (``touch``, a shell's ``> file`` before the command writes) is uploaded when
  its last handle is released, right after the ``close``, in the background
  (its failure cannot reach a ``close``; it shows in ``user.idsfs.upload`` and
  ``idsfs status``). A file written again after it was stored (through another
  descriptor) is stored again at its next ``flush``, replacing this mount's own
  previous datafile (the uploader's replace steps).
* Once stored the datafile enters the cached listings at once (one ICAT query
  for its record); the local entry goes when the last handle is released.
* ``unlink`` deletes through IDS; ``mkdir`` in a visit creates a Dataset, inside
  a dataset a local directory; ``rmdir`` of an empty dataset deletes it;
  ``rename`` of a datafile within its dataset changes its ICAT name, of a
  dataset within its visit the dataset's name; other moves answer ``EXDEV`` (so
  ``mv`` copies and deletes) or ``EPERM``.
* Opening an existing datafile for writing answers ``EACCES`` unless
  ``replace`` is set; then the open file is a new upload that replaces the
  datafile when stored (never deleting it before the new one is stored).

Errors
------
:data:`ERRNO_TABLE` is the one mapping from exceptions to errno values, used by
:func:`errno_for`. Every handler runs inside :func:`_handler`: it lets
``pyfuse3.FUSEError`` through and turns any other exception into one, so
nothing else escapes into pyfuse3 (which would end the mount). Exceptions not in
the table are logged with their traceback and become ``EIO``.

Everything here runs on the trio thread; blocking work happens below, through
the :class:`~idsfs.aio.ThreadBridge`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyfuse3
import trio

from idsfs import errors, naming
from idsfs.blockcache import DEFAULT_BLOCK_SIZE, BlockLengthError
from idsfs.catalog import ROOT_KEY, Catalog, DatafileRecord, Kind, Node, NodeKey
from idsfs.upload import DONE, Upload, Uploader

__all__ = [
    "DEFAULT_DATASET_TYPE",
    "ERRNO_TABLE",
    "XATTR_STATUS",
    "XATTR_UPLOAD",
    "Operations",
    "errno_for",
]

log = logging.getLogger("idsfs.fs")

# ----------------------------------------------------------------------------- errno

#: Exception class -> errno, first match wins (``None``: the exception's own
#: ``errno`` attribute). Anything not listed becomes ``EIO``. docs/semantics.md
#: shows the same table.
ERRNO_TABLE: tuple[tuple[type[BaseException], int | None], ...] = (
    (naming.UnstorableNameError, None),
    (errors.ICATSessionError, errno.EACCES),
    (errors.ICATPrivilegesError, errno.EACCES),
    (errors.IDSInsufficientPrivilegesError, errno.EACCES),
    (errors.ICATNoObjectError, errno.ENOENT),
    (errors.IDSNotFoundError, errno.ENOENT),
    (errors.RestoreTimeoutError, errno.ENODATA),
    (errors.DataBusyError, errno.EBUSY),
    (errors.RestoreFailedError, errno.EIO),
    (errors.IncompleteDownloadError, errno.EIO),
    (errors.TransferError, None),
    (errors.UploadError, None),
    (errors.IDSDataNotOnlineError, errno.ENODATA),
    (errors.ICATObjectExistsError, errno.EEXIST),
    (errors.ICATParameterError, errno.EINVAL),
    (errors.ICATValidationError, errno.EINVAL),
    (errors.IDSBadRequestError, errno.EINVAL),
    (errors.IDSNotImplementedError, errno.EROFS),
    (errors.IDSInsufficientStorageError, errno.ENOSPC),
    (errors.TransportError, errno.EIO),
    (errors.IDSResponseError, errno.EIO),
    (BlockLengthError, errno.EIO),
    (errors.IdsfsError, errno.EIO),
)


def _known(exc: BaseException) -> tuple[bool, int]:
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            if code is None:
                own = getattr(exc, "errno", None)
                code = own if isinstance(own, int) and own > 0 else errno.EIO
            return True, code
    return False, errno.EIO


def errno_for(exc: BaseException) -> int:
    """Return the errno value :data:`ERRNO_TABLE` gives ``exc`` (``EIO`` if none).

    A ``pyfuse3.FUSEError`` gives its own errno. Never raises.
    """
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    return _known(exc)[1]


def _fuse_error(operation: str, exc: Exception) -> pyfuse3.FUSEError:
    """Log ``exc`` as befits it and return the FUSEError to raise instead."""
    known, code = _known(exc)
    if known and getattr(exc, "repeated", False):  # logged when it first happened
        log.debug("%s: %s again (%s)", operation, errno.errorcode.get(code, code), exc)
    elif not known:
        log.error("%s: unexpected %s, answering EIO", operation, type(exc).__name__,
                  exc_info=exc)
    elif code == errno.EIO:
        log.warning("%s: %s: %s", operation, type(exc).__name__, exc)
    elif code in (errno.ENODATA, errno.EBUSY) or isinstance(exc, naming.UnstorableNameError):
        # the archive's state, or why a name is refused: worth a line
        log.info("%s: %s (%s)", operation, errno.errorcode.get(code, code), exc)
    else:
        log.debug("%s: %s (%s)", operation, errno.errorcode.get(code, code), exc)
    return pyfuse3.FUSEError(code)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _handler(fn: F) -> F:
    """Wrap a request handler so that only ``pyfuse3.FUSEError`` leaves it."""
    operation = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise _fuse_error(operation, exc) from exc

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------- helpers

#: The dynamic extended attribute of files: ONLINE, ARCHIVED or RESTORING.
XATTR_STATUS = "user.ids.status"
#: The state of uploads: on a file written here, and on a dataset holding such files.
XATTR_UPLOAD = "user.idsfs.upload"
#: ``st_blksize`` of files being written (the preferred size of a write call).
WRITE_BLKSIZE = 8 << 20
#: DatasetType of datasets made with ``mkdir`` unless ``dataset_type`` says otherwise.
DEFAULT_DATASET_TYPE = "processed"

_TAGS = {Kind.FACILITY: 1, Kind.INVESTIGATION: 2, Kind.DATASET: 3, Kind.DATAFILE: 4}
_ALLOCATED_TAG = 5
_ID_LIMIT = 1 << 60
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
_WRITABLE_DIRS = (Kind.INVESTIGATION, Kind.DATASET, Kind.FOLDER)


class Reader(Protocol):
    """An open datafile of the read path.

    ``size``: the bytes reads stop at; ``keep_cache``: whether the kernel may
    keep the pages cached at an earlier open; ``release_delivered``: set by
    :meth:`Operations.open` when blocks the kernel was given need not stay in
    the block cache. A protocol: its methods say what they raise.
    """

    size: int
    keep_cache: bool
    release_delivered: bool

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """Read ``size`` bytes at ``offset`` (short only at end of file).

        Raises the read path's errors (:mod:`idsfs.errors`: ``TransferError``
        and its subclasses, IDS and transport errors; a spool file:
        ``SpoolError``), which :data:`ERRNO_TABLE` maps, and ``ValueError``
        when the reader is closed.
        """
        ...

    async def close(self) -> None:
        """Release what the reader holds. Never raises."""
        ...


class CacheLike(Protocol):
    """What :class:`Operations` needs of the block cache: its capacity in bytes.

    A protocol; :attr:`capacity` never raises.
    """

    @property
    def capacity(self) -> int:
        """The most bytes the cache holds. Never raises."""
        ...


class TransferLike(Protocol):
    """What :class:`Operations` needs of ``idsfs.transfer.Transfer``.

    A protocol: its members say what they raise.
    """

    @property
    def cache(self) -> CacheLike:
        """The block cache the reads go through. Never raises."""
        ...

    async def open(self, datafile: DatafileRecord) -> Reader:
        """Open a datafile for reading (no IDS call).

        Raises ``ValueError`` for a record without an integer id and
        ``TransferError`` when the transfer was closed.
        """
        ...

    async def status(self, datafile: DatafileRecord) -> str:
        """``ONLINE``, ``ARCHIVED`` or ``RESTORING``.

        Raises IDS and transport errors (:mod:`idsfs.errors`) when the status
        cannot be asked.
        """
        ...


class _Inode:
    """One inode the kernel knows."""

    __slots__ = ("ino", "lookups", "node", "opens", "version")

    def __init__(self, ino: int, node: Node) -> None:
        self.ino = ino
        self.node = node
        self.lookups = 0
        self.opens = 0
        # datafile version at the last successful open (for keep_cache)
        self.version: tuple[int, int] | None = None


@dataclass(slots=True)
class _DirHandle:
    ino: int
    node: Node
    parent_ino: int
    entries: tuple[Node, ...]
    subdirs: int


@dataclass(slots=True)
class _FileHandle:
    ino: int
    reader: Reader | None
    upload: Upload | None = None
    write: bool = False


class _SpoolReader:
    """Reads of a file that is (still) a spool file."""

    keep_cache = False

    def __init__(self, upload: Upload, uploader: Uploader) -> None:
        self.upload = upload
        self.uploader = uploader

    async def read(self, offset: int, size: int) -> bytes:
        return await self.uploader.read(self.upload, offset, size)

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------- operations


class Operations(pyfuse3.Operations):
    """The idsfs file system.

    Args:
        catalog: the tree's listings.
        transfer: the read path (``open``/``status``); ``None`` disables
            ``open`` of datafiles (``ENOSYS``) and ``user.ids.status``.
        uid: owner shown for every file (default: the daemon's uid).
        gid: group shown for every file (default: the daemon's gid).
        read_only: refuse every change with ``EROFS`` (also when there is no
            ``uploader``).
        block_size: ``st_blksize`` and ``f_bsize`` (the read path's block size).
        uploader: the write path (see the module docstring); its pending
            uploads are shown in the tree from the start.
        replace: let existing datafiles be opened for writing (and be the
            target of a rename); see "Writing".
        dataset_type: the DatasetType name of datasets made with ``mkdir``.
        notify_kernel: tell the kernel about entries that changed (only with
            a real mount: ``pyfuse3.invalidate_entry_async`` needs one).
        direct_write: open files being written (and spool files) with
            ``direct_io``: writes and reads of them go straight to the daemon,
            bypassing the kernel page cache (see "Writing").
        direct_read: open datafiles for reading with ``direct_io``: every read
            comes here (no kernel page cache, no ``keep_cache``, no shared mmap).

    Raises:
        ValueError: ``block_size`` is not positive.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        catalog: Catalog,
        transfer: TransferLike | None,
        *,
        uid: int | None = None,
        gid: int | None = None,
        read_only: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE,
        uploader: Uploader | None = None,
        replace: bool = False,
        dataset_type: str = DEFAULT_DATASET_TYPE,
        notify_kernel: bool = False,
        direct_write: bool = True,
        direct_read: bool = False,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size!r}")
        self._catalog = catalog
        self._transfer = transfer
        self._direct_write = direct_write
        self._direct_read = direct_read
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._read_only = read_only or uploader is None
        self._uploader = uploader
        self._replace = replace
        self._dataset_type = dataset_type
        self._notify_kernel = notify_kernel
        self._block_size = block_size
        self._ttl = catalog.metadata_ttl
        root = _Inode(pyfuse3.ROOT_INODE, catalog.root)
        root.lookups = 1  # never forgotten
        self._inodes: dict[int, _Inode] = {pyfuse3.ROOT_INODE: root}
        self._allocated: dict[NodeKey, int] = {}
        self._next_allocated = itertools.count(1)
        self._dirs: dict[int, _DirHandle] = {}
        self._files: dict[int, _FileHandle] = {}
        self._next_fh = itertools.count(1)
        # replacing uploads whose old bytes are fetched at their first change
        self._copy_from: dict[str, DatafileRecord] = {}
        self._copying: dict[str, trio.Event] = {}  # uploads whose old bytes are being copied
        # replacing uploads opened with O_TRUNC (to be stored even if never written)
        self._truncated: set[str] = set()
        if uploader is not None:
            uploader.on_landed = self._landed
            for up in list(uploader.uploads.values()):
                self._show_upload(up)

    # ------------------------------------------------------------------ inodes

    def ino_of(self, key: NodeKey) -> int:
        """The inode number of a node key (the same for the mount's lifetime).

        Never raises.
        """
        if key.kind is Kind.ROOT:
            return pyfuse3.ROOT_INODE
        tag = _TAGS.get(key.kind)
        if tag is not None and 0 < key.id < _ID_LIMIT:
            return (key.id << 3) | tag
        ino = self._allocated.get(key)
        if ino is None:
            ino = (next(self._next_allocated) << 3) | _ALLOCATED_TAG
            self._allocated[key] = ino
        return ino

    def lookup_count(self, ino: int) -> int:
        """The lookup count of an inode (0 if the table does not hold it). Never raises."""
        inode = self._inodes.get(ino)
        return 0 if inode is None else inode.lookups

    @property
    def inode_count(self) -> int:
        """How many inodes the table holds (the root included). Never raises."""
        return len(self._inodes)

    def _inode(self, ino: int) -> _Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            log.debug("request for unknown inode %d", ino)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _remember(self, node: Node) -> _Inode:
        """Put ``node`` in the table (or update it) and count one lookup."""
        ino = self.ino_of(node.key)
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = _Inode(ino, node)
        else:
            inode.node = node
        inode.lookups += 1
        return inode

    def _drop_if_unused(self, inode: _Inode) -> None:
        if inode.lookups <= 0 and inode.opens <= 0 and inode.ino != pyfuse3.ROOT_INODE:
            self._inodes.pop(inode.ino, None)

    async def _current(self, inode: _Inode) -> Node:
        """The node as the catalogue shows it now (its last known state if it is gone)."""
        fresh = await self._catalog.refresh(inode.node)
        if fresh is not None:
            inode.node = fresh
            return fresh
        return inode.node

    # ------------------------------------------------------------------ attributes

    def _mode(self, node: Node) -> int:
        writes = not self._read_only
        if node.is_dir:
            if writes and node.key.kind in _WRITABLE_DIRS:
                return stat.S_IFDIR | 0o755
            return stat.S_IFDIR | 0o555
        if writes and (node.key.kind is Kind.SPOOL or self._replace):
            return stat.S_IFREG | 0o644
        return stat.S_IFREG | 0o444

    def _attributes(self, node: Node, nlink: int | None) -> pyfuse3.EntryAttributes:
        """EntryAttributes of ``node``; ``nlink`` ``None`` means not known yet (timeout 0)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self.ino_of(node.key)
        attr.generation = 0
        attr.entry_timeout = self._ttl
        attr.attr_timeout = self._ttl if nlink is not None else 0
        attr.st_mode = self._mode(node)
        attr.st_nlink = nlink if nlink is not None else 1
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_rdev = 0
        size, mtime, ctime = node.size, node.mtime_ns, node.ctime_ns
        up = node.local
        blksize = self._block_size
        if up is not None:  # a file being written: what its spool says, asked every time
            size = up.size
            pending = self._copy_from.get(up.uid)
            if pending is not None:  # replacing, old bytes not fetched yet: still the old size
                size = pending.fileSize
            mtime = ctime = up.mod_ms * 1_000_000
            attr.entry_timeout = 0
            attr.attr_timeout = 0
            # big write(2) calls are cheaper here (the kernel checks security.capability
            # once per call): cp and others size their buffers by st_blksize
            blksize = max(blksize, WRITE_BLKSIZE)
        attr.st_size = size
        attr.st_blksize = blksize
        attr.st_blocks = (size + 511) // 512
        attr.st_mtime_ns = mtime
        attr.st_atime_ns = mtime
        attr.st_ctime_ns = ctime
        return attr

    def _dot_attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """Minimal attributes for ``.``/``..`` in readdir (the kernel uses only ino and type)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = stat.S_IFDIR | 0o555
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        return attr

    def _negative(self, timeout: float) -> pyfuse3.EntryAttributes:
        """A lookup miss the kernel may cache for ``timeout`` seconds."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        return attr

    async def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for a lookup result, counting the lookup."""
        nlink = self._catalog.cached_nlink(node.key)
        attr = self._attributes(node, nlink)
        self._remember(node)
        return attr

    # ------------------------------------------------------------------ tree

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        """Look ``name`` up in directory ``parent_inode`` (``.`` and ``..`` included).

        A name that is not there gives a negative entry, not an error. The
        kernel may keep either answer until the parent's listing expires.
        Raises ``pyfuse3.FUSEError`` only:
        ``ENOENT`` for an unknown inode (or a ``..`` whose directory is gone),
        ``ENOTDIR`` when the parent is not a directory; catalogue errors
        through :data:`ERRNO_TABLE`.
        """
        parent = self._inode(parent_inode)
        if not parent.node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return await self._entry(parent.node)
        if name == b"..":
            return await self._entry(await self._parent_node(parent.node))
        node = await self._catalog.lookup(parent.node.key, name)
        # the kernel keeps the answer no longer than the listing it came from
        # (else a name added meanwhile stays unseen for up to twice the TTL)
        left = self._catalog.time_left(parent.node.key)
        if node is None:
            return self._negative(left)
        attr = await self._entry(node)
        if attr.entry_timeout > left:
            attr.entry_timeout = left
            attr.attr_timeout = min(attr.attr_timeout, left)
        return attr

    async def _parent_node(self, node: Node) -> Node:
        key = node.parent
        known = self._inodes.get(self.ino_of(key))
        if known is not None:
            return known.node
        found = await self._catalog.resolve(key)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    @_handler
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        """Attributes of ``inode`` (from the parent's listing; fetched when expired).

        Raises ``pyfuse3.FUSEError`` only: ``ENOENT`` for an unknown inode;
        catalogue errors through :data:`ERRNO_TABLE`.
        """
        node = await self._current(self._inode(inode))
        nlink = await self._catalog.nlink(node.key)
        return self._attributes(node, nlink)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        """Open a directory: snapshot its current listing.

        Raises ``pyfuse3.FUSEError`` only: ``ENOENT`` for an unknown inode or a
        directory gone from the catalogue, ``ENOTDIR`` for a file; catalogue
        errors through :data:`ERRNO_TABLE`.
        """
        entry = self._inode(inode)
        node = entry.node
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        listing = await self._catalog.listing(node.key)
        if listing is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh = next(self._next_fh)
        self._dirs[fh] = _DirHandle(
            ino=inode,
            node=node,
            parent_ino=self.ino_of(node.parent),
            entries=listing.entries,
            subdirs=listing.subdirs,
        )
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the snapshot from offset ``start_id`` (0: ``.``, 1: ``..``, 2: first entry).

        Raises ``pyfuse3.FUSEError`` only: ``EBADF`` for an unknown handle
        (nothing else is expected: no catalogue call is made).
        """
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        pos = start_id
        if pos == 0:
            if not pyfuse3.readdir_reply(token, b".", self._dot_attributes(handle.ino), 1):
                return
            pos = 1
        if pos == 1:
            if not pyfuse3.readdir_reply(
                token, b"..", self._dot_attributes(handle.parent_ino), 2
            ):
                return
            pos = 2
        entries = handle.entries
        cached_nlink = self._catalog.cached_nlink
        for index in range(pos - 2, len(entries)):
            node = entries[index]
            attr = self._attributes(node, cached_nlink(node.key))
            if not pyfuse3.readdir_reply(token, node.name.encode(), attr, index + 3):
                return
            self._remember(node)

    @_handler
    async def releasedir(self, fh: int) -> None:
        """Forget a directory handle and its snapshot. Never raises."""
        self._dirs.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Lower lookup counts; nodes no longer known to the kernel leave the table.

        Never raises: an error is logged (the kernel expects no answer).
        """
        try:
            for ino, count in inode_list:
                inode = self._inodes.get(ino)
                if inode is None or ino == pyfuse3.ROOT_INODE:
                    continue
                inode.lookups -= count
                self._drop_if_unused(inode)
        except Exception:  # forget must never raise
            log.exception("forget failed")

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        """Sizes and counts of what has been listed so far; free space: the spool's.

        Raises ``pyfuse3.FUSEError`` only, through :data:`ERRNO_TABLE` (none is
        expected: the counters and the spool's ``statvfs`` do not fail).
        """
        usage = self._catalog.usage()
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._block_size
        data.f_frsize = 512
        free = 0
        if not self._read_only and self._uploader is not None:
            free = (await self._uploader.free_space())[0]
        data.f_blocks = (usage.bytes + 511) // 512 + free // 512
        data.f_bfree = free // 512
        data.f_bavail = free // 512
        data.f_files = usage.files + usage.directories
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = naming.NAME_MAX
        return data

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Check ``mode`` against the permission bits (used without ``default_permissions``).

        Returns False when denied (the kernel answers ``EACCES``). Raises
        ``pyfuse3.FUSEError`` only: ``ENOENT`` for an unknown inode, ``EROFS``
        when ``W_OK`` is asked on a read-only mount.
        """
        node = self._inode(inode).node
        if mode & os.W_OK and self._read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        bits = self._mode(node) & 0o777
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(bits & 0o111)
        if ctx.uid == self._uid:
            allowed = (bits >> 6) & 7
        elif ctx.gid == self._gid or self._gid in _groups(ctx.pid):
            allowed = (bits >> 3) & 7
        else:
            allowed = bits & 7
        return mode & 7 & ~allowed == 0

    # ------------------------------------------------------------------ xattrs

    def _static_xattrs(self, node: Node) -> dict[str, str]:
        """``node.xattrs()`` plus what a file being written has (ICAT name, dataset, id)."""
        up: Upload | None = node.local
        if up is None:
            return node.xattrs()
        out = {"user.ids.name": up.name, "user.ids.dataset.id": str(up.dataset_id)}
        if up.datafile_id is not None and up.temp_name is None:
            out["user.ids.id"] = str(up.datafile_id)
        return out

    def _dataset_uploads(self, dataset_id: int) -> list[Upload]:
        if self._uploader is None:
            return []
        return [up for up in self._uploader.uploads.values()
                if up.dataset_id == dataset_id and not up.cancelled and up.state != DONE]

    @_handler
    async def listxattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> list[bytes]:
        """Names of the node's ``user.ids.*`` (and ``user.idsfs.upload``) attributes.

        Raises ``pyfuse3.FUSEError`` only: ``ENOENT`` for an unknown inode;
        catalogue errors through :data:`ERRNO_TABLE`.
        """
        node = await self._current(self._inode(inode))
        names = sorted(self._static_xattrs(node))
        if node.datafile is not None and self._transfer is not None:
            names.append(XATTR_STATUS)
        if node.local is not None or (node.key.kind is Kind.DATASET
                                      and self._dataset_uploads(node.key.id)):
            names.append(XATTR_UPLOAD)
        return [name.encode() for name in names]

    @_handler
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        """The value of one ``user.ids.*`` attribute, or of ``user.idsfs.upload``.

        Other ``user.`` names answer ``ENODATA``; names of other namespaces
        (``security.selinux``, ``system.posix_acl_access``, ...) answer
        ``ENOTSUP`` at once: the mount has no labels or ACLs, and tools such as
        ``ls -l`` stop asking for them on this file system after that answer.

        Raises ``pyfuse3.FUSEError`` only: those two, ``ENODATA`` also for a
        name that is not ASCII, ``ENOENT`` for an unknown inode; errors of the
        read path (``user.ids.status``) and of the catalogue through
        :data:`ERRNO_TABLE`.
        """
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        entry = self._inode(inode)
        try:
            key = name.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        if key == XATTR_UPLOAD:
            node = await self._current(entry)
            up: Upload | None = node.local
            if up is not None:
                return up.describe_state().encode("utf-8", "surrogatepass")
            if node.key.kind is Kind.DATASET:
                ups = self._dataset_uploads(node.key.id)
                if ups:
                    text = "\n".join(f"{u.name}: {u.describe_state()}"
                                     for u in sorted(ups, key=lambda u: u.name))
                    return text.encode("utf-8", "surrogatepass")
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if not key.startswith("user.ids."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = await self._current(entry)
        if key == XATTR_STATUS and node.datafile is not None and self._transfer is not None:
            return (await self._transfer.status(node.datafile)).encode()
        value = self._static_xattrs(node).get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogatepass")

    # ------------------------------------------------------------------ files

    @_handler
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        """Open a file: a datafile for reading (keeping the page cache if unchanged),
        a file being written for reading or writing, a datafile for writing (replace).

        Raises ``pyfuse3.FUSEError`` only: ``ENOENT`` for an unknown inode or a
        file that is gone, ``EISDIR`` for a directory, ``EROFS`` for writing on
        a read-only mount, ``EACCES`` for writing an existing datafile without
        ``replace``, ``ENOSYS`` for reading without a read path; catalogue,
        spool and upload errors through :data:`ERRNO_TABLE`.
        """
        entry = self._inode(inode)
        if entry.node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = bool(flags & _WRITE_FLAGS)
        if writing and self._read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = await self._catalog.refresh(entry.node)
        if node is None and entry.node.local is not None:
            # a file written here that has become a datafile since the kernel saw it
            node = await self._catalog.lookup(entry.node.parent, entry.node.name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = self._inodes.get(inode) or entry
        if node.local is not None:
            return await self._open_spool(entry, node, flags)
        if node.datafile is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if writing:
            return await self._open_replace(entry, node, flags)
        if self._transfer is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        reader = await self._transfer.open(node.datafile)
        if not flags & os.O_DIRECT and reader.size > self._transfer.cache.capacity:
            # A file larger than the whole cache would only push every other file
            # out of it on its way through, and what the kernel read stays in its
            # page cache: its blocks leave the cache once delivered (their buffers
            # are reused at once). Files that fit stay cached for the next open.
            reader.release_delivered = True
        entry = self._inodes.get(inode) or entry
        entry.node = node
        version = node.datafile.version
        # keep the kernel's pages only when this inode was last opened at the same
        # version (and the read path, which tracks the datafile, agrees)
        keep_cache = entry.version == version and reader.keep_cache
        entry.version = version
        entry.opens += 1
        fh = next(self._next_fh)
        self._files[fh] = _FileHandle(inode, reader)
        direct = self._direct_read  # no page cache at all, so nothing to keep
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not direct, direct_io=direct)

    async def _handle(self, entry: _Inode, up: Upload, write: bool) -> int:
        assert self._uploader is not None
        await self._uploader.adopt_handle(up, write=write)
        entry.opens += 1
        entry.version = None
        fh = next(self._next_fh)
        self._files[fh] = _FileHandle(entry.ino, _SpoolReader(up, self._uploader), up, write)
        return fh

    async def _open_spool(self, entry: _Inode, node: Node, flags: int) -> pyfuse3.FileInfo:
        """Open a file that is still a spool file (being written, pending, failed).

        The handle is counted before anything is awaited on the upload: the
        last other handle may be released meanwhile (its upload landing), and
        an upload with a handle is never forgotten under it.
        """
        up: Upload = node.local
        uploader = self._uploader
        assert uploader is not None
        writing = bool(flags & _WRITE_FLAGS)
        if up.cancelled or not uploader.holds(up):
            # stored and forgotten since the node was looked at: open what it is now
            fresh = await self._as_stored(up, node)
            if fresh is None or fresh.local is up:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if fresh.local is not None:
                return await self._open_spool(entry, fresh, flags)
            if fresh.datafile is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await (self._open_replace(entry, fresh, flags) if writing
                          else self.open(entry.ino, flags))
        if writing:
            if up.handles == 0 and up.maybe_landed and not up.in_progress:
                await uploader.settle(up)
            if up.landed and up.handles == 0:
                # it is a datafile now: write it only as a datafile may be written
                fresh = await self._as_stored(up, node)
                if fresh is None or fresh.datafile is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return await self._open_replace(entry, fresh, flags)
        fh = await self._handle(entry, up, write=writing)
        if writing and flags & os.O_TRUNC:
            try:  # waits while the upload's close stores it
                await uploader.truncate(up, 0, unless_empty=True)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.release(fh)
                raise
        entry.node = node
        return self._spool_info(fh)

    async def _as_stored(self, up: Upload, node: Node) -> Node | None:
        """The node of what ``up`` (``node``) has become, its local entry gone.

        An upload stored in the background counts as landed before the tree
        shows its datafile (the uploader's callback is still fetching the new
        record): the datafile is shown here first, so that the name is never
        missing in between (an open or lookup then answered ENOENT, and the
        kernel kept that for the TTL). Raises what the catalogue's lookup raises.
        """
        fresh = None
        if up.datafile_id is not None and up.temp_name is None and not up.cancelled:
            fresh = await self._catalog.show_datafile(up.dataset_id, up.datafile_id)
        self._finish_local(up)
        if fresh is None or fresh.name != node.name:
            fresh = await self._catalog.lookup(node.parent, node.name)
        return fresh

    def _spool_info(self, fh: int) -> pyfuse3.FileInfo:
        """The FileInfo of a handle on a spool file (see "Writing"). Never raises."""
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=self._direct_write)

    async def _open_replace(self, entry: _Inode, node: Node, flags: int) -> pyfuse3.FileInfo:
        """Open an existing datafile for writing: refused, or (replace) a new upload."""
        if not self._replace:
            raise pyfuse3.FUSEError(errno.EACCES)
        record = node.datafile
        assert record is not None and self._uploader is not None
        up = await self._new_upload(node.parent, node.name, record.name,
                                     replace_id=record.id, ino=entry.ino)
        if not flags & os.O_TRUNC and record.fileSize > 0:
            # the old bytes are fetched at the first change (a mere open, or touch,
            # costs nothing and replaces nothing)
            self._copy_from[up.uid] = record
        elif flags & os.O_TRUNC:
            self._truncated.add(up.uid)  # stored (empty) even if nothing is written
        spool = self._catalog.local_node(self._spool_key(up))
        assert spool is not None
        entry.node = spool
        fh = await self._handle(entry, up, write=True)
        self._invalidate_entry(node.parent, node.name)
        return self._spool_info(fh)

    async def _before_change(self, up: Upload, new_size: int | None = None) -> None:
        """Before the first change of a replacing upload: fetch the old bytes (unless the
        change is a truncation to 0).

        Every read, write and truncation of the file waits here while the old
        bytes are being copied (one copy, by the first of them): a write let
        through meanwhile would be overwritten by old bytes. Raises what
        :meth:`_copy_down` raises (the next change tries again).
        """
        while (running := self._copying.get(up.uid)) is not None:
            await running.wait()
        record = self._copy_from.get(up.uid)
        if record is None:
            return
        if new_size == 0:
            del self._copy_from[up.uid]
            return
        done = self._copying[up.uid] = trio.Event()
        try:
            await self._copy_down(record, up)
            del self._copy_from[up.uid]
        finally:
            del self._copying[up.uid]
            done.set()

    async def _copy_down(self, record: DatafileRecord, up: Upload) -> None:
        """Fill a replacing upload's spool with the datafile's bytes (open without O_TRUNC)."""
        if self._transfer is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        assert self._uploader is not None
        reader = await self._transfer.open(record)
        try:
            offset = 0
            while offset < record.fileSize:
                data = await reader.read(offset, min(self._block_size, record.fileSize - offset))
                if not data:
                    raise errors.UploadError(f"the datafile {record.id} ended at {offset} bytes")
                await self._uploader.write(up, offset, data)
                offset += len(data)
        finally:
            await reader.close()
        up.sequential = False

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """Read from an open file (a datafile through the read path, else its spool).

        Raises ``pyfuse3.FUSEError`` only: ``EBADF`` for an unknown handle;
        errors of the read path (``ENODATA`` when a restore takes too long,
        ``EBUSY``, ``EIO``, ...) and of the spool through :data:`ERRNO_TABLE`
        (also those of fetching a replaced datafile's bytes at the first read).
        """
        handle = self._files.get(fh)
        if handle is None or handle.reader is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.upload is not None and self._copy_from:
            await self._before_change(handle.upload)
        return await handle.reader.read(off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write into the spool file of a file open for writing.

        Raises ``pyfuse3.FUSEError`` only: ``EBADF`` for an unknown handle or
        one not open for writing; the spool's errno (``ENOSPC`` for a full
        disk, also when an earlier write behind failed) and the errors of
        fetching a replaced datafile's bytes through :data:`ERRNO_TABLE`.
        """
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        up = handle.upload
        if up is None or not handle.write:
            raise pyfuse3.FUSEError(errno.EBADF)
        uploader = self._uploader
        assert uploader is not None
        if self._copy_from:
            await self._before_change(up)
        # waits while an upload reads the spool (it holds the upload's lock)
        n = await uploader.write(up, off, buf)
        if up.live is None and up.live_possible:
            uploader.maybe_start_live(up)
        return n

    @_handler
    async def flush(self, fh: int) -> None:
        """A ``close`` of a descriptor: upload the file if this is its last writer.

        See the module docstring ("When the upload happens"). Answers ``EIO``
        when the upload failed (the file stays as a pending upload). A
        read-only mount answers ``ENOSYS`` (the kernel then stops asking; closes
        succeed even after the daemon is gone).

        Raises ``pyfuse3.FUSEError`` only: ``ENOSYS`` (read-only), ``EIO`` for
        a failed upload, the spool's errno (``ENOSPC``) when a write behind
        failed; other errors through :data:`ERRNO_TABLE`.
        """
        if self._read_only:
            # nothing to do at close: the kernel stops sending flush requests after this
            raise pyfuse3.FUSEError(errno.ENOSYS)
        handle = self._files.get(fh)
        if handle is None or handle.upload is None or not handle.write:
            return
        up = handle.upload
        if up.cancelled or up.writers > 1 or self._uploader is None:
            return
        if up.generation == 0 and up.datafile_id is None:
            return  # never written: stored when the last handle goes (release)
        if not up.dirty:
            return
        await self._uploader.commit(up)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Make a spool file durable on local disk (the upload happens at close).

        Unknown handles and files not being written are left alone. Raises
        ``pyfuse3.FUSEError`` only: the spool's errno (a failed ``fsync``, or
        an earlier write behind that failed) through :data:`ERRNO_TABLE`.
        """
        handle = self._files.get(fh)
        if handle is None or handle.upload is None or self._uploader is None:
            return
        await self._uploader.fsync(handle.upload)

    @_handler
    async def release(self, fh: int) -> None:
        """Close an open file; the last handle of a written file may start its upload.

        An unknown handle is ignored. Raises ``pyfuse3.FUSEError`` only,
        through :data:`ERRNO_TABLE` (none is expected: closing a reader and the
        uploader's bookkeeping do not fail; an upload's failure shows in
        ``user.idsfs.upload``).
        """
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        inode = self._inodes.get(handle.ino)
        if inode is not None:
            inode.opens -= 1
            self._drop_if_unused(inode)
        up = handle.upload
        if up is None:
            if handle.reader is not None:
                await handle.reader.close()
            return
        up.handles -= 1
        if handle.write:
            up.writers -= 1
        if up.handles == 0 and self._uploader is not None:
            if up.replace_id is not None and up.generation == 0 and up.datafile_id is None \
                    and not up.maybe_landed and up.uid not in self._truncated:
                # opened to replace, but nothing was written: the datafile stays as it is
                self._copy_from.pop(up.uid, None)
                up.cancelled = True
            self._truncated.discard(up.uid)
            io = self._uploader.released(up)  # the state changes now, the spool I/O below
            if up.cancelled or not self._uploader.holds(up):
                self._finish_local(up)
            await io

    # ------------------------------------------------------------------ written files in the tree

    @staticmethod
    def _spool_key(up: Upload) -> NodeKey:
        return NodeKey(Kind.SPOOL, up.dataset_id, (up.uid,))

    def _path_of(self, key: NodeKey, name: str) -> str:
        """The path of entry ``name`` of directory ``key`` below the mount point (for messages)."""
        parts = [name]
        current = key
        for _ in range(64):
            if current == ROOT_KEY:
                break
            inode = self._inodes.get(self.ino_of(current))
            if inode is None:
                parts.append(f"<{current}>")
                break
            parts.append(inode.node.name)
            current = inode.node.parent
        return "/".join(reversed(parts))

    def _place(self, parent: Node) -> tuple[int, tuple[str, ...]]:
        """Dataset id and ICAT path prefix of a directory files may be created in."""
        kind = parent.key.kind
        if kind is Kind.DATASET:
            return parent.key.id, ()
        if kind is Kind.FOLDER:
            return parent.key.id, parent.key.path
        raise pyfuse3.FUSEError(errno.EPERM)

    @staticmethod
    def _datafile_name(prefix: tuple[str, ...], name: bytes | str) -> str:
        """The ICAT name of a new file ``name`` below ``prefix`` (naming errors raise)."""
        last = naming.unescape_name(name)
        full = naming.join_datafile_name([*prefix, last])
        try:
            return naming.check_icat_name(full)
        except naming.UnstorableNameError as exc:
            raise type(exc)(name, exc.reason) from None

    def _spool_node(self, up: Upload, parent: NodeKey, name: str) -> Node:
        return Node(self._spool_key(up), parent, name, local=up)

    def _show_upload(self, up: Upload) -> None:
        """Put an upload found in the spool at start-up into the tree (with its directories)."""
        parts = naming.split_datafile_name(up.name)
        parent = NodeKey(Kind.DATASET, up.dataset_id)
        for depth in range(1, len(parts)):
            key = NodeKey(Kind.FOLDER, up.dataset_id, tuple(parts[:depth]))
            if self._catalog.local_node(key) is None:
                self._catalog.add_local(Node(
                    key, parent, naming.escape_name(parts[depth - 1]),
                    extra=(("user.ids.name", "/".join(parts[:depth])),
                           ("user.ids.dataset.id", str(up.dataset_id)))))
            parent = key
        self._catalog.add_local(self._spool_node(up, parent, naming.escape_name(parts[-1])))

    async def _new_upload(self, parent: NodeKey, name: str, icat_name: str, *,
                          replace_id: int | None = None, ino: int | None = None) -> Upload:
        assert self._uploader is not None
        dataset_id = parent.id
        format_id = await self._uploader.format_id(dataset_id,
                                                   self._catalog.facility_of(parent))
        up = await self._uploader.create(dataset_id=dataset_id, name=icat_name,
                                         display=self._path_of(parent, name),
                                         format_id=format_id, replace_id=replace_id)
        key = self._spool_key(up)
        if ino is not None:
            self._allocated[key] = ino  # the replacing file keeps the datafile's inode
        self._catalog.add_local(self._spool_node(up, parent, name))
        return up

    async def _drop_new_upload(self, up: Upload) -> None:
        assert self._uploader is not None
        up.cancelled = True
        io = self._uploader.forget(up)
        self._catalog.remove_local(self._spool_key(up))
        await io

    def _finish_local(self, up: Upload) -> None:
        """The upload is done or gone: its local entry leaves the tree."""
        node = self._catalog.remove_local(self._spool_key(up))
        if node is not None:
            self._invalidate_entry(node.parent, node.name)

    async def _landed(self, up: Upload) -> None:
        """Uploader callback: a datafile was stored; show it in the cached listings."""
        assert up.datafile_id is not None
        for old in getattr(up, "replaced_ids", ()):
            self._catalog.remove_datafile(up.dataset_id, old, keep_dirs=False)
        up.replaced_ids = []
        await self._catalog.show_datafile(up.dataset_id, up.datafile_id)
        if up.handles == 0:
            self._finish_local(up)

    def _invalidate_entry(self, parent: NodeKey, name: str) -> None:
        """Ask the kernel to forget a cached name (real mounts only; never raises)."""
        if not self._notify_kernel:
            return
        ino = self.ino_of(parent)
        if ino not in self._inodes:
            return
        try:
            pyfuse3.invalidate_entry_async(ino, name.encode("utf-8", "surrogateescape"),
                                           ignore_enoent=True)
        except Exception as exc:  # noqa: BLE001 - only a hint to the kernel
            log.debug("invalidate_entry failed: %s", exc)

    def _check_writable(self) -> Uploader:
        if self._read_only or self._uploader is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._uploader

    # ------------------------------------------------------------------ changes

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Create a file in a dataset (or below it): a new upload with an empty spool.

        Raises ``pyfuse3.FUSEError`` only: ``EROFS`` on a read-only mount,
        ``ENOENT`` for an unknown parent, ``ENOTDIR``, ``EPERM`` outside a
        dataset, ``EEXIST`` with ``O_EXCL``, ``EISDIR`` for an existing
        directory, what :meth:`open` raises for an existing file; a name ICAT
        cannot store gives its own errno (``EINVAL``, ``ENAMETOOLONG``), and
        spool and ICAT errors go through :data:`ERRNO_TABLE`.
        """
        self._check_writable()
        parent = self._inode(parent_inode)
        pnode = parent.node
        if not pnode.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        _, prefix = self._place(pnode)
        existing = await self._catalog.lookup(pnode.key, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if existing.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            inode = self._remember(existing)
            try:
                info = await self.open(inode.ino, flags | os.O_WRONLY, ctx)
            except BaseException:
                inode.lookups -= 1
                self._drop_if_unused(inode)
                raise
            current = self._inodes[inode.ino].node
            return info, self._attributes(current, 1)
        text = name.decode("utf-8", "surrogateescape")
        icat_name = self._datafile_name(prefix, name)
        up = await self._new_upload(pnode.key, text, icat_name)
        node = self._catalog.local_node(self._spool_key(up))
        assert node is not None
        inode = self._remember(node)
        fh = await self._handle(inode, up, write=True)
        return self._spool_info(fh), self._attributes(node, 1)

    @_handler
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        """Truncate a file being written; set modification times (also of datafiles, in
        ICAT); accept mode and owner changes without effect (see docs/semantics.md).

        Raises ``pyfuse3.FUSEError`` only: ``EROFS`` on a read-only mount,
        ``ENOENT`` for an unknown inode, ``EISDIR`` for a size given to a
        directory, ``EACCES`` for a new size of a datafile not being written;
        spool and ICAT errors through :data:`ERRNO_TABLE`.
        """
        self._check_writable()
        entry = self._inode(inode)
        node = await self._current(entry)
        up: Upload | None = node.local
        uploader = self._uploader
        if fields.update_size:
            if up is not None and uploader is not None and not (up.landed and up.handles == 0):
                await self._before_change(up, attr.st_size)
                await uploader.truncate(up, attr.st_size)
            elif node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            elif attr.st_size != node.size:
                raise pyfuse3.FUSEError(errno.EACCES)
        if fields.update_mtime:
            ms = attr.st_mtime_ns // 1_000_000
            if up is not None and up.replace_id is not None and up.generation == 0 \
                    and up.datafile_id is None:
                # a replacing open that changed nothing yet: the time is the datafile's
                up.mod_ms = ms
                await self._set_mod_time(up.dataset_id, up.replace_id, ms)
            elif up is not None and uploader is not None:
                up.mod_ms = ms
                await uploader.try_save(up)
                if up.landed and up.datafile_id is not None:
                    await self._set_mod_time(up.dataset_id, up.datafile_id, ms)
            elif node.datafile is not None:
                await self._set_mod_time(node.datafile.dataset_id, node.datafile.id, ms)
                node = await self._current(entry)
        node = await self._current(entry)
        nlink = await self._catalog.nlink(node.key)
        return self._attributes(node, nlink)

    async def _set_mod_time(self, dataset_id: int, datafile_id: int, ms: int) -> None:
        await self._catalog.set_datafile_mod_time(dataset_id, datafile_id, ms)

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        """Special files cannot be stored: raises ``pyfuse3.FUSEError`` (``EPERM``;
        ``EROFS`` read-only)."""
        self._check_writable()
        raise pyfuse3.FUSEError(errno.EPERM)

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        """In a visit: create a Dataset. In a dataset: a local directory for file names.

        Raises ``pyfuse3.FUSEError`` only: ``EROFS`` on a read-only mount,
        ``ENOENT`` for an unknown parent, ``ENOTDIR``, ``EPERM`` where no
        directory can be made (root, facility, investigation name), ``EEXIST``; a
        name ICAT cannot store gives its own errno, and ICAT errors go through
        :data:`ERRNO_TABLE` (``ENOTSUP`` for a missing dataset type).
        """
        self._check_writable()
        parent = self._inode(parent_inode)
        pnode = parent.node
        if not pnode.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        kind = pnode.key.kind
        if kind not in _WRITABLE_DIRS:
            raise pyfuse3.FUSEError(errno.EPERM)
        if await self._catalog.lookup(pnode.key, name) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if kind is Kind.INVESTIGATION:
            icat_name = naming.icat_name(name)
            node = await self._catalog.create_dataset(pnode, icat_name, self._dataset_type)
            log.info("created dataset %r (id %d)", icat_name, node.key.id)
            return await self._entry(node)
        dataset_id, prefix = self._place(pnode)
        component = naming.unescape_name(name)
        # the directory must be able to hold a file: check the name it gives
        self._datafile_name((*prefix, component), "x")
        text = name.decode("utf-8", "surrogateescape")
        path = (*prefix, component)
        node = Node(NodeKey(Kind.FOLDER, dataset_id, path), pnode.key, text,
                    mtime_ns=time.time_ns(), ctime_ns=time.time_ns(),
                    extra=(("user.ids.dataset.id", str(dataset_id)),
                           ("user.ids.name", "/".join(path))))
        self._catalog.add_local(node)
        return await self._entry(node)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        """Delete a datafile through IDS, or drop a file not yet stored.

        Raises ``pyfuse3.FUSEError`` only: ``EROFS`` on a read-only mount,
        ``ENOENT`` for an unknown parent or name, ``EISDIR`` for a directory,
        ``EPERM`` for other entries; IDS and ICAT errors through
        :data:`ERRNO_TABLE`.
        """
        uploader = self._check_writable()
        pnode = self._inode(parent_inode).node
        node = await self._catalog.lookup(pnode.key, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self._remove_file(uploader, node, keep_dirs=True)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        """Delete an empty dataset, or a directory made inside one (``ENOTEMPTY`` if not empty).

        Raises ``pyfuse3.FUSEError`` only: ``EROFS`` on a read-only mount,
        ``ENOENT`` for an unknown parent or name, ``ENOTDIR`` for a file,
        ``ENOTEMPTY``, ``EPERM`` for facility, investigation and visit
        directories; ICAT errors through :data:`ERRNO_TABLE`.
        """
        self._check_writable()
        pnode = self._inode(parent_inode).node
        node = await self._catalog.lookup(pnode.key, name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        kind = node.key.kind
        if kind is Kind.DATASET:
            listing = await self._catalog.listing(node.key)
            if (listing is not None and listing.entries) or self._dataset_uploads(node.key.id) \
                    or await self._catalog.count_datafiles(node.key.id):
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            await self._catalog.delete_dataset(node)
            log.info("deleted dataset %d %r", node.key.id, node.name)
            return
        if kind is Kind.FOLDER:
            listing = await self._catalog.listing(node.key)
            if listing is not None and listing.entries:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self._catalog.remove_local(node.key)
            return
        raise pyfuse3.FUSEError(errno.EPERM)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        """Rename a datafile within its dataset or a dataset within its visit (ICAT).

        Other moves: ``EXDEV`` for files and directories that can be copied
        (``mv`` then copies and deletes), ``EPERM`` for facility, investigation
        and visit directories. An existing target is replaced only with the
        replace option (``EACCES`` otherwise).

        Raises ``pyfuse3.FUSEError`` only: those, ``EROFS`` on a read-only
        mount, ``EINVAL`` for ``RENAME_EXCHANGE``, ``ENOENT`` for an unknown
        parent or name, ``EEXIST`` (``RENAME_NOREPLACE``; a dataset's target
        exists), ``EISDIR`` for a directory as a file's target; name, ICAT and
        IDS errors through :data:`ERRNO_TABLE`.
        """
        uploader = self._check_writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_parent = self._inode(parent_inode_old).node
        new_parent = self._inode(parent_inode_new).node
        node = await self._catalog.lookup(old_parent.key, name_old)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        target = await self._catalog.lookup(new_parent.key, name_new)
        if target is not None and target.key == node.key:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self._rename(uploader, node, old_parent, new_parent, name_new, target)
        # the kernel keeps the inode of the renamed entry (no new lookup): point
        # it at the new place, where open and getxattr look for it
        inode = self._inodes.get(self.ino_of(node.key))
        if inode is not None:
            moved = await self._catalog.lookup(new_parent.key, name_new)
            if moved is not None and moved.key == node.key:
                inode.node = moved

    async def _rename(self, uploader: Uploader, node: Node, old_parent: Node, new_parent: Node,
                      name_new: bytes, target: Node | None) -> None:
        """The rename of :meth:`rename` once its arguments are checked."""
        kind = node.key.kind
        if kind is Kind.DATASET:
            if new_parent.key != old_parent.key:
                raise pyfuse3.FUSEError(errno.EXDEV)
            if target is not None:
                raise pyfuse3.FUSEError(errno.EEXIST)
            await self._catalog.rename_dataset(node, naming.icat_name(name_new))
            return
        if kind is Kind.FOLDER:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if kind not in (Kind.DATAFILE, Kind.SPOOL):
            raise pyfuse3.FUSEError(errno.EPERM)
        if kind is Kind.SPOOL:
            dataset_id = node.key.id
        else:
            assert node.datafile is not None  # a DATAFILE node carries its record
            dataset_id = node.datafile.dataset_id
        try:
            new_dataset, prefix = self._place(new_parent)
        except pyfuse3.FUSEError:
            raise pyfuse3.FUSEError(errno.EXDEV) from None
        if new_dataset != dataset_id:
            raise pyfuse3.FUSEError(errno.EXDEV)
        new_name = self._datafile_name(prefix, name_new)
        text = name_new.decode("utf-8", "surrogateescape")
        if target is not None:
            if target.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if not self._replace:
                raise pyfuse3.FUSEError(errno.EACCES)
            if node.local is None and target.local is None:
                await self._rename_over(uploader, node, target, new_name)
                return
            await self._remove_file(uploader, target, keep_dirs=False)
        up: Upload | None = node.local
        if up is not None:
            await self._rename_upload(uploader, up, node, new_parent.key, text, new_name)
            return
        assert node.datafile is not None
        await self._check_named(node, node.datafile)
        await self._catalog.rename_datafile(node.datafile, new_name)
        log.info("renamed datafile %d to %r", node.datafile.id, new_name)

    async def _check_named(self, node: Node, record: DatafileRecord) -> None:
        """Before deleting or renaming a datafile by id: raise ``FUSEError(ENOENT)`` when
        ICAT no longer shows it under the name the (up to a TTL old) listing gave."""
        if not await self._catalog.still_named(record):
            self._invalidate_entry(node.parent, node.name)
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def _rename_over(self, uploader: Uploader, node: Node, target: Node,
                           new_name: str) -> None:
        """``mv stored other`` with the replace option: the old datafile goes last.

        The target is first renamed aside (``.idsfs-replaced-<hex>`` in its
        directory), then the source takes the name, then the target is deleted;
        if the source cannot be renamed, the target gets its name back. A
        target that cannot be deleted stays under the aside name (logged).
        Raises the ICAT errors of the renames.
        """
        source, old = node.datafile, target.datafile
        assert source is not None and old is not None
        await self._check_named(node, source)
        await self._check_named(target, old)
        folder, _, _ = new_name.rpartition("/")
        aside = f"{folder + '/' if folder else ''}.idsfs-replaced-{os.urandom(8).hex()}"
        await self._catalog.rename_datafile(old, aside)
        try:
            await self._catalog.rename_datafile(source, new_name)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(errors.IdsfsError):
                await self._catalog.rename_datafile(old, old.name)
            raise
        try:
            await uploader.delete(old.id)
        except errors.IdsfsError as exc:
            log.warning("replaced datafile %d stays as %r: deleting it failed (%s)", old.id,
                        aside, exc)
            return
        self._catalog.remove_datafile(old.dataset_id, old.id, keep_dirs=True)
        log.info("renamed datafile %d to %r over datafile %d (deleted)", source.id, new_name,
                 old.id)

    async def _remove_file(self, uploader: Uploader, node: Node, *, keep_dirs: bool) -> None:
        """Delete the file ``node`` (``unlink``, the replaced target of a rename): its
        datafile through IDS, or its upload with whatever that stored.

        ``keep_dirs`` as for :meth:`Catalog.remove_datafile`. Raises
        ``pyfuse3.FUSEError`` (``EPERM``) for an entry that is neither, and the
        IDS and ICAT errors of the deletions.
        """
        up: Upload | None = node.local
        if up is not None:
            # (what discard deleted is known only after it: an upload in flight,
            # e.g. a file closed unwritten stored in the background, may have
            # stored and shown it meanwhile)
            deleted = await uploader.discard(up)
            self._catalog.remove_local(node.key)
            for did in deleted:
                self._catalog.remove_datafile(up.dataset_id, did, keep_dirs=keep_dirs)
            log.info("deleted %s (%s)", up.display,
                     f"datafiles {', '.join(map(str, deleted))} too" if deleted
                     else "not stored")
            return
        record = node.datafile
        if record is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._check_named(node, record)
        await uploader.delete(record.id)
        self._catalog.remove_datafile(record.dataset_id, record.id, keep_dirs=keep_dirs)
        log.info("deleted datafile %d %r", record.id, record.name)

    async def _rename_upload(self, uploader: Uploader, up: Upload, node: Node,
                             new_parent: NodeKey, text: str, new_name: str) -> None:
        """Rename a file written here: its upload's name, and its datafile if stored."""
        await uploader.rename(up, new_name, self._path_of(new_parent, text))
        self._catalog.remove_local(node.key)
        if up.cancelled:
            return
        if uploader.holds(up):
            self._catalog.add_local(self._spool_node(up, new_parent, text))
        # else it was stored (in the background) and forgotten meanwhile: only its
        # datafile, renamed in ICAT by uploader.rename, is left to show
        if up.datafile_id is not None and up.temp_name is None:
            self._catalog.remove_datafile(up.dataset_id, up.datafile_id, keep_dirs=True)
            await self._catalog.show_datafile(up.dataset_id, up.datafile_id)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        """Symbolic links cannot be stored: raises ``pyfuse3.FUSEError`` (``EPERM``;
        ``EROFS`` read-only)."""
        self._check_writable()
        raise pyfuse3.FUSEError(errno.EPERM)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        """Hard links cannot be stored: raises ``pyfuse3.FUSEError`` (``EPERM``;
        ``EROFS`` read-only)."""
        self._check_writable()
        raise pyfuse3.FUSEError(errno.EPERM)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Extended attributes cannot be stored: raises ``pyfuse3.FUSEError``
        (``ENOTSUP``; ``EROFS`` read-only)."""
        self._check_writable()
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        """Extended attributes cannot be removed: raises ``pyfuse3.FUSEError``
        (``ENOTSUP``; ``EROFS`` read-only)."""
        self._check_writable()
        raise pyfuse3.FUSEError(errno.ENOTSUP)

def _groups(pid: int) -> set[int]:
    """Supplementary groups of a process (empty when they cannot be read)."""
    try:
        return pyfuse3.get_sup_groups(pid)
    except (OSError, RuntimeError):
        return set()
