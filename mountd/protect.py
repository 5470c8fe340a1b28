"""The protected-mount daemon: wiring of spool, capture, initial scan, backing volume and the
pyfuse3 session, and an orderly stop (unmount or SIGTERM: everything captured is written to the
spool and fsynced, then the process exits 0)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio
from zfsrep.mountd.fusehook import SessionHook
from zfsrep.mountd.inplace import RESERVED, InPlaceRestore
from zfsrep.mountd.passthrough import PassthroughOperations
from zfsrep.mountd.signals import stop_on_signals

from zfsrep.barrier import CompletionGate
from zfsrep.capture import CaptureStream
from zfsrep.errors import NotFoundError, StateError, UsageError
from zfsrep.link import LinkOptions, VolumeShipper
from zfsrep.records import BLOCK_SIZE, Op
from zfsrep.scan import ScanProgress, count_tree, find_idents, record_again, scan_tree
from zfsrep.spool import (
    RunState,
    SpoolWriter,
    VolumeIdentity,
    after_crash,
    read_initial_sync,
    write_initial_sync,
)
from zfsrep.syscalls import keep_large_buffers, mount_at, try_lock
from zfsrep.volume import ROOT_NODE, BackingVolume, NullRecorder

log = logging.getLogger(__name__)

#: Recently spooled frames kept in memory so the replication link need not read them back.
#: Only frames not yet sent need to be here: a link that keeps up sends each frame right
#: after it is written. What it holds are the fast path's request buffers, which go back to
#: its pool only from here: at 64 MiB the mount faulted in and rotated through more of them
#: (for 1 GiB written, 45,800 page faults in the serving thread against 32,000-34,500 at
#: 16 MiB and 18,000-32,000 at 8 MiB, and 5-10% more of its system time).
RECENT_FRAMES_BYTES = 16 << 20
#: Files whose RELEASE the fast path answered are closed at least this often (seconds).
RELEASE_CLOSE_S = 0.5


@dataclass
class ProtectOptions:
    source: Path
    spool: Path | None
    mountpoint: Path
    capture: bool = True
    allow_other: bool = False
    memory_limit: int = 64 << 20
    fast_path: bool = True
    #: Replicate to a journal server (None: capture to the spool only).
    link: LinkOptions | None = None
    spool_limit: int | None = None
    drain_timeout: float = 10.0


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
    mounted = mount_at(src)
    if mounted is not None and mounted[1] == "fuse.zfsrep":
        raise StateError(f"{src} is a zfsrep mount: the directory under it is protected "
                         "already (one mount per directory)")
    if opts.spool is not None:
        spool = opts.spool.resolve()
        if spool == src or src in spool.parents:
            raise UsageError("the spool must not be inside the protected source directory")
    if mnt in src.parents or src in mnt.parents:
        raise UsageError("source and mount point must not contain each other (use the same "
                         "directory for both to mount over it)")


def _raise_fd_limit() -> int:
    """Every object the kernel knows is held by a descriptor, as in libfuse's passthrough_ll,
    so the limit on descriptors bounds the files in use: raise it as far as the system lets
    root (``fs.nr_open``), else to the hard limit. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            most = int(f.read())
    except (OSError, ValueError):
        most = hard
    for limit in (max(most, hard), hard):
        if limit <= soft:
            return soft
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):  # not root: the hard limit is as far as it goes
            continue
    return soft


async def _report_killpriv(hook: SessionHook) -> None:
    await trio.sleep(1)  # the INIT exchange happens when the session loop starts
    if hook.killpriv_v2():
        log.info("kernel accepted FUSE_HANDLE_KILLPRIV_V2: no xattr round trip per write")
    else:
        log.info("FUSE_HANDLE_KILLPRIV_V2 not in effect: each write asks for "
                 "security.capability first")


