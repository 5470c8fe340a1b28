"""The promotion mount: a recovered volume served at its live path while its data is copied
in from the journal (``zfsrep.promote`` describes the tree and its marks).

It is the protected mount's passthrough (``mountd.passthrough`` over
``zfsrep.volume.BackingVolume``) without capture, over the skeleton tree, with three changes:

- a file still marked is read from the journal's view until it is filled;
- anything that would change a marked file's data (an open for writing or with O_TRUNC, a
  truncation) first fills it, ahead of the background copy;
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
from zfsrep.volume import BackingVolume, Inode, NullRecorder

log = logging.getLogger(__name__)

#: files taken from the tree walk at a time (each held by an O_PATH descriptor meanwhile)
WALK_STEP = 256


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


class Promoter:
    """Fills marked files: on demand (``ensure``, before a change) and in the background
    (``run``); each file once, whoever asks first."""

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
        self.done: set[int] = set()  # inode numbers this daemon filled (or found filled)
        self._filling: dict[int, trio.Event] = {}
        self.finished = False
        self.error: str | None = None
        # one copy at a time each: a file asked for is not queued behind the background's
        self._demand = trio.CapacityLimiter(1)
        self._background = trio.CapacityLimiter(1)

    def close(self) -> None:
        for view in (self._demand_view, self._background_view):
            if view is not self.read_view:
                view.close()

    def pending(self, inode: Inode) -> int | None:
        """The view identity a file is to be filled from, None if it needs nothing."""
        if self.finished or inode.ident in self.done:
            return None
        return promote.marked(inode.proc)

    def is_done(self, ino: int) -> bool:
        return self.finished or ino in self.done

    async def before_open(self, inode: Inode, flags: int) -> int | None:
        """Before a file is opened: one that will change is filled first; for one only read
        while still marked, the view identity its reads come from (else None)."""
        ident = self.pending(inode)
        if ident is not None and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            await self.ensure(inode.ident, inode.proc.decode())
            return None
        return ident

    async def before_truncate(self, inode: Inode) -> None:
        if self.pending(inode) is not None:
            await self.ensure(inode.ident, inode.proc.decode())

    async def ensure(self, ino: int, target: str, background: bool = False) -> None:
        """Fill file ``ino`` (reachable as ``target``) unless it is filled already."""
        while True:
            if self.is_done(ino):
                return
            event = self._filling.get(ino)
            if event is None:
                break
            await event.wait()
        ident = promote.marked(target)
        if ident is None:
            self.done.add(ino)
            return
        event = self._filling[ino] = trio.Event()
        started = time.monotonic()
        try:
            view = self._background_view if background else self._demand_view
            limiter = self._background if background else self._demand
            size = os.stat(target).st_size
            await trio.to_thread.run_sync(promote.fill, view, target, ident, limiter=limiter)
        except OSError as e:
            self.error = f"cannot fill inode {ino}: {e.strerror or e}"
            log.error("%s", self.error)
            self.state.update(force=True, error=self.error)
            raise OSError(errno.EIO, self.error) from None
        finally:
            del self._filling[ino]
            event.set()
        self.done.add(ino)
        data = self.state.data
        self.state.update(files_left=max(0, data["files_left"] - 1),
                          bytes_left=max(0, data["bytes_left"] - size),
                          files_done=data["files_done"] + 1,
                          bytes_done=data["bytes_done"] + size)
        if not background:
            log.info("filled inode %d (%d bytes) on demand in %.2f s", ino, size,
                     time.monotonic() - started)
        elif self.rate:
            await trio.sleep(size / self.rate)

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
                            if not self.is_done(ino):
                                found += 1
                                await self.ensure(ino, f"/proc/self/fd/{pfd}", background=True)
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
        self._from_view: dict[int, tuple[int, int]] = {}  # fh -> (inode number, view ident)

    @translate_errors
    async def open(self, inode, flags, ctx):
        obj = self.vol.inode(inode)
        ident = await self.promoter.before_open(obj, flags)
        fh = self.vol.open(inode, flags, ctx.uid)
        if ident is not None:
            self._from_view[fh] = (obj.ident, ident)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @translate_errors
    async def read(self, fh, off, size):
        pending = self._from_view.get(fh)
        if pending is not None:
            if not self.promoter.is_done(pending[0]):
                return self.promoter.read_view.read(pending[1], off, size)
            del self._from_view[fh]  # filled since it was opened: the file itself from now
        return self.vol.read(fh, off, size)

    @translate_errors
    async def release(self, fh):
        self._from_view.pop(fh, None)
        self.vol.release(fh)

    @translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            await self.promoter.before_truncate(self.vol.inode(inode))
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
    state.update(force=True, state="building")
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

    args = build_parser().parse_args(argv)
    opts = PromoteOptions(volume_dir=args.volume_dir, seq=args.seq, work=args.work,
                          mountpoint=args.mountpoint, label=args.label,
                          rate=args.rate if args.rate and args.rate > 0 else None)
    return daemon_main(args, run_promotion, opts, "zfsrep.mountd.promote")


if __name__ == "__main__":
    sys.exit(main())
