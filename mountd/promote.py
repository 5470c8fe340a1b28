"""The promotion mount: a recovered volume served at its live path while its data is copied
in from the journal (``zfsrep.promote`` describes the tree and its marks).

It is the protected mount's passthrough (``mountd.passthrough`` over
``zfsrep.volume.BackingVolume``) without capture, over the skeleton tree, with three changes:

- a chunk of a marked file that is not yet filled is read from the journal's view;
- a write to a marked file first fills the chunks it touches (and records them, durably),
  ahead of the background copy; a write past the end, or a truncation that grows the file,
  first records where the view's data stops; nothing else waits for data;
- the mark is never shown (``listxattr``/``getxattr``) and cannot be set or removed.

In the background the daemon fills every marked file, in tree order, at most
``--rate`` bytes a second. When none is left it puts the tree at the live path
(``zfsrep.promote.switch``) and keeps serving the detached mount until the last process
using it leaves (the kernel then ends the session), then exits 0.

Start it in the foreground with::

    python -m zfsrep.mountd.promote --volume-dir DIR --seq N --work WORKDIR --label LABEL LIVE

Readiness is reported like ``zfsrep protect``'s daemon (``ZFSREP_READY_FD``), with progress
lines while the skeleton is written. SIGTERM/SIGINT/SIGHUP unmount and stop it; the tree and
its marks stay, and the next start over the same WORKDIR goes on from them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
from zfsrep.mountd.passthrough import PassthroughOperations, translate_errors
from zfsrep.mountd.signals import stop_on_signals

from zfsrep import promote
from zfsrep.errors import NotFoundError, OSFailure, StateError, ZfsrepError
from zfsrep.syscalls import syncfs
from zfsrep.view import SnapshotView, open_view
from zfsrep.volume import BackingVolume, NullRecorder

log = logging.getLogger(__name__)

#: files taken from the tree walk at a time (each held by an O_PATH descriptor meanwhile)
WALK_STEP = 256
#: bytes the background fills of one file at a time (a write to that file may wait as long)
SEGMENT = 32 << 20
#: bytes the background fills of one file before recording them in its map
RECORD_EVERY = 512 << 20


class NullHook:
    """No C fast path: every request is answered in Python (the mount is temporary)."""

    active = False

    def register_node(self, node: int, fd: int, is_dir: bool = False) -> None:
        pass

    def unregister_node(self, node: int) -> None:
        pass

    def register(self, fh: int, ident: int, uid: int) -> None:
        pass

    def unregister(self, fh: int) -> None:
        pass


class PromotingVolume(BackingVolume):
    """The skeleton tree, with the promotion's mark hidden."""

    def getxattr(self, node: int, name: bytes) -> bytes:
        if name == promote.MARKER:
            raise OSError(errno.ENODATA, "no such attribute")
        return super().getxattr(node, name)

    def listxattr(self, node: int) -> list[bytes]:
        return [n for n in super().listxattr(node) if n != promote.MARKER]

    def setxattr(self, node: int, name: bytes, value: bytes) -> None:
        if name == promote.MARKER:
            raise PermissionError(errno.EPERM, "attribute reserved by the promotion")
        super().setxattr(node, name, value)

    def removexattr(self, node: int, name: bytes) -> None:
        if name == promote.MARKER:
            raise PermissionError(errno.EPERM, "attribute reserved by the promotion")
        super().removexattr(node, name)


class PromotedFile:
    """A marked file the mount or the background has met: its map, and the lock that every
    fill of it and every change to it (write, truncation, times) holds, so that a fill
    never copies over a change nor puts back times that a change has set."""

    __slots__ = ("fmap", "lock", "complete")

    def __init__(self, fmap: promote.FileMap) -> None:
        self.fmap = fmap
        self.lock = trio.Lock()
        self.complete = False


