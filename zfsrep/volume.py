"""The protected volume's backing directory: every operation of the mount, done on the real
directory through file descriptors, and recorded in completion order.

This is the core of the passthrough mount; it knows nothing of FUSE. ``mountd.passthrough``
translates kernel requests into calls here. Objects are held by ``O_PATH`` descriptors (never by
path), so renames of ancestors, hard links and unlinked-but-open files need no bookkeeping.

Each mutating method performs its system call and, with no await in between, hands the record
to the :class:`Recorder`; records are therefore in the order the backing filesystem completed
the operations. Methods raise ``OSError`` with the backing filesystem's errno.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from typing import Protocol

from zfsrep import syscalls
from zfsrep.records import RENAME_EXCHANGE, RENAME_NOREPLACE, Op

ROOT_NODE = 1
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT
_SETID = stat.S_ISUID | stat.S_ISGID


class Recorder(Protocol):
    """Where the volume's records go (``zfsrep.capture.CaptureStream`` or a test fake)."""

    def emit(self, op: int, *args: object) -> None: ...

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None: ...


class NullRecorder:
    """A recorder that records nothing (``zfsrep protect --no-capture``, benchmarks, the
    promotion mount)."""

    over_limit = False
    last_seq = 0

    def emit(self, op: int, *args: object) -> None:
        pass

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        pass

    async def wait_for_room(self) -> None:
        pass


class Inode:
    """An object of the backing tree known to the kernel, held by an O_PATH descriptor."""

    __slots__ = ("node", "ident", "fd", "nlookup", "is_symlink", "proc", "gen")

    def __init__(self, node: int, ident: int, fd: int, is_symlink: bool, gen: int = 0) -> None:
        self.node = node
        self.gen = gen  # the volume's generation when the kernel last reached it
        self.ident = ident
        self.fd = fd
        self.nlookup = 0
        self.is_symlink = is_symlink
        self.proc = b"/proc/self/fd/%d" % fd


class OpenFile:
    __slots__ = ("fd", "inode", "uid")

    def __init__(self, fd: int, inode: Inode, uid: int = 0) -> None:
        self.fd = fd
        self.inode = inode
        self.uid = uid  # the opener: writes by an unprivileged opener clear set-id bits


class OpenDir:
    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: list[bytes] | None = None


def node_of(ident: int) -> int:
    """The kernel node id of a backing inode number (1 is reserved for the volume root)."""
    return ident if ident != ROOT_NODE else (1 << 63) | ident


