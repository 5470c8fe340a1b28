"""The protected-mount daemon: wiring of spool, capture, initial scan, backing volume and the
pyfuse3 session, and an orderly stop (unmount or SIGTERM: everything captured is written to the
spool and fsynced, then the process exits 0)."""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
from zfsrep.mountd.fusehook import SessionHook
from zfsrep.mountd.passthrough import PassthroughOperations

from zfsrep.capture import CaptureStream, NullRecorder
from zfsrep.errors import NotFoundError, StateError, UsageError
from zfsrep.records import BLOCK_SIZE
from zfsrep.scan import scan_tree
from zfsrep.spool import SpoolWriter, VolumeIdentity
from zfsrep.volume import BackingVolume

log = logging.getLogger(__name__)


@dataclass
class ProtectOptions:
    source: Path
    spool: Path | None
    mountpoint: Path
    capture: bool = True
    allow_other: bool = False
    memory_limit: int = 64 << 20
    fast_path: bool = True


def check_options(opts: ProtectOptions) -> None:
    if not opts.source.is_dir():
        raise NotFoundError(f"source directory {opts.source} does not exist")
    if not opts.mountpoint.is_dir():
        raise NotFoundError(f"mount point {opts.mountpoint} does not exist")
    if opts.capture and opts.spool is None:
        raise UsageError("--spool is required (or --no-capture)")
    if os.path.ismount(opts.mountpoint):
        raise StateError(f"{opts.mountpoint} is already a mount point")
    src, mnt = opts.source.resolve(), opts.mountpoint.resolve()
    if opts.spool is not None:
        spool = opts.spool.resolve()
        if spool == src or src in spool.parents:
            raise UsageError("the spool must not be inside the protected source directory")
    if mnt in src.parents or src in mnt.parents:
        raise UsageError("source and mount point must not contain each other (use the same "
                         "directory for both to mount over it)")


def _raise_fd_limit() -> None:
    """Every object the kernel knows is held by a descriptor, as in libfuse's passthrough_ll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _report_killpriv(hook: SessionHook) -> None:
    await trio.sleep(1)  # the INIT exchange happens when the session loop starts
    if hook.killpriv_v2():
        log.info("kernel accepted FUSE_HANDLE_KILLPRIV_V2: no xattr round trip per write")
    else:
        log.info("FUSE_HANDLE_KILLPRIV_V2 not in effect: each write asks for "
                 "security.capability first")


async def run_protected_mount(opts: ProtectOptions, ready: Callable[[], None]) -> None:
    """Serve the protected mount until it is unmounted or the process is told to stop."""
    check_options(opts)
    _raise_fd_limit()
    os.umask(0)  # modes are computed per request from the caller's umask
    source = str(opts.source.resolve())
    root_ident = os.stat(source).st_ino
    spool = None
    hook = SessionHook()
    recorder: CaptureStream | NullRecorder = NullRecorder()
    if opts.capture:
        assert opts.spool is not None
        spool = SpoolWriter(opts.spool, VolumeIdentity(source, root_ident, BLOCK_SIZE))
        recorder = CaptureStream(spool, next_seq=spool.next_seq,
                                 memory_limit=opts.memory_limit, external=hook)
    async with trio.open_nursery() as nursery:
        if isinstance(recorder, CaptureStream):
            await nursery.start(recorder.run)
        try:
            if spool is not None and spool.next_seq == 1:
                log.info("first protection of %s: recording its current content", source)
                progress = await scan_tree(source, recorder)
                log.info("initial scan done: %d entries, %d bytes", progress.entries,
                         progress.bytes)
            await _serve(opts, source, recorder, hook, ready)
        finally:
            if isinstance(recorder, CaptureStream):
                await recorder.aclose()
    if isinstance(recorder, CaptureStream):
        st = recorder.stats
        log.info("stopped: %d records in %d frames (%d bytes) captured this session, last seq "
                 "%d; writers waited for the spool %d times", st.records, st.frames,
                 st.frame_bytes, st.last_seq_sunk, st.waits)


async def _drain_fast_writes(eventfd: int, recorder: CaptureStream) -> None:
    """Take the fast path's queued writes into the stream when it signals a full frame."""
    while True:
        await trio.lowlevel.wait_readable(eventfd)
        try:
            os.eventfd_read(eventfd)
        except BlockingIOError:
            continue
        recorder.take_external()


async def _serve(opts: ProtectOptions, source: str, recorder, hook: SessionHook,
                 ready: Callable[[], None]) -> None:
    volume = BackingVolume(source, recorder)
    ops = PassthroughOperations(volume, recorder, hook, trio.CapacityLimiter(4))
    options = set(pyfuse3.default_options)
    options |= {f"fsname=zfsrep:{source}", "subtype=zfsrep"}
    if opts.allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, str(opts.mountpoint), options)
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    capture = isinstance(recorder, CaptureStream)
    hook.install(eventfd, fast=opts.fast_path, capture=capture, limit=opts.memory_limit)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals)
            if capture:
                nursery.start_soon(_drain_fast_writes, eventfd, recorder)
            log.info("protecting %s at %s", source, opts.mountpoint)
            ready()
            nursery.start_soon(_report_killpriv, hook)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        hook.shutdown()
        pyfuse3.close(unmount=True)
        volume.close()
        os.close(eventfd)
        log.info("fast path answered %s", ", ".join(
            f"{count} {kind}" for kind, count in hook.counts().items()))
