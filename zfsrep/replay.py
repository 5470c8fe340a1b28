"""Rebuild a directory from a volume's record stream (``zfsrep replay SPOOL DEST``).

Replay applies records in sequence order to an empty directory. It is the oracle for capture
completeness: after any workload, the rebuilt tree equals the backing directory in contents,
sizes, modes, owners, mtimes, symlink targets, hard links, xattrs and entries.

Replay tracks, for every file identity, the names that link to it; a path is computed from the
parent's identity, so a renamed directory moves its whole subtree. Data for an identity that has
no name any more (written while unlinked but open) cannot reach the tree and is skipped. Every
name in a record is checked to be a single path component, so a hostile stream cannot write
outside DEST.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from zfsrep import syscalls
from zfsrep.errors import CorruptDataError, UnsafePathError, shown
from zfsrep.records import ARGS, RENAME_EXCHANGE, Op

log = logging.getLogger(__name__)


def _check_name(name: object) -> bytes:
    if (not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name
            or name in (b".", b"..")):
        raise UnsafePathError(f"record names an unsafe entry {shown(name)}")
    return name


class Replayer:
    """Applies records to a destination directory; one instance per rebuild."""

    def __init__(self, dest: Path, root_ident: int, *, max_open: int = 128) -> None:
        self.dest = os.fsencode(dest)
        self.root_ident = root_ident
        # identity -> set of (parent identity, name), and the reverse: every record must agree
        # with both, so a hostile stream cannot make an identity stand for another object.
        self.links: dict[int, set[tuple[int, bytes]]] = {}
        self.names: dict[tuple[int, bytes], int] = {}
        self.kinds: dict[int, int] = {root_ident: stat.S_IFDIR}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._max_open = max_open
        self.applied = 0

    # ---- paths ---------------------------------------------------------------------------
    def path(self, ident: int) -> bytes | None:
        if ident == self.root_ident:
            return self.dest
        links = self.links.get(ident)
        if not links:
            return None
        parent, name = next(iter(links))
        base = self.path(parent)
        return None if base is None else base + b"/" + name

    def _entry(self, parent: int, name: object) -> bytes:
        base = self.path(parent)
        if base is None or self.kinds.get(parent) != stat.S_IFDIR:
            raise CorruptDataError(f"record names unknown directory {parent}")
        return base + b"/" + _check_name(name)

    def _expect(self, ident: int | None, parent: int, name: bytes) -> None:
        """Refuse a record whose idea of the entry (parent, name) differs from the tree's."""
        actual = self.names.get((parent, name))
        if actual != ident:
            raise CorruptDataError(
                f"record says entry {shown(name)} of directory {parent} is {ident}, "
                f"but it is {actual}")

    def _add_name(self, ident: int, parent: int, name: bytes) -> None:
        self.links.setdefault(ident, set()).add((parent, name))
        self.names[(parent, name)] = ident

    def _kind(self, ident: int, want: int | None = None) -> int:
        kind = self.kinds.get(ident)
        if kind is None or (want is not None and kind != want):
            raise CorruptDataError(f"record names {ident}, which is not a live "
                                   f"{'object' if want is None else oct(want)}")
        return kind

    def _touch_dir(self, ident: int, mtime_ns: int) -> None:
        p = self.path(ident)
        if p is not None:
            os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def _fd(self, ident: int) -> int | None:
        fd = self._fds.get(ident)
        if fd is not None:
            self._fds.move_to_end(ident)
            return fd
        p = self.path(ident)
        if p is None:
            return None
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._fds[ident] = fd
        if len(self._fds) > self._max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _drop(self, ident: int) -> None:
        fd = self._fds.pop(ident, None)
        if fd is not None:
            os.close(fd)

    def _unlink_name(self, ident: int | None, parent: int, name: bytes) -> None:
        if ident is None:
            return
        self.names.pop((parent, name), None)
        links = self.links.get(ident)
        if links is not None:
            links.discard((parent, name))
            if not links:
                del self.links[ident]
                self.kinds.pop(ident, None)
                self._drop(ident)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # ---- records -----------------------------------------------------------------------
    def apply_all(self, records: Iterable[list]) -> int:
        try:
            for rec in records:
                self.apply(rec)
        finally:
            self.close()
        return self.applied

    def apply(self, rec: list) -> None:
        try:
            op = rec[2]
            handler = _HANDLERS[op]
        except (IndexError, KeyError, TypeError):
            raise CorruptDataError(f"record {rec[:3]!r}: unknown operation") from None
        try:
            handler(self, *rec[ARGS:])
        except TypeError as e:
            raise CorruptDataError(f"record {rec[0]!r}: malformed arguments ({e})") from None
        self.applied += 1

    def _new(self, parent: int, name: bytes, ident: int, mode: int, uid: int, gid: int,
             rdev: int, target: bytes | None, mtime_ns: int, parent_mtime_ns: int) -> None:
        p = self._entry(parent, name)
        if ident in self.kinds or ident == self.root_ident:
            raise CorruptDataError(f"record creates {shown(name)} as {ident}, which is still live")
        self._expect(None, parent, name)
        kind = stat.S_IFMT(mode)
        perm = stat.S_IMODE(mode)
        if kind == stat.S_IFREG:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        elif kind == stat.S_IFDIR:
            os.mkdir(p, 0o700)
        elif kind == stat.S_IFLNK:
            if not isinstance(target, bytes):
                raise CorruptDataError(f"symlink {shown(name)} without a target")
            os.symlink(target, p)
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(p, kind | 0o600, rdev)
        else:
            raise CorruptDataError(f"record creates {shown(name)} of unknown type {kind:o}")
        os.chown(p, uid, gid, follow_symlinks=False)
        if kind != stat.S_IFLNK:
            os.chmod(p, perm)
        os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        self._add_name(ident, parent, name)
        self.kinds[ident] = kind
        self._touch_dir(parent, parent_mtime_ns)

    def _link(self, ident: int, parent: int, name: bytes, parent_mtime_ns: int) -> None:
        src = self.path(ident)
        if src is None or self._kind(ident) == stat.S_IFDIR:
            raise CorruptDataError(f"link of unknown file {ident}")
        dst = self._entry(parent, name)
        self._expect(None, parent, name)
        os.link(src, dst, follow_symlinks=False)
        self._add_name(ident, parent, name)
        self._touch_dir(parent, parent_mtime_ns)

    def _remove(self, parent: int, name: bytes, ident: int, parent_mtime_ns: int) -> None:
        p = self._entry(parent, name)
        self._expect(ident, parent, name)
        if self.kinds.get(ident) == stat.S_IFDIR:
            os.rmdir(p)
        else:
            os.unlink(p)
        self._unlink_name(ident, parent, name)
        self._touch_dir(parent, parent_mtime_ns)

    def _rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                flags: int, ident: int, other: int | None, old_mtime_ns: int,
                new_mtime_ns: int) -> None:
        src = self._entry(old_parent, old_name)
        dst = self._entry(new_parent, new_name)
        self._expect(ident, old_parent, old_name)
        self._expect(other, new_parent, new_name)
        if self.kinds.get(ident) == stat.S_IFDIR and self._is_ancestor(ident, new_parent):
            raise CorruptDataError(f"record moves directory {ident} into itself")
        if flags & RENAME_EXCHANGE:
            if other is None:
                raise CorruptDataError("exchange without a second object")
            if self.kinds.get(other) == stat.S_IFDIR and self._is_ancestor(other, old_parent):
                raise CorruptDataError(f"record moves directory {other} into itself")
            syscalls.renameat2(syscalls.AT_FDCWD, src, syscalls.AT_FDCWD, dst, RENAME_EXCHANGE)
            self.links[ident].discard((old_parent, old_name))
            self.links[other].discard((new_parent, new_name))
            self._add_name(ident, new_parent, new_name)
            self._add_name(other, old_parent, old_name)
        else:
            os.rename(src, dst)
            self._unlink_name(other, new_parent, new_name)
            self.links[ident].discard((old_parent, old_name))
            self.names.pop((old_parent, old_name), None)
            self._add_name(ident, new_parent, new_name)
        self._touch_dir(old_parent, old_mtime_ns)
        self._touch_dir(new_parent, new_mtime_ns)

    def _is_ancestor(self, ident: int, node: int) -> bool:
        """Whether directory ``ident`` is ``node`` or one of its ancestors."""
        seen = 0
        while node != self.root_ident and seen < 100_000:
            if node == ident:
                return True
            links = self.links.get(node)
            if not links:
                return False
            node = next(iter(links))[0]
            seen += 1
        return node == ident

    def _write(self, ident: int, offset: int, data: bytes, digests: object,
               mtime_ns: int) -> None:
        if ident in self.kinds:
            self._kind(ident, stat.S_IFREG)
        fd = self._fd(ident)
        if fd is None:
            return  # written while unlinked: it has no name in the tree
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _truncate(self, ident: int, size: int, mtime_ns: int) -> None:
        if ident in self.kinds:
            self._kind(ident, stat.S_IFREG)
        fd = self._fd(ident)
        if fd is not None:
            os.ftruncate(fd, size)
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _fallocate(self, ident: int, mode: int, offset: int, length: int,
                   mtime_ns: int) -> None:
        if ident in self.kinds:
            self._kind(ident, stat.S_IFREG)
        fd = self._fd(ident)
        if fd is not None:
            syscalls.fallocate(fd, mode, offset, length)
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _setattr(self, ident: int, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
        p = self.path(ident)
        if p is None:
            return
        if stat.S_IFMT(mode) != self._kind(ident):
            raise CorruptDataError(f"record gives {ident} another type ({mode:o})")
        # Change only what differs: a chown that changes nothing would still clear set-id
        # bits and file capabilities, which the recorded operation did not do.
        st = os.lstat(p)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(p, uid, gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode) and (stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode)
                                       or (st.st_uid, st.st_gid) != (uid, gid)):
            os.chmod(p, stat.S_IMODE(mode))
        os.utime(p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def _setxattr(self, ident: int, name: bytes, value: bytes) -> None:
        p = self.path(ident)
        if p is not None:
            os.setxattr(p, name, value, follow_symlinks=False)

    def _removexattr(self, ident: int, name: bytes) -> None:
        p = self.path(ident)
        if p is None:
            return
        try:
            os.removexattr(p, name, follow_symlinks=False)
        except OSError as e:
            # security.capability is also removed by writes and chowns themselves.
            if e.errno != errno.ENODATA:
                raise


_HANDLERS: dict[int, Callable[..., None]] = {
    Op.NEW: Replayer._new,
    Op.LINK: Replayer._link,
    Op.REMOVE: Replayer._remove,
    Op.RENAME: Replayer._rename,
    Op.WRITE: Replayer._write,
    Op.TRUNCATE: Replayer._truncate,
    Op.SETATTR: Replayer._setattr,
    Op.SETXATTR: Replayer._setxattr,
    Op.REMOVEXATTR: Replayer._removexattr,
    Op.FALLOCATE: Replayer._fallocate,
}
