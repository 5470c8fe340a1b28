"""Promotion: a recovered volume that is usable before its data is copied.

A live failover (or a move) does not copy every volume before it returns. It writes the
volume's *skeleton* at the checkpoint (directories, names, symlinks, hard links, special
files, owners, modes, times, xattrs, and every regular file at its size but with no data)
into a work tree, and serves that tree through a mount at the live path
(``zfsrep.mountd.promote``) while the data is copied in behind it from the journal's index:
the reference product's *promotion* of journal data into the recovered volume.

The on-disk state is the skeleton itself: a regular file whose data is not yet copied carries
the extended attribute ``MARKER`` (its identity in the view). The mount never shows it. Filling
a file copies its data from the view, restores the times it had before, makes the data durable,
then removes the marker and makes that durable too; only then may the file change. A daemon
that stops half-way is started again over the same tree and goes on with the files still
marked. When no file is marked the tree replaces the mount at the live path (``switch``): the
mount is detached, the tree and the mount point are exchanged in one rename, and what is left
is a plain directory.
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

#: the extended attribute of a file whose data is not yet copied (value: the view identity)
MARKER = b"trusted.zfsrep.promote"
_IDENT = struct.Struct("<Q")
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_EXCHANGE = 2
MNT_DETACH = 2

#: Files and names of a promotion's work directory (``DIR/.work/live/VOLUME``).
TREE = "tree"        # the skeleton, filled as it is served; exchanged into the live path
BUILDING = "tree.partial"  # a skeleton being written (removed and written again if found)
STATE = "promote.json"     # the daemon's progress, for the commands that wait on it
LOG = "promote.log"


def mark(fd: int, ident: int) -> None:
    """Mark the skeleton file open as ``fd`` as not yet filled from view identity ``ident``."""
    os.setxattr(fd, MARKER, _IDENT.pack(ident))


def marked(target: int | str | bytes) -> int | None:
    """The view identity a skeleton file is to be filled from, or None once it is filled."""
    try:
        value = os.getxattr(target, MARKER)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    if len(value) != _IDENT.size:
        return None
    return _IDENT.unpack(value)[0]


def fill(view: Any, target: str | bytes, ident: int, *, durable: bool = True) -> int:
    """Copy the data of file ``ident`` from ``view`` into the skeleton file at ``target`` (a
    path, usually ``/proc/self/fd/N`` of an O_PATH descriptor), keep the times it had, and
    clear its mark. The bytes written. Blocking: call it from a thread."""
    from zfsrep.restore import _copy_range

    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", target)
        written = _copy_range(view, ident, fd, 0, st.st_size)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if durable:
            os.fdatasync(fd)  # the data first: a mark cleared must mean the data is there
        os.removexattr(fd, MARKER)
        if durable:
            os.fsync(fd)
        return written
    finally:
        os.close(fd)


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
        syscalls.umount(live, MNT_DETACH)
    syscalls.renameat2(-100, os.fsencode(live), -100, os.fsencode(tree), RENAME_EXCHANGE)
    os.rmdir(tree)  # (the old mount point: created empty, and nothing can be written to it)


class StateFile:
    """The daemon's progress in ``promote.json`` (written whole, by rename): ``state``
    (``building``, ``promoting``, ``promoted`` or ``failed``), ``pid``, ``files_left``,
    ``bytes_left``, ``files_done``, ``bytes_done``, ``error``."""

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