def _check_previous_run(spool: SpoolWriter, link: LinkOptions | None) -> set[int] | None:
    """The files to record again because the spool's last daemon died before writing their
    latest changes (None: nothing was lost). A spool that lost changes recording files again
    cannot repair (names, xattrs, or more files than the daemon tracked) is marked incomplete
    and refused: it would silently lack changes the directory has. A daemon that died with
    everything written only earns a warning."""
    previous = RunState.read(spool.path)
    spooled = spool.next_seq - 1
    lost, idents, why_not = after_crash(previous, spooled)
    if lost is None:
        if previous is not None and not previous["clean"]:
            log.warning("the previous mount daemon (pid %d) stopped without a clean shutdown, "
                        "but everything it captured is in the spool", previous["pid"])
        return None
    if idents is None:
        spool.mark_incomplete(spooled, f"{lost}; {why_not}")
        spool.close()
        how = "a new spool"
        if link is not None:
            how += (f", after taking the volume out of its VPG ('zfsrep vpg remove-volume "
                    f"{link.vpg} {link.volume}')")
        raise StateError(f"{lost}; and {why_not}, which recording files again cannot repair. "
                         f"The spool {spool.path} no longer describes {spool.identity.source} "
                         f"and is marked incomplete. Protect again with {how}")
    log.warning("%s; recording the %d file%s it had changed again (resync)", lost,
                len(idents), "" if len(idents) == 1 else "s")
    return idents


async def _resync(source: str, idents: set[int], recorder: CaptureStream, hook: SessionHook,
                  ready: Callable[[], None]) -> None:
    """Record the files a daemon that died had changed again, before anything else is
    recorded or shipped (no checkpoint can fall in the middle)."""
    for ident in idents:  # still to do if this daemon dies too
        hook.mark_dirty(ident, RESYNC_PENDING)
    paths = await trio.to_thread.run_sync(find_idents, source, idents)
    progress = ScanProgress()

    def report(p: ScanProgress) -> None:
        say = getattr(ready, "progress", None)
        if say is not None:
            say(f"resync: {p.entries} of {len(paths)} files, {p.bytes >> 20} MiB")

    await record_again(paths, recorder, progress=progress, report=report)
    for ident in idents - paths.keys():  # gone from the tree: nothing to record
        hook.mark_dirty(ident, max(recorder.last_seq, 1))
    log.info("resync done: %d files (%d MiB) recorded again through record %d; %d no longer "
             "in the tree", len(paths), progress.bytes >> 20, recorder.last_seq,
             len(idents) - len(paths))


#: A resync's files are marked as changed by this (never written) record until recorded.
RESYNC_PENDING = 1 << 62


def _initial_sync_state(spool: SpoolWriter) -> tuple[bool, int]:
    """(whether the initial scan must run, the seq it ended at if it is done)."""
    state = read_initial_sync(spool.path)
    if spool.next_seq == 1:
        return True, 0
    if state is None:  # a spool from before initial-sync markers: its scan completed
        return False, 1
    if state.get("state") != "done":
        raise StateError(f"the initial sync of {spool.identity.source} into spool "
                         f"{spool.path} was interrupted; protect again with a new spool")
    return False, int(state.get("end_seq") or 1)


#: Where a daemon locks the directory it protects (one lock file per device and inode).
SOURCE_LOCKS = Path("/run/zfsrep")


def _lock_source(source: str) -> tuple[int, Path] | None:
    """Lock the backing directory for this daemon (SOURCE_LOCKS/source-DEV-INO.lock, flock):
    two mounts over one directory would each capture only the changes made through it.
    StateError if another daemon holds it; None (no lock) if the lock directory cannot be
    made (not root): the spool's own lock still keeps two daemons off one spool."""
    st = os.stat(source)
    path = SOURCE_LOCKS / f"source-{st.st_dev}-{st.st_ino}.lock"
    try:
        SOURCE_LOCKS.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        log.debug("no lock on %s: %s", source, e.strerror or e)
        return None
    fd, holder = try_lock(path)
    if fd is None:
        raise StateError(f"{source} is protected by another mount daemon"
                         f"{f' (pid {holder})' if holder else ''}: one mount per directory")
    return fd, path


def _unlock_source(lock: tuple[int, Path] | None) -> None:
    if lock is None:
        return
    fd, path = lock
    with contextlib.suppress(OSError):  # removed while still locked: a later daemon that
        os.unlink(path)                 # opened it before sees another inode and retries
    os.close(fd)


async def run_protected_mount(opts: ProtectOptions, ready: Callable[[], None]) -> None:
    """Serve the protected mount until it is unmounted or the process is told to stop."""
    check_options(opts)
    lock = _lock_source(str(opts.source.resolve()))
    try:
        await _run_protected_mount(opts, ready)
    finally:
        _unlock_source(lock)


