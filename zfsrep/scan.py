"""Initial scan: the records that build an existing backing tree from nothing.

When a directory that already holds data is protected for the first time, its whole content is
recorded (parents before children, data in chunks, holes skipped, hard links as links, xattrs,
then each object's final attributes, directories after their children) before the mount
serves any request, so the stream alone rebuilds the directory.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from zfsrep.records import Op

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass
class ScanProgress:
    entries: int = 0
    bytes: int = 0
    total_bytes: int | None = None  # set by count_tree() when known beforehand
    done: bool = False


class _Scanner:
    def __init__(self, recorder, progress_every: float,
                 progress: ScanProgress | None = None,
                 report: Callable[[ScanProgress], None] | None = None,
                 what: str = "initial sync") -> None:
        self.rec = recorder
        self._what = what
        self.seen: set[int] = set()
        self.progress = progress if progress is not None else ScanProgress()
        self._progress_every = progress_every
        self._report = report
        self._last_report = time.monotonic()

    async def _room(self) -> None:
        if self.rec.over_limit:
            await self.rec.wait_for_room()
        now = time.monotonic()
        if now - self._last_report >= self._progress_every:
            self._last_report = now
            if self._report is not None:
                self._report(self.progress)
            p = self.progress
            if p.total_bytes:
                log.info("%s: %d entries, %d of %d MiB (%.0f%%)", self._what, p.entries,
                         p.bytes >> 20, p.total_bytes >> 20, 100.0 * p.bytes / p.total_bytes)
            else:
                log.info("%s: %d entries, %d MiB", self._what, p.entries, p.bytes >> 20)

    async def file_data(self, fd: int, ident: int, size: int, mtime_ns: int) -> None:
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < end:
                data = os.pread(fd, min(CHUNK, end - offset), offset)
                if not data:
                    return
                self.rec.emit_write(ident, offset, data, mtime_ns)
                offset += len(data)
                self.progress.bytes += len(data)
                await self._room()

    def xattrs(self, proc_path: bytes, ident: int) -> None:
        """Record the xattrs of an open file or directory (``/proc/self/fd/N``)."""
        for name in os.listxattr(proc_path):
            value = os.getxattr(proc_path, name)
            self.rec.emit(Op.SETXATTR, ident, os.fsencode(name), value)

    async def directory(self, dir_fd: int, dir_ident: int, dir_st: os.stat_result) -> None:
        for name in sorted(os.listdir(b"/proc/self/fd/%d" % dir_fd)):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self.progress.entries += 1
            ident = st.st_ino
            if ident in self.seen:
                self.rec.emit(Op.LINK, ident, dir_ident, name, dir_st.st_mtime_ns)
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                self.seen.add(ident)
            kind = stat.S_IFMT(st.st_mode)
            target = os.readlink(name, dir_fd=dir_fd) if kind == stat.S_IFLNK else None
            self.rec.emit(Op.NEW, dir_ident, name, ident, st.st_mode, st.st_uid, st.st_gid,
                          st.st_rdev, target, st.st_mtime_ns, dir_st.st_mtime_ns)
            if kind == stat.S_IFREG:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    if st.st_size:
                        self.rec.emit(Op.TRUNCATE, ident, st.st_size, st.st_mtime_ns)
                    await self.file_data(fd, ident, st.st_size, st.st_mtime_ns)
                    self.xattrs(b"/proc/self/fd/%d" % fd, ident)
                finally:
                    os.close(fd)
            elif kind == stat.S_IFDIR:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=dir_fd)
                try:
                    self.xattrs(b"/proc/self/fd/%d" % fd, ident)
                    await self.directory(fd, ident, st)
                finally:
                    os.close(fd)
            await self._room()
            self.rec.emit(Op.SETATTR, ident, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)


def count_tree(source: str) -> int:
    """Bytes of data the initial scan will read (regular files, each hard-linked one once),
    for progress reports. Metadata only; run it in a thread."""
    total = 0
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


async def scan_tree(source: str, recorder, *, progress_every: float = 5.0,
                    progress: ScanProgress | None = None,
                    report: Callable[[ScanProgress], None] | None = None) -> ScanProgress:
    """Record the whole tree under ``source`` (its root included) through ``recorder``."""
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        scanner = _Scanner(recorder, progress_every, progress, report)
        scanner.xattrs(b"/proc/self/fd/%d" % fd, st.st_ino)
        await scanner.directory(fd, st.st_ino, st)
        recorder.emit(Op.SETATTR, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    finally:
        os.close(fd)
    scanner.progress.done = True
    return scanner.progress


def find_idents(source: str, idents: set[int]) -> dict[int, str]:
    """A path under ``source`` (itself included) for each of ``idents`` (inode numbers) that
    is still in the tree; a walk of names only, stopped once all are found. Run it in a
    thread."""
    found: dict[int, str] = {}
    want = set(idents)
    root = os.lstat(source).st_ino
    if root in want:
        found[root] = source
        want.discard(root)
    stack = [source]
    while stack and want:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:  # gone meanwhile, or unreadable: nothing of it can be recorded
            continue
        for entry in entries:
            try:
                ino = entry.inode()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if ino in want:
                found[ino] = entry.path
                want.discard(ino)
            if is_dir:
                stack.append(entry.path)
    return found


async def record_again(paths: dict[int, str], recorder, *,
                       progress: ScanProgress | None = None,
                       report: Callable[[ScanProgress], None] | None = None) -> None:
    """Record the current content and attributes of the objects at ``paths`` (ident -> path)
    as they are now, over whatever the stream said of them before: each regular file is
    truncated to nothing, extended to its size and its data written again (holes stay
    holes), then every object gets its attributes. This repairs a spool that lost a daemon's
    last changes of file data or attributes (the names and xattrs must be intact)."""
    scanner = _Scanner(recorder, 1.0, progress, report, what="resync")
    for ident, path in sorted(paths.items()):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:  # a symlink (ELOOP), a socket, or gone: its attributes only
            fd = -1
        try:
            st = os.fstat(fd) if fd >= 0 else os.lstat(path)
            if stat.S_ISREG(st.st_mode) and fd >= 0:
                recorder.emit(Op.TRUNCATE, ident, 0, st.st_mtime_ns)
                if st.st_size:
                    recorder.emit(Op.TRUNCATE, ident, st.st_size, st.st_mtime_ns)
                await scanner.file_data(fd, ident, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
        scanner.progress.entries += 1
        recorder.emit(Op.SETATTR, ident, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        await scanner._room()