def _proc(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


class Promoter:
    """Fills marked files by chunks: those a write touches first (``before_write``), the
    rest in the background (``run``)."""

    def __init__(self, tree_fd: int, view: SnapshotView, state: promote.StateFile,
                 rate: float | None = None) -> None:
        self.tree_fd = tree_fd
        # the mount's reads on the event loop, and one copy of each kind in threads: each
        # with its own view (its own SQLite connection and pack descriptors)
        self.read_view = view
        reopen = getattr(view, "reopen", lambda: view)
        self._demand_view = reopen()
        self._background_view = reopen()
        self.state = state
        self.rate = rate
        self.files: dict[int, PromotedFile] = {}  # by inode number: marked files met so far
        self.done: set[int] = set()  # inode numbers found or made complete
        self.finished = False
        self.error: str | None = None
        # one copy at a time each: chunks a write waits for are not queued behind the
        # background's
        self._demand = trio.CapacityLimiter(1)
        self._background = trio.CapacityLimiter(1)

    def close(self) -> None:
        for view in (self._demand_view, self._background_view):
            if view is not self.read_view:
                view.close()

    def lookup(self, ino: int, target: bytes | str) -> PromotedFile | None:
        """File ``ino`` (reachable as ``target``) if it is still marked, else None."""
        if self.finished or ino in self.done:
            return None
        pf = self.files.get(ino)
        if pf is None:
            fmap = promote.read_map(target)
            if fmap is None:
                self.done.add(ino)
                return None
            pf = self.files[ino] = PromotedFile(fmap)
        return pf

    def created(self, ino: int) -> None:
        """A file was created as inode ``ino``: it holds its own data, even if the inode
        number is one that a marked file, now gone, had."""
        self.files.pop(ino, None)
        self.done.add(ino)

    def read(self, pf: PromotedFile, fd: int, off: int, size: int) -> bytes:
        """Bytes of a marked file open as ``fd``: each chunk from the file once filled,
        from the view until then."""
        fsize = os.fstat(fd).st_size
        parts = []
        for lo, hi, from_view in pf.fmap.runs(off, min(off + size, fsize), fsize):
            if from_view:
                data = self.read_view.read(pf.fmap.ident, lo, hi - lo)
            else:
                data = os.pread(fd, hi - lo, lo)
            parts.append(data)
            if len(data) < hi - lo:
                break
        return b"".join(parts)

    @contextlib.asynccontextmanager
    async def changing(self, ino: int, target: bytes | str) -> AsyncIterator[
            PromotedFile | None]:
        """Around a change to file ``ino``'s data, size or times: while the file is marked,
        its lock is held (so no fill runs meanwhile); yields it, or None if it needs
        nothing (not marked, or complete by the time the lock was taken)."""
        pf = self.lookup(ino, target)
        if pf is None:
            yield None
            return
        async with pf.lock:
            yield None if pf.complete else pf

    async def before_write(self, pf: PromotedFile | None, fd: int, off: int,
                           length: int) -> None:
        """Make bytes off..off+length of a marked file open as ``fd`` safe to change (its
        lock held, ``changing``): the chunks they touch filled and recorded, and, for a
        write past the end, the view's end recorded (what lies past it is the file's from
        now on)."""
        if pf is None:
            return
        fmap = pf.fmap
        fsize = os.fstat(fd).st_size
        missing = fmap.missing(off, off + length, fsize)
        grow = off + length > fsize and fmap.limit > fsize
        if not (missing or grow or fmap.unrecorded(off, off + length, fsize)):
            return
        target = _proc(fd)
        started = time.monotonic()
        try:
            if missing:
                covered = await trio.to_thread.run_sync(
                    promote.fill_chunks, self._demand_view, target, fmap, missing,
                    limiter=self._demand)
                fmap.set_filled(missing)
                self._progress(covered)
            if grow:
                fmap.limit = fsize
            await trio.to_thread.run_sync(promote.persist, target, fmap, limiter=self._demand)
        except OSError as e:
            raise self._failed(f"cannot fill a file before a write: {e.strerror or e}") from None
        if missing:
            log.debug("filled %d chunks before a write in %.3f s", len(missing),
                      time.monotonic() - started)

    async def before_resize(self, pf: PromotedFile | None, target: bytes, size: int) -> None:
        """Before a marked file is truncated to ``size`` (its lock held, ``changing``):
        growing it records the view's end first. Shrinking needs nothing: the file's size
        bounds what is read from the view."""
        if pf is None:
            return
        fsize = os.stat(target).st_size
        if size > fsize and pf.fmap.limit > fsize:
            pf.fmap.limit = fsize
            try:
                await trio.to_thread.run_sync(promote.persist, target, pf.fmap,
                                              limiter=self._demand)
            except OSError as e:
                raise self._failed(f"cannot record a truncation: {e.strerror or e}") from None

    async def emptied(self, ino: int, pf: PromotedFile | None, target: bytes) -> None:
        """A marked file was opened with O_TRUNC (its lock held, ``changing``): nothing is
        left to fill."""
        if pf is None:
            return
        try:
            await trio.to_thread.run_sync(promote.finish, target, limiter=self._demand)
        except OSError as e:
            raise self._failed(f"cannot record a truncation: {e.strerror or e}") from None
        self._complete(ino, pf)

    def _failed(self, message: str) -> OSError:
        self.error = message
        log.error("%s", message)
        self.state.update(force=True, error=message)
        return OSError(errno.EIO, message)

    def _progress(self, covered: int) -> None:
        data = self.state.data
        self.state.update(bytes_left=max(0, data["bytes_left"] - covered),
                          bytes_done=data["bytes_done"] + covered)

    def _complete(self, ino: int, pf: PromotedFile) -> None:
        pf.complete = True
        self.files.pop(ino, None)
        self.done.add(ino)
        data = self.state.data
        self.state.update(files_left=max(0, data["files_left"] - 1),
                          files_done=data["files_done"] + 1)

    async def promote_file(self, ino: int, target: str) -> None:
        """Fill every chunk file ``ino`` (reachable as ``target``) misses, SEGMENT bytes
        at a time (a write to it waits for one segment at most), then remove its mark."""
        try:
            pf = self.lookup(ino, target)
        except OSError as e:
            raise self._failed(f"cannot read the map of inode {ino}: {e.strerror or e}") from None
        if pf is None:
            return
        cursor = unrecorded = 0
        while True:
            async with pf.lock:
                if pf.complete:
                    return
                fmap = pf.fmap
                try:
                    size = os.stat(target).st_size
                    chunks = fmap.missing(cursor << fmap.shift, size, size,
                                          limit=max(1, SEGMENT >> fmap.shift))
                    if not chunks:  # (those before the cursor are filled: none is emptied)
                        await trio.to_thread.run_sync(promote.finish, target,
                                                      limiter=self._background)
                        self._complete(ino, pf)
                        return
                    covered = await trio.to_thread.run_sync(
                        promote.fill_chunks, self._background_view, target, fmap, chunks,
                        limiter=self._background)
                    fmap.set_filled(chunks)
                    cursor = chunks[-1] + 1
                    unrecorded += covered
                    if unrecorded >= RECORD_EVERY:  # (how much a restart copies again)
                        await trio.to_thread.run_sync(promote.persist, target, fmap,
                                                      limiter=self._background)
                        unrecorded = 0
                except OSError as e:
                    raise self._failed(f"cannot fill inode {ino}: {e.strerror or e}") from None
            self._progress(covered)
            if self.rate:
                await trio.sleep(covered / self.rate)

    async def run(self) -> None:
        """Fill every marked file; walk the tree again until a walk finds none (a file
        renamed behind one walk is found by the next)."""
        while True:
            walk = promote.Walk(self.tree_fd)
            found = 0
            try:
                while not walk.done:
                    batch = await trio.to_thread.run_sync(walk.step, WALK_STEP)
                    try:
                        while batch:
                            pfd, ino, _ident, _size = batch[-1]
                            if ino not in self.done:
                                found += 1
                                await self.promote_file(ino, f"/proc/self/fd/{pfd}")
                            os.close(pfd)
                            batch.pop()
                    finally:
                        for item in batch:
                            os.close(item[0])
            finally:
                walk.close()
            if not found:
                break
        self.finished = True


class PromoteOperations(PassthroughOperations):
    """The passthrough's handlers, with the promotion's three changes (module docstring)."""

    def __init__(self, volume: PromotingVolume, promoter: Promoter) -> None:
        super().__init__(volume, NullRecorder(), NullHook(), trio.CapacityLimiter(4))
        self.promoter = promoter

    @translate_errors
    async def open(self, inode, flags, ctx):
        obj = self.vol.inode(inode)
        if not flags & os.O_TRUNC or flags & os.O_ACCMODE == os.O_RDONLY:
            return pyfuse3.FileInfo(fh=self.vol.open(inode, flags, ctx.uid), keep_cache=True)
        async with self.promoter.changing(obj.ident, obj.proc) as pf:
            fh = self.vol.open(inode, flags, ctx.uid)
            try:
                await self.promoter.emptied(obj.ident, pf, _proc(fh))
            except BaseException:
                self.vol.release(fh)
                raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        info, entry = await super().create(parent_inode, name, mode, flags, ctx)
        self.promoter.created(self.vol.inode(entry.st_ino).ident)
        return info, entry

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        entry = await super().mknod(parent_inode, name, mode, rdev, ctx)
        self.promoter.created(self.vol.inode(entry.st_ino).ident)
        return entry

    @translate_errors
    async def read(self, fh, off, size):
        of = self.vol.handle(fh)
        pf = self.promoter.lookup(of.inode.ident, _proc(of.fd))
        if pf is None:
            return self.vol.read(fh, off, size)
        return self.promoter.read(pf, of.fd, off, size)

    @translate_errors
    async def write(self, fh, off, buf):
        of = self.vol.handle(fh)
        async with self.promoter.changing(of.inode.ident, _proc(of.fd)) as pf:
            await self.promoter.before_write(pf, of.fd, off, len(buf))
            return self.vol.write(fh, off, buf)

    @translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        obj = self.vol.inode(inode)
        async with self.promoter.changing(obj.ident, obj.proc) as pf:  # (times set here are
            if fields.update_size:  # not put back by a fill either)
                await self.promoter.before_resize(pf, obj.proc, attr.st_size)
            return await super().setattr(inode, attr, fields, fh, ctx)


# ---- the daemon ----------------------------------------------------------------------------
@dataclass
class PromoteOptions:
    volume_dir: Path
    seq: int
    work: Path
    mountpoint: Path
    label: str
    rate: float | None = None  # bytes a second for the background copy (None: no limit)


def check_options(opts: PromoteOptions) -> None:
    if not opts.mountpoint.is_dir():
        raise NotFoundError(f"mount point {opts.mountpoint} is not a directory")
    if os.path.ismount(opts.mountpoint):
        raise StateError(f"{opts.mountpoint} is already a mount point")
    if any(opts.mountpoint.iterdir()):
        raise StateError(f"{opts.mountpoint} is not empty")
    if not opts.volume_dir.is_dir():
        raise NotFoundError(f"volume directory {opts.volume_dir} does not exist")
    opts.work.mkdir(parents=True, exist_ok=True)
    if os.stat(opts.work).st_dev != os.stat(opts.mountpoint).st_dev:
        # the filled tree goes to the live path by rename: checked before anything is done
        raise StateError(f"{opts.mountpoint} and {opts.work} are on different file systems")


def _switched_already(opts: PromoteOptions) -> bool:
    """Whether a daemon stopped between the exchange and removing the old mount point (the
    live path holds the tree, the tree's path an empty directory); finishes that step."""
    tree, live = opts.work / promote.TREE, opts.mountpoint
    try:
        if (tree.is_dir() and not any(tree.iterdir()) and live.is_dir()
                and not os.path.ismount(live) and any(live.iterdir())):
            tree.rmdir()
            return True
    except OSError:
        return False
    return False


def _build_skeleton(view: SnapshotView, work: Path, progress) -> tuple[int, int]:
    """Write the skeleton into work/tree.partial, make it durable, rename it to work/tree."""
    from zfsrep.restore import restore_tree

    partial, tree = work / promote.BUILDING, work / promote.TREE
    if partial.exists():
        shutil.rmtree(partial)
    stats = restore_tree(view, b"/", partial, skeleton=True, progress=progress)
    syncfs(partial)  # every name and mark is on disk before the tree is the promotion's state
    os.rename(partial, tree)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return stats.marked, stats.marked_bytes


async def run_promotion(opts: PromoteOptions, ready) -> None:
    """Write (or find) the skeleton, serve it at the live path, fill it, switch."""
    if _switched_already(opts):
        promote.StateFile(opts.work / promote.STATE).update(force=True, state="promoted")
        log.info("%s: promoted at %s (the tree was already there)", opts.label,
                 opts.mountpoint)
        ready()
        return
    check_options(opts)
    state = promote.StateFile(opts.work / promote.STATE)
    state.update(force=True, state="building", rate=int(opts.rate) if opts.rate else None)
    tree = opts.work / promote.TREE
    async with contextlib.AsyncExitStack() as stack:
        view = open_view(opts.volume_dir, opts.seq)
        stack.callback(view.close)
        last = [0.0]

        def progress(stats) -> None:
            now = time.monotonic()
            if now - last[0] >= 1.0 and hasattr(ready, "progress"):
                last[0] = now
                ready.progress(f"{opts.label}: {stats.files + stats.dirs} names written")

        if not tree.is_dir():
            t0 = time.monotonic()
            files, size = await trio.to_thread.run_sync(_build_skeleton, view, opts.work,
                                                        progress)
            log.info("%s: skeleton written in %.2f s", opts.label, time.monotonic() - t0)
        else:
            files, size = await trio.to_thread.run_sync(promote.count_marked, tree)
            log.info("going on with the promotion in %s: %d files (%d bytes) left", tree,
                     files, size)
        state.update(force=True, state="promoting", files_left=files, bytes_left=size)
        if files == 0:  # nothing to copy: the tree goes to the live path at once
            promote.switch(tree, opts.mountpoint, detach=False)
            state.update(force=True, state="promoted")
            log.info("%s: promoted at %s (no data to copy)", opts.label, opts.mountpoint)
            ready()
            return
        tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, tree_fd)
        promoter = Promoter(tree_fd, view, state, opts.rate)
        stack.callback(promoter.close)
        volume = PromotingVolume(str(tree), NullRecorder())
        stack.callback(volume.close)
        ops = PromoteOperations(volume, promoter)
        options = set(pyfuse3.default_options)
        options |= {f"fsname=zfsrep-promote:{opts.label.replace(',', '_')}", "subtype=zfsrep",
                    "allow_other"}  # (the live volume is for every user, as a directory is)
        try:
            pyfuse3.init(ops, str(opts.mountpoint), options)
        except RuntimeError as e:
            raise OSFailure(f"cannot mount {opts.mountpoint}: {e}") from None
        switched = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signals)

                async def promote_all() -> None:
                    nonlocal switched
                    started = time.monotonic()
                    try:
                        await promoter.run()
                        await trio.to_thread.run_sync(syncfs, tree)
                        await trio.to_thread.run_sync(promote.switch, tree, opts.mountpoint)
                    except (OSError, ZfsrepError) as e:
                        state.update(force=True, state="failed",
                                     error=promoter.error or str(e))
                        log.error("promotion stopped: %s (the mount goes on serving; files "
                                  "not yet filled answer EIO to writes)", state.data["error"])
                        return
                    switched = True
                    state.update(force=True, state="promoted")
                    log.info("%s: promoted in %.1f s; %s is now a plain directory (the "
                             "detached mount is served until no process uses it)",
                             opts.label, time.monotonic() - started, opts.mountpoint)

                nursery.start_soon(promote_all)
                log.info("%s: serving %s at %s while promoting %d files (%d bytes)",
                         opts.label, tree, opts.mountpoint, files, size)
                ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=not switched)
    log.info("%s: promotion mount ended", opts.label)


