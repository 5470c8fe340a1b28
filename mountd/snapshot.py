"""The snapshot mount: a read-only pyfuse3 adapter over a :class:`zfsrep.view.SnapshotView`
(a volume's tree at one checkpoint) and the daemon wiring that serves it.

The adapter only translates: every request becomes one call on the view, whose answers never
change, so the kernel may cache entries, attributes, negative lookups and file pages for as long
as the mount lives. Every request that would change the tree fails with EROFS.

Start it in the foreground with::

    python -m zfsrep.mountd.snapshot --volume-dir DIR --seq N --label LABEL MOUNTPOINT

It reports readiness like ``zfsrep protect``'s daemon: when the environment names a descriptor
in ``ZFSREP_READY_FD`` it writes ``ready\\n`` there once the mount is up, or
``error <exit code> <message>\\n`` if it cannot start. Stop it with ``fusermount3 -u
MOUNTPOINT`` or SIGTERM/SIGINT/SIGHUP; it exits 0 after an orderly stop.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
from zfsrep.mountd.passthrough import translate_errors
from zfsrep.mountd.signals import stop_on_signals

from zfsrep.errors import NotFoundError, OSFailure, StateError
from zfsrep.syscalls import mount_at
from zfsrep.view import Node, SnapshotView, open_view

log = logging.getLogger(__name__)

#: How long the kernel may cache entries, attributes and negative lookups: the tree never
#: changes while it is mounted.
CACHE_TIMEOUT = 3600.0

#: Preferred I/O size reported in st_blksize and statfs: one full FUSE request (libfuse
#: negotiates 256 pages), so `cp` and stdio read in requests the kernel need not split.
BLOCK_SIZE = 1 << 20

#: Kernel readahead for the mount (KiB). FUSE starts at 128 KiB, so sequential reads arrive as
#: 128 KiB requests; at 1 MiB each request is as large as libfuse allows (256 pages). Measured
#: reading 2 GiB with `dd bs=1M`: over a view that costs nothing, 0.46 -> 1.4 GB/s; over the
#: store's index (zfsrep.index, 1 GiB file) 250-370 MB/s either way, the view's own cost.
READAHEAD_KIB = 1024

#: Entries fetched from the view per call while listing a directory.
READDIR_BATCH = 256


# ---- inode numbers -------------------------------------------------------------------------
class InodeNumbers:
    """Maps the view's identities to FUSE inode numbers and back.

    The root's identity is inode 1 (``pyfuse3.ROOT_INODE``); every other identity is its own
    inode number, except identity 1 when it is not the root's: it takes the root's identity as
    its number, which no other object has. The mapping swaps two numbers at most, so it is its
    own inverse, deterministic and stable for the view's lifetime.
    """

    def __init__(self, root: int) -> None:
        self.root = root

    def inode(self, ident: int) -> int:
        if ident == self.root:
            return pyfuse3.ROOT_INODE
        if ident == pyfuse3.ROOT_INODE:
            return self.root
        return ident

    ident = inode  # the swap is its own inverse


def entry_attributes(node: Node, inode: int) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = inode
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = node.mode
    e.st_nlink = node.nlink
    e.st_uid = node.uid
    e.st_gid = node.gid
    e.st_rdev = node.rdev
    e.st_size = node.size
    e.st_blksize = BLOCK_SIZE
    e.st_blocks = (node.size + 511) // 512
    e.st_atime_ns = e.st_ctime_ns = e.st_mtime_ns = node.mtime_ns
    return e


def negative_entry() -> pyfuse3.EntryAttributes:
    """A cacheable "no such name" answer (inode 0)."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = CACHE_TIMEOUT
    return e


# ---- directory listings --------------------------------------------------------------------
class DirStream:
    """One open directory. The kernel's readdir offsets are entry positions in name order
    (offset ``i`` resumes after the ``i``-th entry); each position is mapped back to the name
    that ends it, so a listing resumes with the view's ``after`` however it was interrupted.
    Entries fetched but not yet accepted by the kernel are kept for the next request."""

    def __init__(self, view: SnapshotView, ident: int, batch: int = READDIR_BATCH) -> None:
        self.view = view
        self.ident = ident
        self.batch = batch
        self._names: list[bytes] = []  # _names[i]: the name at position i
        self._fetched: list[tuple[bytes, Node]] = []  # entries at _fetched_at, _fetched_at+1...
        self._fetched_at = 0
        self._count: int | None = None  # number of entries, once the end was seen

    def entries(self, start: int) -> Iterator[tuple[int, bytes, Node]]:
        """(offset after the entry, name, node) for the entries from position ``start`` on."""
        if start > len(self._names):
            raise pyfuse3.FUSEError(errno.EINVAL)  # not an offset this stream handed out
        pos = start
        while self._count is None or pos < self._count:
            i = pos - self._fetched_at
            if not 0 <= i < len(self._fetched):
                after = self._names[pos - 1] if pos else b""
                self._fetched = self.view.readdir(self.ident, after, self.batch)
                self._fetched_at, i = pos, 0
                if len(self._fetched) < self.batch:
                    self._count = pos + len(self._fetched)
                if not self._fetched:
                    return
            name, node = self._fetched[i]
            if pos == len(self._names):
                self._names.append(name)
            pos += 1
            yield pos, name, node


