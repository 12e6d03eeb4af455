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

import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyfuse3

from idsfs import errors, naming
from idsfs.blockcache import DEFAULT_BLOCK_SIZE, BlockLengthError
from idsfs.catalog import Catalog, DatafileRecord, Kind, Node, NodeKey

__all__ = [
    "ERRNO_TABLE",
    "XATTR_STATUS",
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
    (errors.RestoreTimeoutError, errno.EAGAIN),
    (errors.DataBusyError, errno.EBUSY),
    (errors.RestoreFailedError, errno.EIO),
    (errors.IncompleteDownloadError, errno.EIO),
    (errors.TransferError, None),
    (errors.IDSDataNotOnlineError, errno.EAGAIN),
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
    """Return the errno value :data:`ERRNO_TABLE` gives ``exc`` (``EIO`` if none)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    return _known(exc)[1]


def _fuse_error(operation: str, exc: Exception) -> pyfuse3.FUSEError:
    """Log ``exc`` as befits it and return the FUSEError to raise instead."""
    known, code = _known(exc)
    if not known:
        log.error("%s: unexpected %s, answering EIO", operation, type(exc).__name__,
                  exc_info=exc)
    elif code == errno.EIO:
        log.warning("%s: %s: %s", operation, type(exc).__name__, exc)
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

_TAGS = {Kind.FACILITY: 1, Kind.INVESTIGATION: 2, Kind.DATASET: 3, Kind.DATAFILE: 4}
_ALLOCATED_TAG = 5
_ID_LIMIT = 1 << 60
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


class Reader(Protocol):
    """An open datafile of the read path."""

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        """Read ``size`` bytes at ``offset`` (short only at end of file)."""
        ...

    async def close(self) -> None:
        """Release what the reader holds."""
        ...


class TransferLike(Protocol):
    """What :class:`Operations` needs of ``idsfs.transfer.Transfer``."""

    async def open(self, datafile: DatafileRecord) -> Reader:
        """Open a datafile for reading (no IDS call)."""
        ...

    async def status(self, datafile: DatafileRecord) -> str:
        """``ONLINE``, ``ARCHIVED`` or ``RESTORING``."""
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
    reader: Reader


# ----------------------------------------------------------------------------- operations


class Operations(pyfuse3.Operations):
    """The idsfs file system (read-only for now).

    Args:
        catalog: the tree's listings.
        transfer: the read path (``open``/``status``); ``None`` disables
            ``open`` (``ENOSYS``) and ``user.ids.status``.
        uid: owner shown for every file (default: the daemon's uid).
        gid: group shown for every file (default: the daemon's gid).
        read_only: refuse every change with ``EROFS`` (the only mode so far).
        block_size: ``st_blksize`` and ``f_bsize`` (the read path's block size).

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
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size!r}")
        self._catalog = catalog
        self._transfer = transfer
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._read_only = read_only
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

    # ------------------------------------------------------------------ inodes

    def ino_of(self, key: NodeKey) -> int:
        """The inode number of a node key (the same for the mount's lifetime)."""
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
        """The lookup count of an inode (0 if the table does not hold it)."""
        inode = self._inodes.get(ino)
        return 0 if inode is None else inode.lookups

    @property
    def inode_count(self) -> int:
        """How many inodes the table holds (the root included)."""
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
        if node.is_dir:
            return stat.S_IFDIR | 0o555
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
        attr.st_size = node.size
        attr.st_blksize = self._block_size
        attr.st_blocks = (node.size + 511) // 512
        attr.st_mtime_ns = node.mtime_ns
        attr.st_atime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        return attr

    def _dot_attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        """Minimal attributes for ``.``/``..`` in readdir (the kernel uses only ino and type)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = stat.S_IFDIR | 0o555
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        return attr

    def _negative(self) -> pyfuse3.EntryAttributes:
        """A lookup miss the kernel may cache for the metadata TTL."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = self._ttl
        attr.attr_timeout = self._ttl
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
        """Look ``name`` up in directory ``parent_inode`` (``.`` and ``..`` included)."""
        parent = self._inode(parent_inode)
        if not parent.node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return await self._entry(parent.node)
        if name == b"..":
            return await self._entry(await self._parent_node(parent.node))
        node = await self._catalog.lookup(parent.node.key, name)
        if node is None:
            return self._negative()
        return await self._entry(node)

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
        """Attributes of ``inode`` (from the parent's listing; fetched when expired)."""
        node = await self._current(self._inode(inode))
        nlink = await self._catalog.nlink(node.key)
        return self._attributes(node, nlink)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        """Open a directory: snapshot its current listing."""
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
        """List the snapshot from offset ``start_id`` (0: ``.``, 1: ``..``, 2: first entry)."""
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
        """Forget a directory handle and its snapshot."""
        self._dirs.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Lower lookup counts; nodes no longer known to the kernel leave the table."""
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
        """Sizes and counts of what has been listed so far; no free space."""
        usage = self._catalog.usage()
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._block_size
        data.f_frsize = 512
        data.f_blocks = (usage.bytes + 511) // 512
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = usage.files + usage.directories
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = naming.NAME_MAX
        return data

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Check ``mode`` against the permission bits (used without ``default_permissions``)."""
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

    @_handler
    async def listxattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> list[bytes]:
        """Names of the node's ``user.ids.*`` attributes."""
        node = await self._current(self._inode(inode))
        names = sorted(node.xattrs())
        if node.datafile is not None and self._transfer is not None:
            names.append(XATTR_STATUS)
        return [name.encode() for name in names]

    @_handler
    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        """The value of one ``user.ids.*`` attribute.

        Other ``user.`` names answer ``ENODATA``; names of other namespaces
        (``security.selinux``, ``system.posix_acl_access``, ...) answer
        ``ENOTSUP`` at once: the mount has no labels or ACLs, and tools such as
        ``ls -l`` stop asking for them on this file system after that answer.
        """
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        entry = self._inode(inode)
        try:
            key = name.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        if not key.startswith("user.ids."):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = await self._current(entry)
        if key == XATTR_STATUS and node.datafile is not None and self._transfer is not None:
            return (await self._transfer.status(node.datafile)).encode()
        value = node.xattrs().get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogatepass")

    # ------------------------------------------------------------------ files

    @_handler
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        """Open a datafile for reading; keep the page cache if it is unchanged."""
        entry = self._inode(inode)
        if entry.node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS if self._read_only else errno.EPERM)
        if self._transfer is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = await self._catalog.refresh(entry.node)
        if node is None or node.datafile is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        reader = await self._transfer.open(node.datafile)
        entry = self._inodes.get(inode) or entry
        entry.node = node
        version = node.datafile.version
        # keep the kernel's pages only when this inode was last opened at the same
        # version (and the read path, which tracks the datafile, agrees)
        keep_cache = entry.version == version and bool(getattr(reader, "keep_cache", True))
        entry.version = version
        entry.opens += 1
        fh = next(self._next_fh)
        self._files[fh] = _FileHandle(inode, reader)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """Read from an open datafile through the read path."""
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await handle.reader.read(off, size)

    @_handler
    async def release(self, fh: int) -> None:
        """Close an open datafile."""
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        inode = self._inodes.get(handle.ino)
        if inode is not None:
            inode.opens -= 1
            self._drop_if_unused(inode)
        await handle.reader.close()

    # ------------------------------------------------------------------ changes

    def _refuse(self) -> pyfuse3.FUSEError:
        return pyfuse3.FUSEError(errno.EROFS if self._read_only else errno.ENOSYS)

    @_handler
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        """Changing attributes is refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        """Refused (``EROFS``)."""
        raise self._refuse()

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        """Refused (``EROFS``)."""
        raise self._refuse()


def _groups(pid: int) -> set[int]:
    """Supplementary groups of a process (empty when they cannot be read)."""
    try:
        return pyfuse3.get_sup_groups(pid)
    except (OSError, RuntimeError):
        return set()