# ---- foreground entry point ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zfsrep.mountd.promote",
        description="Bring a stored volume at record SEQ up at LIVE: write its skeleton in "
                    "WORKDIR, serve it at LIVE while its data is copied in, then leave the "
                    "filled tree at LIVE as a plain directory.")
    p.add_argument("mountpoint", type=Path, metavar="LIVE")
    p.add_argument("--volume-dir", type=Path, required=True, metavar="DIR",
                   help="the volume's directory in the store")
    p.add_argument("--seq", type=int, required=True, metavar="N",
                   help="stream position of the checkpoint (every record with seq <= N)")
    p.add_argument("--work", type=Path, required=True, metavar="WORKDIR",
                   help="where the skeleton and the progress file are kept")
    p.add_argument("--label", required=True, help="shown in the log and as the mount's source")
    p.add_argument("--rate", type=float, metavar="BYTES", default=None,
                   help="bytes a second for the background copy (default: no limit)")
    p.add_argument("--log", type=Path, metavar="FILE", help="log file (default stderr)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    from zfsrep.cli import daemon_main
    from zfsrep.syscalls import use_ordinary_cpu

    args = build_parser().parse_args(argv)
    # it serves the live volume to applications: not at the background priority of a
    # journal server that started it again after a restart (zfsrep.server, resume)
    use_ordinary_cpu()
    opts = PromoteOptions(volume_dir=args.volume_dir, seq=args.seq, work=args.work,
                          mountpoint=args.mountpoint, label=args.label,
                          rate=args.rate if args.rate and args.rate > 0 else None)
    return daemon_main(args, run_promotion, opts, "zfsrep.mountd.promote")


if __name__ == "__main__":
    sys.exit(main())