# ---- the operations ------------------------------------------------------------------------
def _read_only() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class SnapshotOperations(pyfuse3.Operations):
    """Request handlers of a snapshot mount: each one call on the view."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, view: SnapshotView) -> None:
        super().__init__()
        self.view = view
        self.inodes = InodeNumbers(view.root)
        self._dirs: dict[int, DirStream] = {}
        self._next_dir = 1
        self._rbuf = bytearray()  # the answer of every read (see read)
        #: set once the kernel's INIT request is answered (its reply is written before the
        #: session loop next yields to other tasks)
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        return entry_attributes(node, self.inodes.inode(node.ident))

    # -- reading --
    @translate_errors
    async def lookup(self, parent_inode, name, ctx):
        node = self.view.lookup(self.inodes.ident(parent_inode), name)
        return negative_entry() if node is None else self._entry(node)

    async def forget(self, inode_list):
        pass  # inode numbers are identities: there is nothing to drop

    @translate_errors
    async def getattr(self, inode, ctx):
        return self._entry(self.view.getattr(self.inodes.ident(inode)))

    @translate_errors
    async def readlink(self, inode, ctx):
        return self.view.readlink(self.inodes.ident(inode))

    @translate_errors
    async def opendir(self, inode, ctx):
        node = self.view.getattr(self.inodes.ident(inode))
        if not stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh, self._next_dir = self._next_dir, self._next_dir + 1
        self._dirs[fh] = DirStream(self.view, node.ident)
        return fh

    @translate_errors
    async def readdir(self, fh, start_id, token):
        for next_id, name, node in self._dirs[fh].entries(start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(node), next_id):
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass

    @translate_errors
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _read_only()
        node = self.view.getattr(self.inodes.ident(inode))
        # The handle is the identity itself: reading needs no per-open state.
        return pyfuse3.FileInfo(fh=node.ident, keep_cache=True)

    @translate_errors
    async def read(self, fh, off, size):
        # One call per request, on the event loop's thread: the view batches the whole range
        # (and need not be thread-safe); see READAHEAD_KIB for the size of requests.
        read_into = getattr(self.view, "read_into", None)
        if read_into is None:
            return self.view.read(fh, off, size)
        # Every answer comes from the same buffer: pyfuse3 copies it to the kernel as soon
        # as this returns, before any other task runs (nothing here or in translate_errors
        # awaits after the read), so no answer can be overwritten before it is sent.
        # Measured reading 1 GiB with caches dropped: 2.8 s of the daemon's CPU, 40% of it
        # allocating, zeroing and copying two new 1 MiB buffers per request.
        if len(self._rbuf) < size:
            self._rbuf = bytearray(size)
        return memoryview(self._rbuf)[:read_into(fh, off, size, self._rbuf)]

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)  # nothing to flush; the kernel stops asking

    async def release(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    @translate_errors
    async def listxattr(self, inode, ctx):
        return self.view.listxattr(self.inodes.ident(inode))

    @translate_errors
    async def getxattr(self, inode, name, ctx):
        value = self.view.getxattr(self.inodes.ident(inode), name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @translate_errors
    async def access(self, inode, mode, ctx):
        self.view.getattr(self.inodes.ident(inode))
        if mode & os.W_OK:
            raise _read_only()
        return True

    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = BLOCK_SIZE
        out.f_blocks = out.f_bfree = out.f_bavail = 0  # nothing can be written
        out.f_files = out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- every change is refused --
    async def setattr(self, inode, attr, fields, fh, ctx):
        raise _read_only()

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise _read_only()

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise _read_only()

    async def unlink(self, parent_inode, name, ctx):
        raise _read_only()

    async def rmdir(self, parent_inode, name, ctx):
        raise _read_only()

    async def symlink(self, parent_inode, name, target, ctx):
        raise _read_only()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise _read_only()

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise _read_only()

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise _read_only()

    async def write(self, fh, off, buf):
        raise _read_only()

    async def setxattr(self, inode, name, value, ctx):
        raise _read_only()

    async def removexattr(self, inode, name, ctx):
        raise _read_only()


# ---- the daemon ----------------------------------------------------------------------------
@dataclass
class SnapshotOptions:
    volume_dir: Path
    seq: int
    mountpoint: Path
    label: str
    allow_other: bool = False
    #: opens the view (tests pass a fake); default zfsrep.view.open_view
    view_factory: Callable[[Path, int], SnapshotView] | None = None


def check_options(opts: SnapshotOptions) -> None:
    if not opts.mountpoint.exists():
        raise NotFoundError(f"mount point {opts.mountpoint} does not exist")
    if not opts.mountpoint.is_dir():
        raise NotFoundError(f"mount point {opts.mountpoint} is not a directory")
    if os.path.ismount(opts.mountpoint):
        raise StateError(f"{opts.mountpoint} is already a mount point")
    if opts.view_factory is None and not opts.volume_dir.is_dir():
        raise NotFoundError(f"volume directory {opts.volume_dir} does not exist")


def _escape(value: str) -> str:
    """Quote a mount option value for libfuse's option parser (commas separate options)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_options(opts: SnapshotOptions) -> set[str]:
    options = {"ro", "default_permissions", f"fsname=zfsrep-snapshot:{_escape(opts.label)}",
               "subtype=zfsrep"}
    if opts.allow_other:
        options.add("allow_other")
    return options


