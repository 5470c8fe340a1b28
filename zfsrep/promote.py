"""Promotion: a recovered volume that is usable before its data is copied.

A live failover (or a move) does not copy every volume before it returns. It writes the
volume's *skeleton* at the checkpoint (directories, names, symlinks, hard links, special
files, owners, modes, times, xattrs, and every regular file at its size but with no data)
into a work tree, and serves that tree through a mount at the live path
(``zfsrep.mountd.promote``) while the data is copied in behind it from the journal's index:
the reference product's *promotion* of journal data into the recovered volume.

The on-disk state is the skeleton itself: a regular file whose data is not yet all copied
carries the extended attribute ``MARKER``, its *map* (``FileMap``): its identity in the view,
and which of its chunks hold their data already. A file is promoted by chunks: the mount
fills the chunks a write touches before the write (``fill_chunks``, then ``persist``: the
data is durable before the map says so), and the background fills the rest. When every
chunk holds its data the mark is removed (``finish``). A daemon that stops half-way is
started again over the same tree and goes on from the maps. When no file is marked the tree
replaces the mount at the live path (``switch``): the mount is detached, the tree and the
mount point are exchanged in one rename, and what is left is a plain directory.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zfsrep import syscalls

#: the extended attribute of a file whose data is not yet all copied (value: its FileMap)
MARKER = b"trusted.zfsrep.promote"
_IDENT = struct.Struct("<Q")
_MAP = struct.Struct("<QQB")  # view identity, limit, log2 of the chunk size; then the bitmap
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_EXCHANGE = 2
MNT_DETACH = 2
#: no limit recorded: the view's data counts up to the file's size
NO_LIMIT = (1 << 64) - 1
#: chunks are at least 1 MiB, and a file has at most this many (its map then stays within
#: 2 KiB, which every file system that has trusted.* xattrs holds in one attribute)
MIN_CHUNK_SHIFT = 20
MAX_CHUNKS = 16384

#: Files and names of a promotion's work directory (``DIR/.work/live/VOLUME``).
TREE = "tree"        # the skeleton, filled as it is served; exchanged into the live path
BUILDING = "tree.partial"  # a skeleton being written (removed and written again if found)
STATE = "promote.json"     # the daemon's progress, for the commands that wait on it
LOG = "promote.log"


def mark(fd: int, ident: int) -> None:
    """Mark the skeleton file open as ``fd`` as not yet filled from view identity ``ident``
    (no chunk filled, no limit: the short form of a map)."""
    os.setxattr(fd, MARKER, _IDENT.pack(ident))


def _read_marker(target: int | str | bytes) -> bytes | None:
    try:
        return os.getxattr(target, MARKER)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def marked(target: int | str | bytes) -> int | None:
    """The view identity a skeleton file is to be filled from, or None once it is filled."""
    value = _read_marker(target)
    if value is None:
        return None
    if len(value) < _IDENT.size:
        raise OSError(errno.EIO, "damaged promotion map", target)
    return _IDENT.unpack_from(value)[0]


def chunk_shift(size: int) -> int:
    """log2 of the chunk size for a file of ``size`` bytes: 1 MiB, or more for a file of
    over MAX_CHUNKS MiB."""
    need = -(-size // MAX_CHUNKS)
    return max(MIN_CHUNK_SHIFT, (need - 1).bit_length())


class FileMap:
    """Which parts of a marked file hold their data, and where the rest is read from.

    The file is cut into chunks of ``1 << shift`` bytes. Below ``end(size)`` =
    min(``limit``, the file's size) a chunk either holds its data (``filled``) or is still
    read from file ``ident`` of the view; at or above it, the file itself is the data (the
    file was truncated, or grew, since the checkpoint). ``durable`` is the part of
    ``filled`` whose data is on stable storage and recorded in the attribute; only chunks
    in it may be changed (a chunk filled but not recorded would be filled again from the
    view after a crash, over the change)."""

    __slots__ = ("ident", "limit", "shift", "filled", "durable")

    def __init__(self, ident: int, limit: int, shift: int, bits: bytes = b"") -> None:
        self.ident = ident
        self.limit = limit
        self.shift = shift
        self.filled = bytearray(bits)
        self.durable = bytearray(bits)

    @classmethod
    def decode(cls, value: bytes, size: int) -> FileMap:
        """The map in attribute ``value`` of a file now ``size`` bytes long."""
        if len(value) == _IDENT.size:  # as the skeleton wrote it
            return cls(_IDENT.unpack(value)[0], NO_LIMIT, chunk_shift(size))
        if len(value) < _MAP.size:
            raise ValueError("damaged promotion map")
        ident, limit, shift = _MAP.unpack_from(value)
        if not MIN_CHUNK_SHIFT <= shift < 64:
            raise ValueError("damaged promotion map")
        return cls(ident, limit, shift, value[_MAP.size:])

    def encode(self, bits: bytes) -> bytes:
        """The attribute's value, with ``bits`` the chunks recorded as filled."""
        return _MAP.pack(self.ident, self.limit, self.shift) + bytes(bits).rstrip(b"\0")

    def end(self, size: int) -> int:
        """Where the view stops counting, for a file now ``size`` bytes long."""
        return min(self.limit, size)

    def is_filled(self, k: int) -> bool:
        return k >> 3 < len(self.filled) and bool(self.filled[k >> 3] & (1 << (k & 7)))

    def is_durable(self, k: int) -> bool:
        return k >> 3 < len(self.durable) and bool(self.durable[k >> 3] & (1 << (k & 7)))

    def set_filled(self, chunks: list[int]) -> None:
        for k in chunks:
            if k >> 3 >= len(self.filled):
                self.filled.extend(bytes((k >> 3) + 1 - len(self.filled)))
            self.filled[k >> 3] |= 1 << (k & 7)

    def chunks(self, lo: int, hi: int, size: int) -> range:
        """The chunks that bytes lo..hi touch below the view's end."""
        hi = min(hi, self.end(size))
        if hi <= lo:
            return range(0)
        return range(lo >> self.shift, ((hi - 1) >> self.shift) + 1)

    def missing(self, lo: int, hi: int, size: int, limit: int | None = None) -> list[int]:
        """The chunks touched by bytes lo..hi (below the end) not yet filled; at most
        ``limit`` of them."""
        out = []
        for k in self.chunks(lo, hi, size):
            if not self.is_filled(k):
                out.append(k)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def unrecorded(self, lo: int, hi: int, size: int) -> bool:
        """Whether a chunk touched by bytes lo..hi is filled but not yet recorded."""
        return any(self.is_filled(k) and not self.is_durable(k)
                   for k in self.chunks(lo, hi, size))

    def runs(self, lo: int, hi: int, size: int) -> Iterator[tuple[int, int, bool]]:
        """Bytes lo..hi (hi at most ``size``) as runs ``(start, stop, from_view)``, each as
        long as it can be."""
        end = min(self.end(size), hi)
        start, view = lo, None
        at = lo
        while at < end:
            k = at >> self.shift
            here = not self.is_filled(k)
            if view is not None and here != view:
                yield start, at, view
                start = at
            view = here
            at = min(end, (k + 1) << self.shift)
        if at < hi:  # past the end: the file
            if view:
                yield start, at, True
                start = at
            view = False
        if view is not None:
            yield start, hi, view

    def complete(self, size: int) -> bool:
        return not self.missing(0, size, size, limit=1)


def read_map(target: int | str | bytes) -> FileMap | None:
    """The map of a marked file, or None if it holds all its data."""
    value = _read_marker(target)
    if value is None:
        return None
    try:
        return FileMap.decode(value, os.stat(target).st_size)
    except ValueError:
        raise OSError(errno.EIO, "damaged promotion map", target) from None


def fill_chunks(view: Any, target: str | bytes, fmap: FileMap, chunks: list[int]) -> int:
    """Copy ``chunks`` of file ``target`` (a path, usually ``/proc/self/fd/N``) from the
    view, below the map's end, keeping the file's times; the bytes they cover. The caller
    marks them filled (``FileMap.set_filled``), and records them (``persist``) before
    they may change. Blocking: call it from a thread."""
    from zfsrep.restore import _copy_range

    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", target)
        end = fmap.end(st.st_size)
        covered = 0
        for lo, hi in _spans(chunks):
            lo, hi = lo << fmap.shift, min(end, hi << fmap.shift)
            if lo < hi:
                _copy_range(view, fmap.ident, fd, lo, hi)
                covered += hi - lo
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return covered
    finally:
        os.close(fd)


def _spans(chunks: list[int]) -> Iterator[tuple[int, int]]:
    """Chunk numbers as runs of consecutive ones, ``(first, last + 1)``, in order."""
    ordered = sorted(chunks)
    i = 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and ordered[j] == ordered[j - 1] + 1:
            j += 1
        yield ordered[i], ordered[j - 1] + 1
        i = j


def persist(target: str | bytes, fmap: FileMap) -> None:
    """Record what is filled: the data on stable storage first, then the map. Afterwards
    ``fmap.durable`` equals ``fmap.filled``. Blocking."""
    filled = bytes(fmap.filled)
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
        os.setxattr(fd, MARKER, fmap.encode(filled))
        os.fsync(fd)
        fmap.durable = bytearray(filled)
    finally:
        os.close(fd)


def finish(target: str | bytes) -> None:
    """Remove the mark of a file whose data is all there: the data on stable storage first,
    then the mark's removal. Blocking."""
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)  # a mark removed must mean the data is there
        try:
            os.removexattr(fd, MARKER)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(view: Any, target: str | bytes) -> int:
    """Fill every chunk a marked file still misses and remove its mark; the bytes filled
    (0 for a file not marked). Blocking."""
    fmap = read_map(target)
    if fmap is None:
        return 0
    size = os.stat(target).st_size
    written = fill_chunks(view, target, fmap, fmap.missing(0, size, size))
    finish(target)
    return written