class BackingVolume:
    """The backing directory of one protected volume, as seen through the mount."""

    def __init__(self, source: str, recorder: Recorder, *, writeback: bool = True) -> None:
        fd = os.open(source, _PATH_FLAGS | os.O_DIRECTORY)
        st = os.fstat(fd)
        self.source = source
        self.recorder = recorder
        self.writeback = writeback
        self.root = Inode(ROOT_NODE, st.st_ino, fd, False)
        self.root.nlookup = 1
        self._nodes: dict[int, Inode] = {ROOT_NODE: self.root}
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_dir_handle = 1
        #: a name in the root that the mount does not show (a restore in place keeps its
        #: trees there: mountd.inplace); None when there is none
        self.hidden: bytes | None = None
        #: bumped when a restore in place replaces the tree (retire_tree): objects the kernel
        #: reached before then answer ESTALE until reached again from the root
        self.generation = 0
        #: Handles released outside Python (the mount's C fast path answers RELEASE and
        #: leaves the closing to this side): a callable returning them, or None. They are
        #: closed before anything opens or counts open files (collect_released).
        self.released: Callable[[], list[int]] | None = None
        #: Called when the tree is replaced (retire_tree), or None.
        self.on_retire: Callable[[], None] | None = None

    # ---- inode table -------------------------------------------------------------------
    def inode(self, node: int) -> Inode:
        return self._nodes[node]

    def _live(self, node: int) -> Inode:
        """The object ``node``, unless a restore in place replaced the tree it was in."""
        inode = self._nodes[node]
        if inode.gen != self.generation:
            raise OSError(errno.ESTALE, "the tree was replaced by a restore in place")
        return inode

    def retire_tree(self) -> None:
        """The backing tree was swapped (mountd.inplace): every object the kernel reached
        before is stale (a process's working directory in the old tree must not change the
        new one) until a lookup from the root reaches it again."""
        self.generation += 1
        self.root.gen = self.generation
        if self.on_retire is not None:
            self.on_retire()

    def _remember(self, fd: int, st: os.stat_result) -> Inode:
        """Take ownership of ``fd`` (O_PATH) for the object ``st`` and count one lookup."""
        node = node_of(st.st_ino) if st.st_ino != self.root.ident else ROOT_NODE
        inode = self._nodes.get(node)
        if inode is None:
            inode = Inode(node, st.st_ino, fd, stat.S_ISLNK(st.st_mode), self.generation)
            self._nodes[node] = inode
        else:
            os.close(fd)
            inode.gen = self.generation  # reached again (through a live parent)
        inode.nlookup += 1
        return inode

    def _enter(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._remember(fd, st), st

    def forget(self, items: Iterable[tuple[int, int]]) -> list[int]:
        """Drop kernel lookups; returns the nodes no longer known (their descriptors are
        closed)."""
        dropped = []
        for node, count in items:
            inode = self._nodes.get(node)
            if inode is None:
                continue
            inode.nlookup -= count
            if inode.nlookup <= 0 and node != ROOT_NODE:
                del self._nodes[node]
                os.close(inode.fd)
                dropped.append(node)
        return dropped

    def close(self) -> None:
        self.collect_released()
        for fh in list(self._files):
            self.release(fh)
        for inode in self._nodes.values():
            os.close(inode.fd)
        self._nodes.clear()

    # ---- lookups and attributes --------------------------------------------------------
    def _visible(self, parent: Inode, name: bytes, creating: bool = False) -> None:
        """Refuse the hidden name of the root: it does not exist, and cannot be made."""
        if self.hidden is not None and parent is self.root and name == self.hidden:
            if creating:
                raise PermissionError(errno.EPERM, "name reserved by a restore in place")
            raise FileNotFoundError(errno.ENOENT, "no such entry")

    def lookup(self, parent_node: int, name: bytes) -> tuple[Inode, os.stat_result]:
        parent = self._live(parent_node)
        if name == b".." and parent is self.root:
            name = b"."
        self._visible(parent, name)
        return self._enter(parent, name)

    def getattr(self, node: int) -> os.stat_result:
        return os.fstat(self._live(node).fd)

    def setattr(self, node: int, fh: int | None, *, size: int | None = None,
                mode: int | None = None, uid: int | None = None, gid: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None,
                caller_uid: int = 0) -> os.stat_result:
        inode = self._live(node)
        of = self._files.get(fh) if fh is not None else None
        rec = self.recorder
        if size is not None:
            if of is not None:
                os.ftruncate(of.fd, size)
            else:
                os.truncate(inode.proc, size)
            st = os.fstat(inode.fd)
            rec.emit(Op.TRUNCATE, inode.ident, size, st.st_mtime_ns)
            if caller_uid != 0 and mode is None and st.st_mode & _SETID:
                self._drop_setid(inode, st)
        changed = False
        if uid is not None or gid is not None:
            uid_ = -1 if uid is None else uid
            gid_ = -1 if gid is None else gid
            if inode.is_symlink:
                syscalls.lchown_fd(inode.fd, uid_, gid_)
            else:
                os.chown(inode.proc, uid_, gid_)
            changed = True
        if mode is not None:
            os.chmod(inode.proc, stat.S_IMODE(mode))
            changed = True
        if atime_ns is not None or mtime_ns is not None:
            syscalls.lutimens_fd(inode.fd, atime_ns, mtime_ns)
            changed = True
        st = os.fstat(inode.fd)
        if changed:
            rec.emit(Op.SETATTR, inode.ident, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        return st

    def readlink(self, node: int) -> bytes:
        return os.readlink(b"", dir_fd=self._live(node).fd)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.root.proc)

    # ---- creating and removing names ---------------------------------------------------
    def _adopt(self, parent: Inode, name: bytes, fd: int | None, mode: int, uid: int,
               gid: int) -> os.stat_result:
        """Give a new object the owner a non-root caller gets on the backing directory.

        The daemon creates as root; the backing filesystem already applied set-group-id
        directory inheritance, so the group is the parent's there and the caller's elsewhere.
        Returns the parent's attributes after the operation.
        """
        pst = os.fstat(parent.fd)
        if uid == 0 and gid == 0:
            return pst
        owner_gid = pst.st_gid if pst.st_mode & stat.S_ISGID else gid
        if fd is not None:
            os.fchown(fd, uid, owner_gid)
        else:
            os.chown(name, uid, owner_gid, dir_fd=parent.fd, follow_symlinks=False)
        if mode & _SETID and stat.S_ISREG(mode):
            # chown cleared the set-id bits: put back the requested mode (the kernel already
            # removed set-group-id for a caller outside the file's group).
            os.chmod(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        return pst

    def _new(self, parent: Inode, name: bytes, fd: int | None, mode: int, uid: int, gid: int,
             rdev: int = 0, target: bytes | None = None) -> tuple[Inode, os.stat_result]:
        # (the create methods check the hidden name before they touch the directory)
        pst = self._adopt(parent, name, fd, mode, uid, gid)
        inode, st = self._enter(parent, name)
        self.recorder.emit(Op.NEW, parent.ident, name, inode.ident, st.st_mode, st.st_uid,
                           st.st_gid, rdev, target, st.st_mtime_ns, pst.st_mtime_ns)
        return inode, st

    def mkdir(self, parent_node: int, name: bytes, mode: int, uid: int, gid: int,
              umask: int) -> tuple[Inode, os.stat_result]:
        parent = self._live(parent_node)
        self._visible(parent, name, True)
        mode = stat.S_IMODE(mode) & ~umask
        os.mkdir(name, mode, dir_fd=parent.fd)
        return self._new(parent, name, None, stat.S_IFDIR | mode, uid, gid)

    def mknod(self, parent_node: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              umask: int) -> tuple[Inode, os.stat_result]:
        parent = self._live(parent_node)
        self._visible(parent, name, True)
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~umask)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return self._new(parent, name, None, mode, uid, gid, rdev)

    def symlink(self, parent_node: int, name: bytes, target: bytes, uid: int,
                gid: int) -> tuple[Inode, os.stat_result]:
        parent = self._live(parent_node)
        self._visible(parent, name, True)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._new(parent, name, None, stat.S_IFLNK | 0o777, uid, gid, 0, target)

    def create(self, parent_node: int, name: bytes, mode: int, flags: int, uid: int, gid: int,
               umask: int) -> tuple[int, Inode, os.stat_result]:
        self.collect_released()
        parent = self._live(parent_node)
        self._visible(parent, name, True)
        mode = stat.S_IMODE(mode) & ~umask
        flags = self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(name, flags, mode, dir_fd=parent.fd)
        try:
            inode, st = self._new(parent, name, fd, stat.S_IFREG | mode, uid, gid)
        except BaseException:
            os.close(fd)
            raise
        self._files[fd] = OpenFile(fd, inode, uid)
        return fd, inode, st

    def link(self, node: int, new_parent_node: int, new_name: bytes
             ) -> tuple[Inode, os.stat_result]:
        inode = self._live(node)
        parent = self._live(new_parent_node)
        self._visible(parent, new_name, True)
        os.link(inode.proc, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        inode.nlookup += 1
        st = os.fstat(inode.fd)
        self.recorder.emit(Op.LINK, inode.ident, parent.ident, new_name,
                           os.fstat(parent.fd).st_mtime_ns)
        return inode, st

    def _remove(self, parent_node: int, name: bytes, is_dir: bool) -> None:
        parent = self._live(parent_node)
        self._visible(parent, name)
        ident = os.stat(name, dir_fd=parent.fd, follow_symlinks=False).st_ino
        if is_dir:
            os.rmdir(name, dir_fd=parent.fd)
        else:
            os.unlink(name, dir_fd=parent.fd)
        self.recorder.emit(Op.REMOVE, parent.ident, name, ident,
                           os.fstat(parent.fd).st_mtime_ns)

    def unlink(self, parent_node: int, name: bytes) -> None:
        self._remove(parent_node, name, False)

    def rmdir(self, parent_node: int, name: bytes) -> None:
        self._remove(parent_node, name, True)

    def rename(self, old_parent_node: int, old_name: bytes, new_parent_node: int,
               new_name: bytes, flags: int) -> None:
        old = self._live(old_parent_node)
        new = self._live(new_parent_node)
        self._visible(old, old_name)
        self._visible(new, new_name, True)
        ident = os.stat(old_name, dir_fd=old.fd, follow_symlinks=False).st_ino
        try:
            other: int | None = os.stat(new_name, dir_fd=new.fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            other = None
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(22, "unsupported rename flags")
        if flags:
            syscalls.renameat2(old.fd, old_name, new.fd, new_name, flags)
        else:
            os.rename(old_name, new_name, src_dir_fd=old.fd, dst_dir_fd=new.fd)
        if other == ident:  # rename onto a hard link of itself does nothing
            return
        self.recorder.emit(Op.RENAME, old.ident, old_name, new.ident, new_name, flags, ident,
                           other, os.fstat(old.fd).st_mtime_ns, os.fstat(new.fd).st_mtime_ns)

    # ---- files ---------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        flags &= ~_OPEN_STRIP
        if self.writeback:
            # The kernel's writeback cache reads pages to fill partial writes and computes
            # append offsets itself: the backing descriptor must be readable and not O_APPEND.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags | os.O_CLOEXEC

    def collect_released(self) -> None:
        """Close the handles released outside Python (see ``released``)."""
        if self.released is not None:
            for fh in self.released():
                self.release(fh)

    def open(self, node: int, flags: int, uid: int = 0) -> int:
        self.collect_released()
        inode = self._live(node)
        fd = os.open(inode.proc, self._open_flags(flags))
        self._files[fd] = OpenFile(fd, inode, uid)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            st = os.fstat(fd)
            self.recorder.emit(Op.TRUNCATE, inode.ident, 0, st.st_mtime_ns)
            if uid != 0:
                self._drop_setid(inode, st)
        return fd

    def _drop_setid(self, inode: Inode, st: os.stat_result) -> None:
        """Clear set-user-id (and set-group-id with group-execute) as an unprivileged write or
        truncation does; the daemon acts as root, for whom the kernel keeps them."""
        mode = st.st_mode
        kill = stat.S_ISUID if mode & stat.S_ISUID else 0
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if kill:
            os.chmod(inode.proc, stat.S_IMODE(mode) & ~kill)
            st = os.fstat(inode.fd)
            self.recorder.emit(Op.SETATTR, inode.ident, st.st_mode, st.st_uid, st.st_gid,
                               st.st_mtime_ns)

    def open_files(self) -> int:
        """How many files are open through the mount."""
        self.collect_released()
        return len(self._files)

    def handle(self, fh: int) -> OpenFile:
        """The open file behind handle ``fh``."""
        return self._files[fh]

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._files[fh].fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write through to the backing file and record it (the mount's C fast path does
        the same for registered files: native/fusehook.c)."""
        fd = self._files[fh].fd
        st = os.fstat(fd)
        n = os.pwrite(fd, data, offset)
        if self.writeback:
            # The kernel's writeback cache owns the file times and sends them with SETATTR
            # when it writes its metadata back; a write reaching us later must not move the
            # backing mtime past the one the application was shown.
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        else:
            st = os.fstat(fd)
        of = self._files[fh]
        self.recorder.emit_write(of.inode.ident, offset, data if n == len(data) else data[:n],
                                 st.st_mtime_ns)
        if st.st_mode & _SETID and of.uid != 0:
            # With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves this to the filesystem.
            self._drop_setid(of.inode, st)
        return n

    def fsync(self, fh: int, datasync: bool) -> None:
        """Make a file durable on the backing filesystem (blocking: call it from a thread)."""
        fd = self._files[fh].fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def release(self, fh: int) -> None:
        of = self._files.pop(fh, None)
        if of is not None:
            os.close(of.fd)

    # ---- directories ---------------------------------------------------------------------
    def opendir(self, node: int) -> int:
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[handle] = OpenDir(self._live(node))
        return handle

    def dir_names(self, handle: int, start: int) -> tuple[Inode, list[bytes]]:
        """The directory's entry names (a listing taken when reading starts at 0)."""
        d = self._dirs[handle]
        if d.names is None or start == 0:
            d.names = os.listdir(d.inode.proc)
            if d.inode is self.root and self.hidden is not None and self.hidden in d.names:
                d.names.remove(self.hidden)
        return d.inode, d.names

    def releasedir(self, handle: int) -> None:
        self._dirs.pop(handle, None)

    def fsyncdir(self, handle: int) -> None:
        fd = os.open(self._dirs[handle].inode.proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- extended attributes -----------------------------------------------------------
    def getxattr(self, node: int, name: bytes) -> bytes:
        inode = self._live(node)
        if inode.is_symlink:
            raise OSError(95, "extended attributes of symbolic links are not supported")
        return os.getxattr(inode.proc, name)

    def listxattr(self, node: int) -> list[bytes]:
        inode = self._live(node)
        if inode.is_symlink:
            return []
        return [os.fsencode(n) for n in os.listxattr(inode.proc)]

    def setxattr(self, node: int, name: bytes, value: bytes) -> None:
        inode = self._live(node)
        if inode.is_symlink:
            raise OSError(1, "extended attributes of symbolic links are not supported")
        os.setxattr(inode.proc, name, value)
        self.recorder.emit(Op.SETXATTR, inode.ident, name, value)

    def removexattr(self, node: int, name: bytes) -> None:
        inode = self._live(node)
        if inode.is_symlink:
            raise OSError(1, "extended attributes of symbolic links are not supported")
        os.removexattr(inode.proc, name)
        self.recorder.emit(Op.REMOVEXATTR, inode.ident, name)