async def _raise_readahead(ops: SnapshotOperations, resolved_mountpoint: Path) -> None:
    """Let the kernel read ahead READAHEAD_KIB. Only after INIT: the kernel lowers the
    readahead to what the INIT reply says (libfuse echoes the kernel's offer). Needs root;
    without it the mount works with 128 KiB requests."""
    await ops.initialized.wait()
    mounted = mount_at(resolved_mountpoint)
    device = mounted[0] if mounted is not None else None
    try:
        if device is None:
            raise FileNotFoundError(f"{resolved_mountpoint} not in /proc/self/mountinfo")
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{READAHEAD_KIB}\n")
    except OSError as e:
        log.info("kernel readahead left at its default: %s", e)
    else:
        log.debug("kernel readahead of %s set to %d KiB", device, READAHEAD_KIB)


async def run_snapshot_mount(opts: SnapshotOptions, ready: Callable[[], None]) -> None:
    """Serve the snapshot mount until it is unmounted or the process is told to stop."""
    check_options(opts)
    factory = opts.view_factory or open_view
    async with contextlib.AsyncExitStack() as stack:
        view = factory(opts.volume_dir, opts.seq)
        stack.callback(view.close)
        ops = SnapshotOperations(view)
        resolved = opts.mountpoint.resolve()  # before mounting: resolving looks at the mount
        try:
            pyfuse3.init(ops, str(opts.mountpoint), mount_options(opts))
        except RuntimeError as e:  # the mount was refused
            raise OSFailure(f"cannot mount {opts.mountpoint}: {e}") from None
        stack.callback(pyfuse3.close, unmount=True)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(stop_on_signals)
        nursery.start_soon(_raise_readahead, ops, resolved)
        log.info("snapshot %s (%s at record %d) mounted at %s", opts.label, opts.volume_dir,
                 view.seq, opts.mountpoint)
        ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    log.info("snapshot %s unmounted from %s", opts.label, opts.mountpoint)


# ---- foreground entry point ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zfsrep.mountd.snapshot",
        description="Mount the tree of a stored volume at record SEQ read-only at MOUNTPOINT "
                    "and serve it in the foreground until unmounted or signalled.")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--volume-dir", type=Path, required=True, metavar="DIR",
                   help="the volume's directory in the store")
    p.add_argument("--seq", type=int, required=True, metavar="N",
                   help="stream position of the checkpoint (every record with seq <= N)")
    p.add_argument("--label", required=True, help="shown as the mount's source "
                   "(zfsrep-snapshot:LABEL)")
    p.add_argument("--allow-other", action="store_true",
                   help="let users other than the mounting one use the mount")
    p.add_argument("--log", type=Path, metavar="FILE", help="log file (default stderr)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m zfsrep.mountd.snapshot``: serve in the foreground, reporting readiness on
    the ready pipe of ``zfsrep.cli`` (the protocol of ``zfsrep protect``'s daemon)."""
    from zfsrep.cli import daemon_main

    args = build_parser().parse_args(argv)
    opts = SnapshotOptions(volume_dir=args.volume_dir, seq=args.seq,
                           mountpoint=args.mountpoint, label=args.label,
                           allow_other=args.allow_other)
    return daemon_main(args, run_snapshot_mount, opts, "zfsrep.mountd.snapshot")


if __name__ == "__main__":
    sys.exit(main())