async def _run_protected_mount(opts: ProtectOptions, ready: Callable[[], None]) -> None:
    fd_limit = _raise_fd_limit()
    log.info("descriptor limit %d (one per file or directory the kernel has looked up)",
             fd_limit)
    keep_large_buffers()
    os.umask(0)  # modes are computed per request from the caller's umask
    source = str(opts.source.resolve())
    root_ident = os.stat(source).st_ino
    spool = None
    run_state: RunState | None = None
    hook = SessionHook()
    recorder: CaptureStream | NullRecorder = NullRecorder()
    shipper: VolumeShipper | None = None
    must_scan, synced_seq = False, 0
    resync: set[int] | None = None
    progress = ScanProgress()
    if opts.capture:
        assert opts.spool is not None
        spool = SpoolWriter(opts.spool, VolumeIdentity(source, root_ident, BLOCK_SIZE),
                            limit=opts.spool_limit,
                            segment_bytes=(16 << 20) if opts.link else (64 << 20))
        resync = _check_previous_run(spool, opts.link)
        must_scan, synced_seq = _initial_sync_state(spool)
        run_state = RunState(spool.path, spool.next_seq - 1)
        hook.set_run_counter(run_state.counter)
        if not hook.set_dirty_table(run_state.dirty):
            run_state.overflow()  # (no native hook: a loss cannot be repaired)
        recorder = CaptureStream(spool, next_seq=spool.next_seq,
                                 memory_limit=opts.memory_limit, external=hook,
                                 on_numbered=run_state.numbered,
                                 on_changed=_changes_to(run_state, hook),
                                 on_written=run_state.written)
        if opts.link is not None:
            spool.keep_recent = RECENT_FRAMES_BYTES
            shipper = VolumeShipper(opts.link, spool, recorder, progress, synced_seq,
                                    CompletionGate(hook.set_frozen))
            shipper.on_retire = pyfuse3.terminate
            shipper.in_place = InPlaceRestore(
                source, root_ident, recorder, spool, shipper.gate, opts.link.address,
                opts.link.vpg, opts.link.volume)
            shipper.in_place.resume_at_start()
            await shipper.first_contact()
    async with trio.open_nursery() as link_nursery:
        async with trio.open_nursery() as nursery:
            if isinstance(recorder, CaptureStream):
                await nursery.start(recorder.run)
            try:
                if resync is not None and isinstance(recorder, CaptureStream):
                    await _resync(source, resync, recorder, hook, ready)
                if shipper is not None:
                    await link_nursery.start(shipper.run)
                if must_scan:
                    assert spool is not None
                    await _initial_sync(source, spool, recorder, progress, shipper, ready)
                await _serve(opts, source, recorder, hook, ready,
                             shipper.gate if shipper is not None else None,
                             shipper.in_place if shipper is not None else None, run_state)
            finally:
                if isinstance(recorder, CaptureStream):
                    await recorder.aclose()
        if shipper is not None:
            await shipper.drain(opts.drain_timeout)
            ls = shipper.state
            log.info("replication: %d frames (%d bytes) sent this session, records through %d "
                     "acknowledged", ls.sent_frames, ls.sent_bytes, ls.acked_seq)
            gs = shipper.gate.stats
            if gs.freezes:
                log.info("checkpoint barriers: %d, answers held %.1f ms at most, %.2f ms on "
                         "average; %d ended without a thaw", gs.freezes, 1e3 * gs.max_held_s,
                         1e3 * gs.held_s / gs.freezes, gs.expired)
        link_nursery.cancel_scope.cancel()
    if isinstance(recorder, CaptureStream):
        st = recorder.stats
        log.info("stopped: %d records in %d frames (%d bytes) captured this session, last seq "
                 "%d; writers waited for the spool %d times", st.records, st.frames,
                 st.frame_bytes, st.last_seq_sunk, st.waits)
    if run_state is not None:  # everything captured is in the spool
        hook.set_run_counter(None)
        hook.set_dirty_table(None)
        run_state.close(clean=True)
    if shipper is not None and shipper.retired and spool is not None:
        await trio.to_thread.run_sync(_remove_moved_data, source, spool.path)


#: Records that change a file's content or attributes: a lost one is repaired by recording
#: the file again (the run state's table); any other kind, lost, is not.
_DATA_OPS = frozenset((Op.WRITE, Op.TRUNCATE, Op.SETATTR, Op.FALLOCATE))


def _changes_to(run_state: RunState, hook: SessionHook) -> Callable[[int, object, int], None]:
    """The capture stream's ``on_changed``: which record changed which file."""
    def changed(op: int, ident: object, seq: int) -> None:
        if op in _DATA_OPS and isinstance(ident, int):
            if not hook.mark_dirty(ident, seq):
                run_state.overflow()
        else:
            run_state.other_change(seq)
    return changed


