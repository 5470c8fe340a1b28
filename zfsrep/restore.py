"""File-level restore: copy a file or tree out of a checkpoint view into a local directory.

``restore_tree(view, path, dest)`` copies what ``path`` names in the view (``b"/"``: the whole
volume) with its content (holes stay holes), modes, owners, mtimes, symlinks (created, never
followed), hard links (linked again when both names are inside the restored tree), xattrs and
special files.

Safety: whatever names or symlinks the checkpoint holds, nothing is written outside DEST.
Every name from the view must be one safe path component; every object is created and changed
relative to an open directory descriptor (``openat``-style calls with ``O_NOFOLLOW``), and a
path is never resolved through anything the restore created except directories it opened
itself with ``O_NOFOLLOW | O_DIRECTORY``. Special files and symlinks are changed through
``O_PATH`` descriptors (``/proc/self/fd``), never by name. Existing files are not overwritten
without ``force``: a first pass checks the whole tree against DEST before anything is written
(UnsafePathError, nothing changed). Even with ``force`` an existing directory is never replaced
by a non-directory. Directory attributes are set after their children.

File data: from a view that hands out extents (the journal's index), bytes a pack stores as
they are are copied from the pack file inside the kernel (copy_file_range) and compressed ones
decoded, holes skipped; from any other view (``zfsrep.remoteview``) through ``read``, all-zero
blocks skipped, a long range written by a second thread while the next piece is read. The
disk writes of a long copy are started as it goes. A file of PARALLEL_MIN or more from a
view that can be reopened is split between forked processes, each with its own view and
range of the same descriptor. Progress is reported inside a large file too (every
PROGRESS_STEP; the forked copiers count theirs in memory shared with the parent), so a
failover or restore of one big file is not silent.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zfsrep import promote
from zfsrep.blockhash import zero_blocks
from zfsrep.errors import (
    CorruptDataError,
    NotFoundError,
    OSFailure,
    UnsafePathError,
    shown,
)
from zfsrep.records import BLOCK_SIZE
from zfsrep.syscalls import start_writeback
from zfsrep.view import Node, SnapshotView

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: files larger than this are read and written by two threads
PIPELINE_MIN = 8 << 20
PIPELINE_DEPTH = 8
#: files at least this large are copied by several processes (up to MAX_WORKERS)
PARALLEL_MIN = 64 << 20
#: file bytes whose extents one call of the view returns
EXTENT_SPAN = 16 << 20
#: a long copy starts the disk writes of every this many bytes at once
WRITEBACK_STEP = 16 << 20
#: ... and reports its progress every this many bytes
PROGRESS_STEP = 64 << 20
_COUNT = struct.Struct("<Q")  # a forked copier's bytes so far, in memory shared with it
MAX_WORKERS = 4
PAGE = 1024  # readdir page size
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RestoreStats:
    """What a restore wrote (``vars()`` of it is its JSON)."""

    def __init__(self) -> None:
        self.files = 0
        self.dirs = 0
        self.symlinks = 0
        self.hardlinks = 0
        self.specials = 0
        self.bytes = 0  # file data written (holes excluded)
        self.owners_skipped = 0  # chown refused (not running as root)
        self.marked = 0  # skeleton files left to fill (skeleton restores: zfsrep.promote)
        self.marked_bytes = 0


def safe_name(name: object) -> bytes:
    """``name`` if it is one path component, else UnsafePathError."""
    if (not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name
            or name in (b".", b"..") or len(name) > 255):
        raise UnsafePathError(f"checkpoint holds an unsafe name {shown(name)}")
    return name


def resolve(view: SnapshotView, path: bytes) -> tuple[Node, bytes | None]:
    """The node ``path`` names in the view and its last component (None for the root)."""
    node = view.getattr(view.root)
    name = None
    for comp in path.split(b"/"):
        if not comp:
            continue
        if comp in (b".", b"..") or b"\0" in comp:
            raise UnsafePathError(f"path {shown(path)} is not a plain path")
        if not stat.S_ISDIR(node.mode):
            raise NotFoundError(f"{shown(path)} is not in the checkpoint (a component is not a "
                                "directory; symlinks are not followed)")
        child = view.lookup(node.ident, comp)
        if child is None:
            raise NotFoundError(f"{shown(path)} is not in the checkpoint")
        node, name = child, comp
    return node, name


def _lstat_at(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _entries(view: SnapshotView, ident: int):
    after = b""
    while True:
        page = view.readdir(ident, after, PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1][0]


class _Restorer:
    def __init__(self, view: SnapshotView, force: bool,
                 progress: Callable[[RestoreStats], None] | None,
                 skeleton: bool = False) -> None:
        self.view = view
        self.force = force
        self.skeleton = skeleton
        self.progress = progress
        self.stats = RestoreStats()
        self.base_fd = -1  # directory every recorded relative path starts from
        self.links: dict[int, tuple[bytes, ...]] = {}
        self.conflicts: list[str] = []
        self.is_root = os.geteuid() == 0

    # ---- first pass: names and conflicts --------------------------------------------------
    def _check_one(self, dfd: int | None, name: bytes | None, node: Node,
                   shown: bytes) -> int | None:
        """Note a conflict at ``name``; an fd of the existing directory to descend into."""
        if dfd is None:
            return None
        st = _lstat_at(dfd, name) if name is not None else os.fstat(dfd)
        if st is None:
            return None
        if stat.S_ISDIR(node.mode) and stat.S_ISDIR(st.st_mode):
            return os.dup(dfd) if name is None else os.open(name, _DIR_FLAGS, dir_fd=dfd)
        if stat.S_ISDIR(st.st_mode) or not self.force:
            self.conflicts.append(os.fsdecode(shown))
        return None

    def check(self, dfd: int | None, name: bytes | None, node: Node, shown: bytes) -> None:
        """Walk the tree to restore against DEST (``dfd`` None: DEST has nothing there),
        checking every name and noting every conflict, before anything is written."""
        sub = self._check_one(dfd, name, node, shown)
        if not stat.S_ISDIR(node.mode):
            if sub is not None:
                os.close(sub)
            return
        stack = [(sub, _entries(self.view, node.ident), shown.rstrip(b"/"))]
        try:
            while stack:
                sfd, it, sshown = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    if sfd is not None:
                        os.close(sfd)
                    continue
                cname, child = item
                cshown = sshown + b"/" + safe_name(cname)
                csub = self._check_one(sfd, cname, child, cshown)
                if stat.S_ISDIR(child.mode):
                    stack.append((csub, _entries(self.view, child.ident), cshown))
                elif csub is not None:
                    os.close(csub)
        finally:
            for sfd, _, _ in stack:
                if sfd is not None:
                    os.close(sfd)

    # ---- second pass: writing -----------------------------------------------------------------
    def _clear_for(self, dfd: int, name: bytes, want_dir: bool) -> bool:
        """Make room for ``name`` (force only); True if an existing directory is kept."""
        st = _lstat_at(dfd, name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            if want_dir:
                return True
            raise UnsafePathError(f"{os.fsdecode(name)!r} is an existing directory")
        if not self.force:
            raise UnsafePathError(f"{os.fsdecode(name)!r} exists (use force to overwrite)")
        os.unlink(name, dir_fd=dfd)
        return False

    def _open_rel(self, comps: tuple[bytes, ...]) -> int:
        fd = os.dup(self.base_fd)
        try:
            for c in comps:
                nfd = os.open(c, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _owner(self, target: int | str | bytes, uid: int, gid: int, **kw) -> None:
        try:
            os.chown(target, uid, gid, **kw)
        except PermissionError:
            if self.is_root:
                raise
            self.stats.owners_skipped += 1

    def _xattrs(self, ident: int, target: int | str) -> None:
        for xname in self.view.listxattr(ident):
            value = self.view.getxattr(ident, xname)
            if value is not None:
                os.setxattr(target, xname, value)

    def _finish_fd(self, fd: int, node: Node) -> None:
        """Owner, mode, xattrs and times of an object open as ``fd``."""
        self._owner(fd, node.uid, node.gid)
        os.chmod(fd, stat.S_IMODE(node.mode))
        self._xattrs(node.ident, fd)
        os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress(self.stats)

    def write_leaf(self, dfd: int, name: bytes, node: Node, rel: tuple[bytes, ...]) -> None:
        self._clear_for(dfd, name, False)
        kind = stat.S_IFMT(node.mode)
        first = self.links.get(node.ident)
        if first is not None:
            pfd = self._open_rel(first[:-1])
            try:
                os.link(first[-1], name, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(pfd)
            self.stats.hardlinks += 1
            self._tick()
            return
        if kind == stat.S_IFREG:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                if not self.skeleton:
                    self._copy(node, fd)
                elif node.size:  # the size now, the data later (zfsrep.promote)
                    os.ftruncate(fd, node.size)
                    promote.mark(fd, node.ident)
                    self.stats.marked += 1
                    self.stats.marked_bytes += node.size
                self._finish_fd(fd, node)
            finally:
                os.close(fd)
            self.stats.files += 1
        elif kind == stat.S_IFLNK:
            os.symlink(self.view.readlink(node.ident), name, dir_fd=dfd)
            self._owner(name, node.uid, node.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dfd,
                     follow_symlinks=False)
            self.stats.symlinks += 1
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(name, kind | 0o600, node.rdev, dir_fd=dfd)
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                if stat.S_IFMT(os.fstat(pfd).st_mode) != kind:
                    raise UnsafePathError(f"{os.fsdecode(name)!r} changed while restoring")
                proc = f"/proc/self/fd/{pfd}"
                self._owner(proc, node.uid, node.gid)
                os.chmod(proc, stat.S_IMODE(node.mode))
                self._xattrs(node.ident, proc)
                os.utime(proc, ns=(node.mtime_ns, node.mtime_ns))
            finally:
                os.close(pfd)
            self.stats.specials += 1
        else:
            raise UnsafePathError(f"checkpoint holds {shown(name)} of unknown type {node.mode:o}")
        if node.nlink > 1:
            self.links[node.ident] = rel
        self._tick()

    def _copy(self, node: Node, fd: int) -> None:
        """File data, holes (all-zero blocks) left unwritten. A large file from a view that
        can be reopened in another process (the journal's index) is copied by several
        processes, each its own range: the copy is bound by the CPU, not the disk."""
        size = node.size
        workers = 1
        if size >= PARALLEL_MIN and hasattr(self.view, "reopen"):
            workers = max(1, min(MAX_WORKERS, 2 * (os.cpu_count() or 1),
                                 size // PARALLEL_MIN * 2))
        base = self.stats.bytes
        if workers > 1:
            self._copy_parallel(node, fd, workers)
        else:
            written = _copy_range(self.view, node.ident, fd, 0, size,
                                  lambda n: self._tick_within(base + n))
            self.stats.bytes = base + written
        os.ftruncate(fd, size)

    def _tick_within(self, nbytes: int) -> None:
        """Progress inside a large file: ``stats.bytes`` counts what is copied of it so far
        (the exact count is set when the file is done)."""
        self.stats.bytes = nbytes
        self._tick()

    def _copy_parallel(self, node: Node, fd: int, workers: int) -> None:
        step = -(-node.size // workers // CHUNK) * CHUNK
        children: list[tuple[int, int]] = []
        base = self.stats.bytes
        # each child's bytes copied so far, in memory shared with it, for progress
        counts = mmap.mmap(-1, 8 * workers)

        def progress(n: int) -> None:  # (this process's own range, the first)
            self._tick_within(base + n + sum(_COUNT.unpack_from(counts, 8 * i)[0]
                                             for i in range(1, workers)))

        try:
            for i, lo in enumerate(range(step, node.size, step), 1):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child copies lo..lo+step with its own view, then exits
                    code = 1
                    try:
                        os.close(r)
                        view = self.view.reopen()  # type: ignore[attr-defined]
                        n = _copy_range(view, node.ident, fd, lo, min(node.size, lo + step),
                                        functools.partial(_COUNT.pack_into, counts, 8 * i))
                        os.write(w, b"%d" % n)
                        code = 0
                    except BaseException as e:
                        with contextlib.suppress(BaseException):
                            os.write(w, b"E" + str(e).encode(errors="replace")[:1000])
                    finally:
                        os._exit(code)
                os.close(w)
                children.append((pid, r))
            copied = _copy_range(self.view, node.ident, fd, 0, step, progress)
        finally:
            problems = []
            for pid, r in children:
                _, status = os.waitpid(pid, 0)
                with os.fdopen(r, "rb") as f:
                    said = f.read()
                if status == 0 and said.isdigit():
                    base += int(said)
                else:
                    problems.append(said[1:].decode(errors="replace") or f"status {status}")
            counts.close()
            if problems:
                raise OSFailure(f"copying {node.ident} failed: {problems[0]}")
        self.stats.bytes = base + copied

    def write_tree(self, dfd: int, name: bytes | None, node: Node,
                   rel: tuple[bytes, ...]) -> None:
        """Restore ``node`` as ``name`` in ``dfd`` (``name`` None: into ``dfd`` itself)."""
        if not stat.S_ISDIR(node.mode):
            assert name is not None
            self.write_leaf(dfd, name, node, rel)
            return
        # Each frame: [fd, node, rel, entries iterator]
        stack: list[list] = []

        def enter(parent_fd: int, dname: bytes | None, dnode: Node,
                  drel: tuple[bytes, ...]) -> None:
            if dname is None:
                fd = os.dup(parent_fd)
            else:
                if not self._clear_for(parent_fd, dname, True):
                    os.mkdir(dname, 0o700, dir_fd=parent_fd)
                fd = os.open(dname, _DIR_FLAGS, dir_fd=parent_fd)
            stack.append([fd, dnode, drel, _entries(self.view, dnode.ident)])

        enter(dfd, name, node, rel)
        try:
            while stack:
                fd, dnode, drel, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    try:
                        self._finish_fd(fd, dnode)
                    finally:
                        os.close(fd)
                    self.stats.dirs += 1
                    self._tick()
                    continue
                cname, child = item
                safe_name(cname)
                if stat.S_ISDIR(child.mode):
                    enter(fd, cname, child, (*drel, cname))
                else:
                    self.write_leaf(fd, cname, child, (*drel, cname))
        finally:
            for frame in stack:
                os.close(frame[0])


def _copy_range(view: SnapshotView, ident: int, fd: int, lo: int, hi: int,
                progress: Callable[[int], None] | None = None) -> int:
    """Copy bytes lo..hi of file ``ident`` to ``fd``, holes left unwritten; the bytes
    written. From a view that reads (no extents) a long range is written by a second
    thread while the next piece is read; ``progress(n)`` is told the bytes handed to it so
    far, every PROGRESS_STEP."""
    if hasattr(view, "extents"):
        return _copy_extents(view, ident, fd, lo, hi, progress)
    pieces = _read_pieces(view, ident, lo, hi)

    def write(at: int, data: bytes | memoryview) -> int:
        return _write_nonzero(fd, data, at)

    if hi - lo <= PIPELINE_MIN:
        return sum(write(at, data) for at, data in pieces)
    chunks: queue.Queue[tuple[int, bytes | memoryview] | None] = queue.Queue(
        maxsize=PIPELINE_DEPTH)
    failed: list[BaseException] = []
    total = [0]

    def write_chunks() -> None:
        flushed = lo
        while (item := chunks.get()) is not None:
            if not failed:
                try:
                    total[0] += write(*item)
                    done = item[0] + len(item[1])
                    if done - flushed >= WRITEBACK_STEP:  # (as cp's writes get the kernel's
                        start_writeback(fd, flushed, done - flushed)  # background flush)
                        flushed = done
                except BaseException as e:  # raised by the reading thread
                    failed.append(e)

    writer = threading.Thread(target=write_chunks, name="restore-writer", daemon=True)
    writer.start()
    handed = told = 0
    try:
        for piece in pieces:
            if failed:
                break
            chunks.put(piece)
            handed += len(piece[1])
            if progress is not None and handed - told >= PROGRESS_STEP:
                progress(handed)
                told = handed
    finally:
        chunks.put(None)
        writer.join()
    if failed:
        raise failed[0]
    return total[0]


def _copy_extents(view: Any, ident: int, fd: int, lo: int, hi: int,
                  progress: Callable[[int], None] | None) -> int:
    """Copy bytes lo..hi of file ``ident`` from a view that hands out extents: what a pack
    holds as it is goes from the pack file to ``fd`` inside the kernel (copy_file_range, one
    copy from page cache to page cache, as ``cp`` does, instead of a read into a buffer and a
    write out of it: about half the CPU time), decoded extents are written, holes left out.
    Where the kernel cannot copy between the two files (another file system type, an old
    kernel) the bytes go through a buffer instead. The bytes written."""
    done = flushed = told = 0
    kernel = True
    buf = bytearray(0)
    off = lo
    while off < hi:
        n = min(EXTENT_SPAN, hi - off)
        for at, length, pack_no, src in view.extents(ident, off, n):
            if pack_no is None:
                _pwrite_all(fd, src, at)
            else:
                pack_fd = view.pack_fd(pack_no)
                copied = _kernel_copy(pack_fd, src, fd, at, length) if kernel else 0
                if copied < length:
                    kernel = False
                    buf = buf or bytearray(CHUNK)
                    _buffered_copy(pack_fd, src + copied, fd, at + copied, length - copied,
                                   buf)
            done += length
        off += n
        if off - lo - flushed >= WRITEBACK_STEP:  # (as cp's writes get the kernel's
            start_writeback(fd, lo + flushed, off - lo - flushed)  # background flush)
            flushed = off - lo
        if progress is not None and done - told >= PROGRESS_STEP:
            progress(done)
            told = done
    return done


#: errors of copy_file_range that mean "not between these two files"
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


def _kernel_copy(src_fd: int, src: int, fd: int, at: int, length: int) -> int:
    """copy_file_range ``length`` bytes from ``src_fd`` at ``src`` to ``fd`` at ``at``; the
    bytes copied, fewer only when the kernel refuses for one of _NO_KERNEL_COPY's reasons."""
    copied = 0
    while copied < length:
        try:
            got = os.copy_file_range(src_fd, fd, length - copied, src + copied, at + copied)
        except OSError as e:
            if e.errno in _NO_KERNEL_COPY:
                return copied
            raise
        if got == 0:
            raise CorruptDataError("a pack file ends inside a block it should hold")
        copied += got
    return copied


def _buffered_copy(src_fd: int, src: int, fd: int, at: int, length: int,
                   buf: bytearray) -> None:
    while length > 0:
        got = os.preadv(src_fd, [memoryview(buf)[:min(len(buf), length)]], src)
        if not got:
            raise CorruptDataError("a pack file ends inside a block it should hold")
        _pwrite_all(fd, memoryview(buf)[:got], at)
        src, at, length = src + got, at + got, length - got


def _read_pieces(view: SnapshotView, ident: int, lo: int, hi: int
                 ) -> Iterator[tuple[int, bytes]]:
    off = lo
    while off < hi:
        data = view.read(ident, off, min(CHUNK, hi - off))
        if not data:
            return
        yield off, data
        off += len(data)


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        w = os.pwrite(fd, view, at)
        view, at = view[w:], at + w


def _write_nonzero(fd: int, data: bytes | memoryview, off: int) -> int:
    """Write the blocks of ``data`` that are not all zeros at ``off``; the bytes written."""
    n = len(data)
    mv = memoryview(data)
    written = 0
    start = 0  # first block of the current run
    for z in (*zero_blocks(data, BLOCK_SIZE), -(-n // BLOCK_SIZE)):
        if z > start:
            chunk = mv[start * BLOCK_SIZE:min(z * BLOCK_SIZE, n)]
            _pwrite_all(fd, chunk, off + start * BLOCK_SIZE)
            written += len(chunk)
        start = z + 1
    return written


def restore_tree(view: SnapshotView, path: bytes, dest: Path, *, force: bool = False,
                 progress: Callable[[RestoreStats], None] | None = None,
                 skeleton: bool = False) -> RestoreStats:
    """Copy the file or tree at ``path`` in ``view`` to ``dest`` (see the module docstring).
    With ``skeleton``, regular files get their size and a mark but no data
    (``zfsrep.promote`` fills them).

    ``b"/"`` restores the whole volume into ``dest`` (created if missing). Any other path
    restores as ``dest/<basename>`` if ``dest`` is an existing directory, else as ``dest``.
    """
    node, name = resolve(view, path)
    dest = Path(dest)
    packs = getattr(view, "packs", None)
    if packs is not None:
        packs.sequential = True
    r = _Restorer(view, force, progress, skeleton)
    try:
        if name is None:
            parent, tname = dest, None
            if dest.exists() and not dest.is_dir():
                raise UnsafePathError(f"{dest} exists and is not a directory")
        elif dest.is_dir():
            parent, tname = dest, name
        else:
            parent, tname = dest.parent, safe_name(os.fsencode(dest.name))
        try:
            pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if tname is not None or not dest.parent.is_dir():
                raise NotFoundError(f"directory {parent} does not exist") from None
            pfd = -1  # the whole volume into a DEST that does not exist yet
        try:
            r.check(pfd if pfd >= 0 else None, tname, node, path or b"/")
            if r.conflicts:
                more = f" and {len(r.conflicts) - 3} more" if len(r.conflicts) > 3 else ""
                raise UnsafePathError("refusing to overwrite existing "
                                      f"{', '.join(r.conflicts[:3])}{more} (use force)")
            if pfd < 0:
                os.mkdir(dest, 0o700)
                pfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            r.base_fd = pfd
            r.write_tree(pfd, tname, node, () if tname is None else (tname,))
        finally:
            if pfd >= 0:
                os.close(pfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            raise UnsafePathError(f"restore refused: {e}") from None
        raise OSFailure(f"restore into {dest} failed: {e}") from None
    return r.stats
