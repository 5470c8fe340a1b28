"""Restore in place, the protected mount's half (the server's half is ``zfsrep.inplace``).

The mount puts its own volume back to a checkpoint, keeps the pre-restore tree until the
restore is committed, and can return to it exactly. Everything happens on the backing
filesystem, in one hidden directory of the source (``.zfsrep-restore``: the mount shows no
such name and refuses to create it while a restore is under way), so every move is a rename
on one filesystem::

    SOURCE/.zfsrep-restore/state.json   the phase (below), fsynced at every step
    SOURCE/.zfsrep-restore/new/         the checkpoint's tree, copied from the journal server
    SOURCE/.zfsrep-restore/old/         the pre-restore tree, while the restore is not committed
    SOURCE/.zfsrep-restore/discard/     the restored tree, while a rollback removes it

Restore: the mount holds every change (``zfsrep.barrier`` quiesce) and refuses if a file is
open on the volume; it copies the tree at the checkpoint from the server into ``new/``
("fetching"); it records the change in its own stream ("recording": every pre-restore name
removed, then the restored tree created, as the initial sync does), so protection goes on
and every later checkpoint is the restored state; once those records are in the spool
("recorded") it moves the pre-restore entries of the root into ``old/`` and the restored
ones into the root, sets the root's attributes, tells the kernel to forget what it cached,
and lets the held changes go ("before-commit"). Rollback does the same the other way round
(the restored tree into ``discard/``, ``old/`` back), then deletes the directory; commit
deletes it.

A restart of the mount finishes a swap that was recorded, and discards a copy that was not
recorded yet. The one step it cannot finish is "recording" itself (the records are being
written while the mount stops): the mount then refuses to start and says so, keeping both
trees.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from zfsrep.errors import StateError
from zfsrep.records import Op
from zfsrep.scan import _Scanner
from zfsrep.syscalls import syncfs

log = logging.getLogger(__name__)

RESERVED = b".zfsrep-restore"
STATE = "state.json"
ROOT_NODE = pyfuse3.ROOT_INODE
SINK_WAIT = 600.0
#: how long a restore waits for files just closed to be released by the kernel
OPEN_WAIT = 3.0


def _hex_xattrs(path: str | bytes) -> dict[str, str]:
    return {name: os.getxattr(path, name, follow_symlinks=False).hex()
            for name in os.listxattr(path, follow_symlinks=False)}


def _root_attrs(path: str | bytes) -> dict[str, Any]:
    st = os.lstat(path)
    return {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
            "xattrs": _hex_xattrs(path)}


def _rmtree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


class InPlaceRestore:
    """The restore-in-place state of one protected volume."""

    def __init__(self, source: str, root_ident: int, recorder: Any, spool: Any,
                 gate: Any, address: tuple[str, int], vpg: str, volume_name: str) -> None:
        self.source = source
        self.dir = Path(source) / os.fsdecode(RESERVED)
        self.root_ident = root_ident
        self.recorder = recorder
        self.spool = spool
        self.gate = gate
        self.address = address
        self.vpg = vpg
        self.volume_name = volume_name
        self.volume: Any = None  # the BackingVolume, once the mount serves
        self.serving = False
        #: while the records of a swap are written: no checkpoint may cut them (link.mark)
        self.recording = False
        self._lock = trio.Lock()

    # ---- state ------------------------------------------------------------------------------
    def state(self) -> dict | None:
        try:
            with open(self.dir / STATE) as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError):  # (a file of that name: not ours)
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"cannot read {self.dir / STATE}: {e}") from None

    def _save(self, state: dict) -> None:
        tmp = self.dir / (STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.dir / STATE)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def active(self) -> bool:
        """Whether the hidden directory is ours (a restore is under way)."""
        return self.dir.is_dir() and (self.dir / STATE).exists()

    def _drop_dir(self) -> None:
        """Delete the hidden directory, leaving the root's times as they were (the stream
        never saw the directory come or go)."""
        try:
            st = os.lstat(self.source)
        except FileNotFoundError:
            return
        _rmtree(self.dir)
        os.utime(self.source, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _make_dir(self) -> None:
        st = os.lstat(self.source)
        os.mkdir(self.dir, 0o700)
        os.utime(self.source, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _hide(self, on: bool) -> None:
        if self.volume is not None:
            self.volume.hidden = RESERVED if on else None

    # ---- at start, before the mount serves --------------------------------------------------
    def resume_at_start(self) -> None:
        """Finish what a stop in the middle left (see the module docstring)."""
        state = self.state()
        if state is None:
            return
        phase = state.get("phase")
        if phase == "fetching":
            log.warning("restore in place of checkpoint %s was interrupted while copying; "
                        "the copy is discarded (the volume was not changed)",
                        state.get("checkpoint"))
            self._drop_dir()
        elif phase == "recording":
            raise StateError(
                f"a restore in place ({state.get('what')}) of {self.source} was interrupted "
                f"while its records were written: the spool no longer matches the directory. "
                f"Both trees are kept in {self.dir}; protect the directory again with a new "
                "spool")
        elif phase == "recorded":
            log.info("finishing the %s of %s that was recorded before the mount stopped",
                     state.get("what"), self.source)
            self._swap(state)
            self._after_swap(state)
        elif phase == "cleanup":
            self._drop_dir()
        elif phase != "before-commit":
            raise StateError(f"{self.dir / STATE}: unknown phase {phase!r}")

    # ---- the requests of the server ---------------------------------------------------------
    async def restore(self, seq: int, checkpoint: object) -> dict:
        async with self._lock:
            state = self.state()
            if state is not None:
                if state.get("phase") == "before-commit" and state.get("seq") == seq:
                    return {"files": state.get("files", 0), "bytes": state.get("bytes", 0)}
                raise StateError(f"a restore in place of checkpoint {state.get('checkpoint')} "
                                 f"is under way on {self.source}")
            if os.path.lexists(self.dir):
                raise StateError(f"{self.dir} exists and is not the mount's: move it away to "
                                 "restore in place")
            if self.recorder.failed is not None:
                raise StateError(f"capture stopped on {self.source}: {self.recorder.failed}")
            await self._hold()
            try:
                await trio.to_thread.run_sync(self._make_dir)
                self._hide(True)
                state = {"phase": "fetching", "what": "restore", "seq": seq,
                         "checkpoint": checkpoint}
                await trio.to_thread.run_sync(self._save, state)
                t0 = time.monotonic()
                stats = await trio.to_thread.run_sync(self._fetch, seq)
                log.info("restore in place: checkpoint %s copied (%d files, %d MiB) in %.1f s",
                         checkpoint, stats.files, stats.bytes >> 20, time.monotonic() - t0)
                new = self.dir / "new"
                state.update(files=stats.files, bytes=stats.bytes,
                             pre_root=_root_attrs(self.source), swap={
                                 "keep": "old", "bring": "new", "stage": "a",
                                 "attrs": _root_attrs(new)}, then="before-commit")
                await self._record(state, new)
            except BaseException:
                with trio.CancelScope(shield=True):
                    if (self.state() or {}).get("phase") == "fetching":
                        await trio.to_thread.run_sync(self._drop_dir)
                        self._hide(False)
                raise
            finally:
                self.gate.resume()
            log.info("restore in place: %s is at checkpoint %s (before commit; the "
                     "pre-restore tree is kept)", self.source, checkpoint)
            return {"files": stats.files, "bytes": stats.bytes}

    async def rollback(self) -> dict:
        async with self._lock:
            state = self.state()
            if state is None or state.get("phase") in ("fetching", "cleanup"):
                if state is not None:  # nothing was changed
                    await trio.to_thread.run_sync(self._drop_dir)
                self._hide(False)
                return {}
            if state.get("phase") != "before-commit":
                raise StateError(f"the restore in place of {self.source} is "
                                 f"{state.get('phase')}")
            await self._hold()
            try:
                old = self.dir / "old"
                await trio.to_thread.run_sync(functools.partial(os.makedirs, old,
                                                                exist_ok=True))
                state = dict(state, what="rollback", swap={
                    "keep": "discard", "bring": "old", "stage": "a",
                    "attrs": state["pre_root"]}, then="cleanup")
                await self._record(state, old)
            finally:
                self.gate.resume()
            log.info("restore in place rolled back: %s is as it was before the restore",
                     self.source)
            return {}

    async def commit(self) -> dict:
        async with self._lock:
            state = self.state()
            if state is None:
                return {}
            if state.get("phase") not in ("before-commit", "cleanup"):
                raise StateError(f"the restore in place of {self.source} is "
                                 f"{state.get('phase')}")
            await trio.to_thread.run_sync(self._save, dict(state, phase="cleanup"))
            for sub in ("old", "new", "discard"):  # the bulk, while the volume is in use
                await trio.to_thread.run_sync(_rmtree, self.dir / sub)
            await self.gate.quiesce()  # (no change of the root between its stat and utime)
            try:
                await trio.to_thread.run_sync(self._drop_dir)
            finally:
                self.gate.resume()
            self._hide(False)
            log.info("restore in place committed: the pre-restore tree of %s is deleted",
                     self.source)
            return {}

    # ---- steps --------------------------------------------------------------------------------
    async def _hold(self) -> None:
        """Hold every change, then refuse if a file is open (it would keep writing into the
        tree that is moved away)."""
        if self.volume is None:
            raise StateError(f"the mount of {self.source} is not serving yet")
        with trio.move_on_after(OPEN_WAIT):  # files closed a moment ago are released soon
            while self.volume.open_files():
                await trio.sleep(0.05)
        await self.gate.quiesce()
        try:
            busy = self.volume.open_files()
            if busy:
                raise StateError(f"{busy} file{'s are' if busy > 1 else ' is'} open on "
                                 f"{self.source}: stop the applications that use it first")
        except BaseException:
            self.gate.resume()
            raise

    def _fetch(self, seq: int):
        from zfsrep.remoteview import RemoteView
        from zfsrep.restore import restore_tree

        view = RemoteView(self.address, self.vpg, self.volume_name, seq)
        last = [time.monotonic()]

        def progress(stats) -> None:
            now = time.monotonic()
            if now - last[0] >= 5.0:
                last[0] = now
                log.info("restore in place: %d files, %d MiB copied", stats.files,
                         stats.bytes >> 20)

        try:
            stats = restore_tree(view, b"/", self.dir / "new", progress=progress)
        finally:
            view.close()
        syncfs(self.dir / "new")  # durable before the records say it is the volume
        return stats

    async def _record(self, state: dict, bring: Path) -> None:
        """Record the swap in the stream, make it durable in the spool, then do it."""
        self.recorder.flush()
        await trio.to_thread.run_sync(self._save, dict(state, phase="recording",
                                                       start_seq=self.recorder.last_seq))
        self.recording = True
        try:
            await self._emit(bring, state["swap"]["attrs"])
            end = self.recorder.last_seq
            self.recorder.flush()
            with trio.move_on_after(SINK_WAIT):
                while self.recorder.stats.last_seq_sunk < end and self.recorder.failed is None:
                    await trio.sleep(0.01)
            if self.recorder.stats.last_seq_sunk < end:
                raise StateError(f"the records of the {state['what']} did not reach the spool: "
                                 f"{self.recorder.failed or 'timed out'}")
            with contextlib.suppress(OSError):  # (a full segment is fsynced when closed)
                await trio.to_thread.run_sync(self.spool.sync)
        except BaseException as e:
            if self.recorder.failed is None:
                self.recorder.failed = (f"the {state['what']} in place failed while recording "
                                        f"its changes: {e}")
            raise
        finally:
            self.recording = False
        state = dict(state, phase="recorded", end_seq=end)
        await trio.to_thread.run_sync(self._save, state)
        # on the event loop, so that no request runs between the renames and the moment the
        # objects of the old tree turn stale (a few renames and two fsyncs)
        names = self._swap(state)
        if self.volume is not None:
            self.volume.retire_tree()
        await trio.to_thread.run_sync(self._after_swap, state)
        await trio.to_thread.run_sync(self._invalidate, names)

    async def _emit(self, bring: Path, attrs: dict) -> None:
        """The records that turn the volume's tree into the one in ``bring``."""
        rec, root = self.recorder, self.root_ident
        removals = await trio.to_thread.run_sync(self._names, self.source)
        for parent, name, ident, parent_mtime in reversed(removals):  # children first
            rec.emit(Op.REMOVE, parent, name, ident, parent_mtime)
            if rec.over_limit:
                await rec.wait_for_room()
        for name in os.listxattr(self.source, follow_symlinks=False):
            rec.emit(Op.REMOVEXATTR, root, os.fsencode(name))
        for name, value in attrs["xattrs"].items():
            rec.emit(Op.SETXATTR, root, os.fsencode(name), bytes.fromhex(value))
        fd = os.open(bring, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            scanner = _Scanner(rec, 5.0)
            await scanner.directory(fd, root, os.fstat(fd))
        finally:
            os.close(fd)
        mode = stat.S_IFDIR | attrs["mode"]
        rec.emit(Op.SETATTR, root, mode, attrs["uid"], attrs["gid"], attrs["mtime_ns"])

    def _names(self, top: str) -> list[tuple[int, bytes, int, int]]:
        """Every name of the tree (the hidden directory left out), each directory's before
        its children's: (parent ident, name, ident, parent mtime)."""
        out: list[tuple[int, bytes, int, int]] = []
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack = [(fd, self.root_ident, True)]
        while stack:
            fd, ident, is_root = stack.pop()
            try:
                mtime = os.fstat(fd).st_mtime_ns
                for name in os.listdir(b"/proc/self/fd/%d" % fd):
                    if is_root and name == RESERVED:
                        continue
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    out.append((ident, name, st.st_ino, mtime))
                    if stat.S_ISDIR(st.st_mode):
                        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                        os.O_CLOEXEC, dir_fd=fd)
                        stack.append((child, st.st_ino, False))
            finally:
                os.close(fd)
        return out

    def _swap(self, state: dict) -> list[bytes]:
        """Move the root's entries into ``keep``, then ``bring``'s into the root (each stage
        can be repeated after a stop), and set the root's attributes. Returns the names."""
        swap = state["swap"]
        keep, bring = self.dir / swap["keep"], self.dir / swap["bring"]
        keep.mkdir(exist_ok=True)
        root_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        keep_fd = os.open(keep, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        bring_fd = os.open(bring, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        moved: list[bytes] = []
        try:
            if swap["stage"] == "a":
                for name in os.listdir(b"/proc/self/fd/%d" % root_fd):
                    if name != RESERVED:
                        os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=keep_fd)
                        moved.append(name)
                swap["stage"] = "b"
                self._save(state)
            for name in os.listdir(b"/proc/self/fd/%d" % bring_fd):
                os.rename(name, name, src_dir_fd=bring_fd, dst_dir_fd=root_fd)
                moved.append(name)
            attrs = swap["attrs"]
            path = b"/proc/self/fd/%d" % root_fd
            for name in os.listxattr(path):
                if name not in attrs["xattrs"]:
                    with contextlib.suppress(OSError):
                        os.removexattr(path, name)
            for name, value in attrs["xattrs"].items():
                os.setxattr(path, name, bytes.fromhex(value))
            os.fchown(root_fd, attrs["uid"], attrs["gid"])
            os.fchmod(root_fd, attrs["mode"])
            os.utime(root_fd, ns=(attrs["atime_ns"], attrs["mtime_ns"]))
            for fd in (keep_fd, root_fd):
                os.fsync(fd)
        finally:
            for fd in (root_fd, keep_fd, bring_fd):
                os.close(fd)
        with contextlib.suppress(OSError):
            bring.rmdir()
        return moved

    def _after_swap(self, state: dict) -> None:
        if state["then"] == "before-commit":
            self._save(dict(state, phase="before-commit", swap=None))
        else:
            self._save(dict(state, phase="cleanup"))
            self._drop_dir()
            self._hide(False)

    def _invalidate(self, names: list[bytes]) -> None:
        """Make the kernel forget the root's entries and attributes it cached (the backing
        tree changed behind it). Called in a worker thread."""
        if not self.serving:
            return
        for name in set(names):
            try:
                pyfuse3.invalidate_entry(ROOT_NODE, name)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("cannot invalidate %r: %s", name, e)
        try:
            pyfuse3.invalidate_inode(ROOT_NODE)
        except OSError as e:
            log.warning("cannot invalidate the root: %s", e)