def _remove_moved_data(source: str, spool: Path) -> None:
    """After a committed move (the volume lives at the recovery site now): empty the source
    directory and delete the spool."""
    for entry in os.scandir(source):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as e:
            log.error("move committed, but %s could not be removed: %s", entry.path,
                      e.strerror or e)
    for entry in os.scandir(spool):  # (the daemon's log may be in there: it stays)
        if not entry.name.endswith(".log"):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    log.info("move committed: %s emptied and its spool %s removed", source, spool)


async def _initial_sync(source: str, spool: SpoolWriter, recorder, progress: ScanProgress,
                        shipper: VolumeShipper | None, ready: Callable[[], None]) -> None:
    """Record the directory's current content first (Initial Sync); no checkpoint is
    offered before it is complete."""
    log.info("first protection of %s: recording its current content", source)
    write_initial_sync(spool.path, {"state": "running"})
    progress.total_bytes = await trio.to_thread.run_sync(count_tree, source)
    log.info("initial sync: %d MiB to record", progress.total_bytes >> 20)
    def report(p: ScanProgress) -> None:
        say = getattr(ready, "progress", None)  # the protect command shows it while it waits
        if say is not None and p.total_bytes:
            say(f"initial sync: {100.0 * p.bytes / p.total_bytes:.0f}% ({p.bytes >> 20} of "
                f"{p.total_bytes >> 20} MiB, {p.entries} entries)")

    await scan_tree(source, recorder, progress=progress, report=report, progress_every=1.0)
    end_seq = recorder.last_seq
    write_initial_sync(spool.path, {"state": "done", "end_seq": end_seq})
    log.info("initial scan done: %d entries, %d bytes, through record %d", progress.entries,
             progress.bytes, end_seq)
    if shipper is not None:
        shipper.initial_sync_done(end_seq)


async def _drain_fast_writes(eventfd: int, recorder: CaptureStream) -> None:
    """Take the fast path's queued writes into the stream when it signals a full frame."""
    while True:
        await trio.lowlevel.wait_readable(eventfd)
        try:
            os.eventfd_read(eventfd)
        except BlockingIOError:
            continue
        recorder.take_external()


async def _close_released(volume: BackingVolume) -> None:
    """Close the files whose RELEASE the fast path answered, at least every RELEASE_CLOSE_S
    (they are also closed before anything opens a file): an unlinked file's space comes
    back soon after its last close, as on the backing directory."""
    while True:
        await trio.sleep(RELEASE_CLOSE_S)
        volume.collect_released()


async def _serve(opts: ProtectOptions, source: str, recorder, hook: SessionHook,
                 ready: Callable[[], None], gate: CompletionGate | None,
                 in_place: InPlaceRestore | None, run_state: RunState | None = None) -> None:
    volume = BackingVolume(source, recorder)
    if in_place is not None:
        in_place.volume = volume
        if in_place.active:  # a restore in place is before commit: its trees stay hidden
            volume.hidden = RESERVED
    ops = PassthroughOperations(volume, recorder, hook, trio.CapacityLimiter(4), gate)
    ops.run = run_state
    options = set(pyfuse3.default_options)
    options |= {f"fsname=zfsrep:{source}", "subtype=zfsrep"}
    if opts.allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, str(opts.mountpoint), options)
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    capture = isinstance(recorder, CaptureStream)
    hook.install(eventfd, fast=opts.fast_path, capture=capture, limit=opts.memory_limit)
    if hook.active:
        hook.register_node(ROOT_NODE, volume.root.fd, is_dir=True)
        volume.released = hook.take_released
        volume.on_retire = lambda: hook.unregister_nodes(ROOT_NODE)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signals)
            if capture:
                nursery.start_soon(_drain_fast_writes, eventfd, recorder)
            if hook.active:
                nursery.start_soon(_close_released, volume)
            log.info("protecting %s at %s", source, opts.mountpoint)
            if in_place is not None:
                in_place.serving = True
            ready()
            nursery.start_soon(_report_killpriv, hook)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        if in_place is not None:
            in_place.serving = False
        hook.shutdown()
        pyfuse3.close(unmount=True)
        volume.close()
        os.close(eventfd)
        log.info("fast path answered %s", ", ".join(
            f"{count} {kind}" for kind, count in hook.counts().items()))
        log.info("request buffers: %d allocated, %d reused", *hook.buffer_counts())