class Walk:
    """A walk of a tree for marked files, taken in steps (``step``), each returning at most
    ``limit`` of them as ``(O_PATH descriptor, inode number, identity, size)``; the caller
    closes the descriptors. Directories are held open while under the walk, so renames of
    them do not lose it; a file renamed behind the walk is found by the next one."""

    def __init__(self, root_fd: int) -> None:
        self._stack: list[tuple[int, Iterator[os.DirEntry]]] = []
        fd = os.dup(root_fd)
        self._push(fd)

    def _push(self, fd: int) -> None:
        try:
            self._stack.append((fd, iter(list(os.scandir(fd)))))
        except OSError:
            os.close(fd)

    @property
    def done(self) -> bool:
        return not self._stack

    def close(self) -> None:
        while self._stack:
            os.close(self._stack.pop()[0])

    def step(self, limit: int = 256) -> list[tuple[int, int, int, int]]:
        found: list[tuple[int, int, int, int]] = []
        while self._stack and len(found) < limit:
            dfd, entries = self._stack[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(self._stack.pop()[0])
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    self._push(os.open(entry.name, _DIR_FLAGS, dir_fd=dfd))
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                pfd = os.open(entry.name, _PATH_FLAGS, dir_fd=dfd)
            except OSError:  # gone, or replaced, since the listing: the next walk sees it
                continue
            try:
                st = os.fstat(pfd)
                ident = marked(f"/proc/self/fd/{pfd}") if stat.S_ISREG(st.st_mode) else None
            except OSError:
                ident = None
            if ident is None:
                os.close(pfd)
                continue
            found.append((pfd, st.st_ino, ident, st.st_size))
        return found


def count_marked(root: Path) -> tuple[int, int]:
    """How many files of a tree are still marked, and their bytes."""
    fd = os.open(root, _DIR_FLAGS)
    walk = Walk(fd)
    os.close(fd)
    files = size = 0
    seen: set[int] = set()  # (hard links: one file, several names)
    try:
        while not walk.done:
            for pfd, ino, _, n in walk.step():
                os.close(pfd)
                if ino not in seen:
                    seen.add(ino)
                    files += 1
                    size += n
    finally:
        walk.close()
    return files, size


def switch(tree: Path, live: Path, detach: bool = True) -> None:
    """Put the filled tree at the live path: detach the mount there (processes inside it keep
    it until they leave), exchange the tree with the now empty mount point in one rename, and
    remove that directory. Blocking, and never on the event loop of the mount at ``live``."""
    if detach:  # (not by stat: the mount may be this very process's)
        syscalls.umount_and_exchange(os.fsencode(live), os.fsencode(tree))
    else:
        syscalls.renameat2(-100, os.fsencode(live), -100, os.fsencode(tree), RENAME_EXCHANGE)
    os.rmdir(tree)  # (the old mount point: created empty, and nothing can be written to it)


class StateFile:
    """The daemon's progress in ``promote.json`` (written whole, by rename): ``state``
    (``building``, ``promoting``, ``promoted`` or ``failed``), ``pid``, ``files_left``,
    ``bytes_left``, ``files_done``, ``bytes_done``, ``error``, and ``rate`` (the background
    copy's bytes a second, or None; a daemon started again keeps it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"pid": os.getpid(), "state": "building", "files_left": 0,
                                     "bytes_left": 0, "files_done": 0, "bytes_done": 0,
                                     "error": None}
        self._written = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.data.update(fields)
        now = time.monotonic()
        if not force and now - self._written < 0.5:
            return
        self._written = now
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data) + "\n")
        os.replace(tmp, self.path)


def read_state(work: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((work / STATE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` runs (a zombie, one that exited unreaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
