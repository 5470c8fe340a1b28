"""pyfuse3 adapter of the protected mount: translates kernel requests into calls on
:class:`zfsrep.volume.BackingVolume` and its results into pyfuse3 types. No policy here."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from zfsrep.barrier import CompletionGate
from zfsrep.errors import errno_of
from zfsrep.volume import BackingVolume, Inode

log = logging.getLogger(__name__)

#: How long the kernel may cache entries and attributes. The mount is the only writer of the
#: backing directory (DESIGN invariant 0), so the kernel's cache cannot go stale behind it.
CACHE_TIMEOUT = 10.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: Handlers that change the backing directory (held before they run while a move quiesces;
#: ``open`` only with O_TRUNC).
MUTATING = frozenset({"setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename",
                      "link", "open", "create", "write", "setxattr", "removexattr"})


def translate_errors(fn: F) -> F:
    """Turn OSError (and any domain error) into FUSEError with the errno of the backing fs,
    and hold a successful answer while the volume is frozen for a checkpoint."""

    mutating = fn.__name__ in MUTATING

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        gate = getattr(args[0], "gate", None)  # (the snapshot mount has none)
        run = getattr(args[0], "run", None) if mutating else None
        entered = False
        try:
            if mutating and gate is not None and (
                    fn.__name__ != "open" or args[2] & os.O_TRUNC):
                await gate.enter_mutation()  # a planned move holds it before it changes a thing
                entered = True
            if run is not None:
                run.mutating(1)
            try:
                result = await fn(*args, **kwargs)  # (changed and recorded, or failed)
            finally:
                if run is not None:
                    run.mutating(-1)
            if gate is not None and gate.frozen:
                await gate.wait_open()  # a checkpoint barrier holds the answer (zfsrep.barrier)
            return result
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(errno_of(e)) from None
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno_of(e)) from None
        finally:
            if entered:
                gate.leave_mutation()

    return wrapper  # type: ignore[return-value]


def entry_attributes(inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = inode.node
    e.generation = 0
    e.entry_timeout = CACHE_TIMEOUT
    e.attr_timeout = CACHE_TIMEOUT
    e.st_mode = st.st_mode
    e.st_nlink = st.st_nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


class PassthroughOperations(pyfuse3.Operations):
    """The protected mount's request handlers."""

    supports_dot_lookup = False
    enable_writeback_cache = True
    enable_acl = False

    def __init__(self, volume: BackingVolume, recorder: Any, hook: Any,
                 fsync_limiter: trio.CapacityLimiter,
                 gate: CompletionGate | None = None) -> None:
        super().__init__()
        self.vol = volume
        self.recorder = recorder
        self.hook = hook  # mountd.fusehook.SessionHook: serves READ/WRITE of open files
        self._fsync_limiter = fsync_limiter
        self.gate = gate  # the checkpoint barrier's hold on answers, when replicating
        #: zfsrep.spool.RunState, told while a mutating handler runs (a daemon that dies in
        #: one may have changed the directory without recording it)
        self.run: Any = None

    def _attrs(self, node: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.vol.inode(node), st)

    def _entry(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes of an entry the kernel now knows; the C fast path may read the xattrs
        of a file, and answer lookups of absent names in a directory."""
        if stat.S_ISREG(st.st_mode):
            self.hook.register_node(inode.node, inode.fd)
        elif stat.S_ISDIR(st.st_mode):
            self.hook.register_node(inode.node, inode.fd, is_dir=True)
        return entry_attributes(inode, st)

    @translate_errors
    async def lookup(self, parent_inode, name, ctx):
        return self._entry(*self.vol.lookup(parent_inode, name))

    async def forget(self, inode_list):
        try:
            for node in self.vol.forget(inode_list):
                self.hook.unregister_node(node)
        except Exception:
            log.exception("forget failed")

    @translate_errors
    async def getattr(self, inode, ctx):
        return self._attrs(inode, self.vol.getattr(inode))

    @translate_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        st = self.vol.setattr(
            inode, fh,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            caller_uid=ctx.uid)
        return self._attrs(inode, st)

    @translate_errors
    async def readlink(self, inode, ctx):
        return self.vol.readlink(inode)

    @translate_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(*self.vol.mknod(parent_inode, name, mode, rdev, ctx.uid,
                                                ctx.gid, ctx.umask))

    @translate_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(*self.vol.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid,
                                                ctx.umask))

    @translate_errors
    async def unlink(self, parent_inode, name, ctx):
        self.vol.unlink(parent_inode, name)

    @translate_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.vol.rmdir(parent_inode, name)

    @translate_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(*self.vol.symlink(parent_inode, name, target, ctx.uid,
                                                  ctx.gid))

    @translate_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.vol.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @translate_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._entry(*self.vol.link(inode, new_parent_inode, new_name))

    @translate_errors
    async def open(self, inode, flags, ctx):
        fh = self.vol.open(inode, flags, ctx.uid)
        self.hook.register(fh, self.vol.inode(inode).ident, ctx.uid)
        # O_DIRECT goes through the kernel's direct path without FOPEN_DIRECT_IO, so the
        # kernel still clears set-id bits on unprivileged writes.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @translate_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, inode, st = self.vol.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid,
                                        ctx.umask)
        self.hook.register(fh, inode.ident, ctx.uid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(inode, st)

    @translate_errors
    async def read(self, fh, off, size):
        return self.vol.read(fh, off, size)

    @translate_errors
    async def write(self, fh, off, buf):
        # Waits before the write, not after: the data is not captured (held) until there
        # is room for it, so the writes the kernel has outstanding (up to its background
        # limit, 12) add their request buffers, not their records, to the memory limit.
        if self.recorder.over_limit:
            await self.recorder.wait_for_room()
        return self.vol.write(fh, off, buf)

    async def flush(self, fh):
        # Nothing to do at close: the kernel writes dirty pages back before it would send
        # FLUSH, and answering ENOSYS once makes it stop sending FLUSH (one round trip less
        # per close).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @translate_errors
    async def release(self, fh):
        self.hook.unregister(fh)
        self.vol.release(fh)

    @translate_errors
    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(self.vol.fsync, fh, datasync,
                                      limiter=self._fsync_limiter)

    @translate_errors
    async def opendir(self, inode, ctx):
        return self.vol.opendir(inode)

    @translate_errors
    async def readdir(self, fh, start_id, token):
        dir_inode, names = self.vol.dir_names(fh, start_id)
        for i in range(start_id, len(names)):
            try:
                inode, st = self.vol.lookup(dir_inode.node, names[i])
            except FileNotFoundError:
                continue  # removed since the listing was taken
            if not pyfuse3.readdir_reply(token, names[i], self._entry(inode, st), i + 1):
                for node in self.vol.forget([(inode.node, 1)]):
                    self.hook.unregister_node(node)
                break

    @translate_errors
    async def releasedir(self, fh):
        self.vol.releasedir(fh)

    @translate_errors
    async def fsyncdir(self, fh, datasync):
        await trio.to_thread.run_sync(self.vol.fsyncdir, fh, limiter=self._fsync_limiter)

    @translate_errors
    async def statfs(self, ctx):
        sv = self.vol.statfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(sv, field))
        return out

    @translate_errors
    async def getxattr(self, inode, name, ctx):
        return self.vol.getxattr(inode, name)

    @translate_errors
    async def listxattr(self, inode, ctx):
        return self.vol.listxattr(inode)

    @translate_errors
    async def setxattr(self, inode, name, value, ctx):
        self.vol.setxattr(inode, name, value)

    @translate_errors
    async def removexattr(self, inode, name, ctx):
        self.vol.removexattr(inode, name)
