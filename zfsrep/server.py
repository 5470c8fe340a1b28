"""The journal server (``zfsrep serve``): one trio event loop serving mounts and the CLI.

Per volume, three workers: the connection of its mount (frames in, acknowledgements out), a
committer that makes appended frames durable (one fsync for everything appended since the last
one: group commit) and then acknowledges them, and an indexer that turns durable frames into
the index (zfsrep.index) and trims the journal behind it. Journal work runs on one thread per
volume and index work on another, so the event loop never waits for a disk. Per VPG, a
scheduler records an automatic checkpoint every interval. Control requests (CLI) are handled
by zfsrep.control on their own connections. A failing connection is logged and closed; it
never stops the server (DESIGN invariant 6). Protocol: docs/protocol.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from zfsrep import (
    inplace,  # noqa: F401  (registers the restore and view requests)
    protocol,
)
from zfsrep.checkpoints import Checkpoint, CheckpointLog
from zfsrep.control import serve_control
from zfsrep.errors import (
    CorruptDataError,
    NotFoundError,
    OSFailure,
    StateError,
    UsageError,
    ZfsrepError,
)
from zfsrep.index import VolumeIndex
from zfsrep.journal import VolumeJournal
from zfsrep.operations import describe, move_holds, protection_refused
from zfsrep.pacer import Pacer
from zfsrep.store import RemovedVolume, Store, VolumeMeta, VpgSettings, check_name

log = logging.getLogger(__name__)

T = TypeVar("T")

HELLO_TIMEOUT = 10.0
MARK_TIMEOUT = 10.0
#: How long a barrier waits for every volume to freeze; below zfsrep.barrier.MAX_FREEZE, so
#: that volumes frozen in time are still frozen when the thaw arrives.
FREEZE_TIMEOUT = 1.0
DURABLE_TIMEOUT = 60.0
INDEX_BATCH_BYTES = 64 << 20
INDEX_NICE = 10
APPENDS_IN_FLIGHT = 4
INDEX_QUIET_S = 0.5
INDEX_DEFER_BYTES = 1 << 30


async def on_future(fut: concurrent.futures.Future[T]) -> T:
    """Wait for a future of a worker thread without holding a trio worker thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_fut: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    fut.add_done_callback(wake)
    await done.wait()
    return fut.result()


async def on_thread(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on ``executor`` (a one-thread executor owns its object) and wait for it.
    Cancellation stops the wait, not the work."""
    return await on_future(executor.submit(fn, *args))


def _lower_priority() -> None:
    from zfsrep.syscalls import lower_thread_priority

    lower_thread_priority(INDEX_NICE)


class ProtectionStopped(StateError):
    """A mount's connection refused because its VPG is failed over."""


class VolumeConnection:
    """The live connection of a volume's mount."""

    def __init__(self, conn: protocol.MessageStream, scope: trio.CancelScope) -> None:
        self.conn = conn
        self.scope = scope
        self.since = time.time()
        self._marks: dict[int, tuple[trio.Event, list]] = {}
        self._next_mark = 0

    async def ask(self, kind: str, timeout: float, fields: dict | None = None
                  ) -> tuple[dict | None, str | None]:
        """Send ``{"t": kind, "id": K, **fields}`` and wait for the mount's answer with the
        same id (marked, frozen, thawed, ...): the answer, or None and why there is none."""
        self._next_mark += 1
        mark_id = self._next_mark
        event, slot = trio.Event(), list[dict]()
        self._marks[mark_id] = (event, slot)
        try:
            try:
                await self.conn.send({**(fields or {}), "t": kind, "id": mark_id})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None, "the mount disconnected"
            with trio.move_on_after(timeout):
                await event.wait()
                return slot[0], None
            return None, f"the mount did not answer a {kind} request within {timeout:g} s"
        finally:
            self._marks.pop(mark_id, None)

    async def position(self, kind: str = "mark") -> tuple[int | None, str | None]:
        """The volume's stream position for a checkpoint (``mark``), or the same while
        freezing it (``freeze``, the first half of a barrier); None and why if none."""
        msg, why = await self.ask(kind, FREEZE_TIMEOUT if kind == "freeze" else MARK_TIMEOUT)
        if msg is None:
            return None, why
        seq = msg.get("seq")
        return (int(seq) if isinstance(seq, int) else None), msg.get("reason")

    def answered(self, msg: dict) -> None:
        entry = self._marks.get(msg.get("id"))  # type: ignore[arg-type]
        if entry is not None:
            entry[1].append(msg)
            entry[0].set()


@dataclass
class VolumeRuntime:
    vpg: str
    meta: VolumeMeta
    dir: Path
    journal: VolumeJournal
    index: VolumeIndex
    journal_thread: ThreadPoolExecutor
    index_thread: ThreadPoolExecutor
    sync_thread: ThreadPoolExecutor
    durable_seq: int = 0
    indexed_seq: int = 0
    conn: VolumeConnection | None = None
    disconnected_since: float = field(default_factory=time.time)
    report: dict = field(default_factory=dict)
    error: str | None = None
    received_bytes: int = 0  # frames appended since the server started
    indexed_bytes: int = 0  # of those, frames the indexer has applied
    last_data: float = 0.0  # monotonic time of the last frame
    index_wanted: int = 0  # readers waiting for the index to reach a position
    changed: trio.Event = field(default_factory=trio.Event)
    dirty: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def name(self) -> str:
        return self.meta.name

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, test: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not test():
                if self.error is not None:
                    raise OSFailure(f"volume {self.vpg}/{self.name}: {self.error}")
                await self.changed.wait()
            return True
        return False


@dataclass
class VpgRuntime:
    settings: VpgSettings
    log: CheckpointLog
    volumes: dict[str, VolumeRuntime] = field(default_factory=dict)
    lock: trio.Lock = field(default_factory=trio.Lock)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    last_problem: str | None = None
    deleting: bool = False
    #: the recovery operation under way (persisted in operation.json), e.g. a failover test
    operation: dict | None = None
    #: volumes removed from the VPG, which older checkpoints still name (oldest first)
    removed: list[RemovedVolume] = field(default_factory=list)
    #: names of volumes being removed (a mount may not attach under them meanwhile)
    removing: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.settings.name


class JournalServer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.vpgs: dict[str, VpgRuntime] = {}
        self._nursery: trio.Nursery | None = None
        self.started = time.time()
        #: set by serve() for --cpu-priority background (zfsrep.pacer)
        self.pacer: Pacer | None = None

    # ---- startup -----------------------------------------------------------------------
    async def run(self, listen: tuple[str, int], *,
                  task_status: trio.TaskStatus[list[trio.SocketListener]]
                  = trio.TASK_STATUS_IGNORED) -> None:
        host, port = listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for name in self.store.vpg_names():
                    await self._load_vpg(name)
                nursery.start_soon(trio.serve_listeners, self._handle, listeners)
                log.info("journal server listening on %s:%d, store %s",
                         host, listeners[0].socket.getsockname()[1], self.store.root)
                task_status.started(listeners)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._close_all()

    async def _load_vpg(self, name: str) -> VpgRuntime:
        settings = self.store.load_vpg(name)
        cplog = await trio.to_thread.run_sync(
            lambda: CheckpointLog(self.store.checkpoint_log_path(name), vpg=name))
        vpg = VpgRuntime(settings, cplog)
        vpg.operation = self.store.load_operation(name)
        if vpg.operation is not None:
            log.info("VPG %s: %s of checkpoint %s is under way (%s)", name,
                     vpg.operation.get("op"), vpg.operation.get("checkpoint", {}).get("id"),
                     vpg.operation.get("phase"))
        self.vpgs[name] = vpg
        vpg.removed = await trio.to_thread.run_sync(self.store.removed_volumes, name)
        for vol in self.store.volume_names(name):
            meta = self.store.load_volume(name, vol)
            if meta is not None:
                await self._open_volume(vpg, meta)
        assert self._nursery is not None
        self._nursery.start_soon(self._scheduler, vpg)
        return vpg

    async def _open_volume(self, vpg: VpgRuntime, meta: VolumeMeta) -> VolumeRuntime:
        voldir = self.store.volume_dir(vpg.name, meta.name)
        jthread = ThreadPoolExecutor(1, thread_name_prefix=f"journal-{meta.name}")
        # indexing is background work: it yields the CPU to mounts and acknowledgements
        ithread = ThreadPoolExecutor(1, thread_name_prefix=f"index-{meta.name}",
                                     initializer=_lower_priority)
        sthread = ThreadPoolExecutor(1, thread_name_prefix=f"fsync-{meta.name}")
        journal = await on_thread(jthread, VolumeJournal, voldir / "journal")
        index = await on_thread(ithread, VolumeIndex, voldir, meta.root_ident)
        vol = VolumeRuntime(vpg.name, meta, voldir, journal, index, jthread, ithread, sthread,
                            durable_seq=journal.durable_seq, indexed_seq=index.indexed_seq)
        if vol.indexed_seq > vol.durable_seq:
            raise CorruptDataError(f"volume {vpg.name}/{meta.name}: the index holds record "
                                   f"{vol.indexed_seq} but the journal ends at {vol.durable_seq}")
        vpg.volumes[meta.name] = vol
        assert self._nursery is not None
        self._nursery.start_soon(self._volume_workers, vol)
        log.info("volume %s/%s: journal through record %d, indexed through %d",
                 vpg.name, meta.name, vol.durable_seq, vol.indexed_seq)
        return vol

    async def remove_volume(self, vpg: VpgRuntime, name: str) -> RemovedVolume:
        """Take a volume that is not connected out of the VPG: new checkpoints go on without
        it; the checkpoints that hold it keep finding its data (indexed to the end first)."""
        vol = vpg.volumes.get(name)
        if vol is None:
            raise NotFoundError(f"VPG {vpg.name} has no volume {name}")
        if vpg.operation is not None:
            raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}")
        if vol.conn is not None:
            raise StateError(f"volume {name} is connected: stop its mount first")
        if vol.error is None and vol.indexed_seq < vol.durable_seq:
            vol.index_wanted += 1  # everything durable is indexed before the data moves
            vol.notify()
            try:
                with trio.move_on_after(DURABLE_TIMEOUT):
                    while vol.indexed_seq < vol.durable_seq and vol.error is None:
                        await vol.changed.wait()
            finally:
                vol.index_wanted -= 1
        async with vpg.lock:
            if vol.conn is not None:
                raise StateError(f"volume {name} is connected: stop its mount first")
            if vol.indexed_seq < vol.durable_seq:
                raise StateError(f"volume {name}: its journal is not indexed to the end "
                                 f"({vol.indexed_seq} of {vol.durable_seq}: "
                                 f"{vol.error or 'try again'})")
            # checkpoints up to an earlier removal of the name hold an earlier volume
            earlier = max((r.last_checkpoint for r in vpg.removed if r.name == name), default=0)
            last = max((cp.id for cp in vpg.log.all()
                        if name in cp.positions and cp.id > earlier), default=0)
            del vpg.volumes[name]
            vpg.removing.add(name)
            await self._close_volume(vol)
            try:
                if last == 0:  # no checkpoint holds this volume: nothing to keep
                    await trio.to_thread.run_sync(self.store.discard_volume, vpg.name, name)
                    gone = RemovedVolume(name, 0, vol.meta.root_ident, "", vol.dir)
                else:
                    gone = await trio.to_thread.run_sync(
                        self.store.remove_volume, vpg.name, name, last, vol.meta.root_ident)
                    vpg.removed.append(gone)
            except BaseException:
                with trio.CancelScope(shield=True):  # the volume stays, as it was
                    await self._open_volume(vpg, vol.meta)
                raise
            finally:
                vpg.removing.discard(name)
        log.info("VPG %s: volume %s removed; checkpoints up to %d keep it", vpg.name, name,
                 last)
        return gone

    async def _close_volume(self, vol: VolumeRuntime) -> None:
        vol.scope.cancel()
        if vol.conn is not None:
            vol.conn.scope.cancel()
        await on_thread(vol.journal_thread, vol.journal.close)
        await on_thread(vol.index_thread, vol.index.close)
        for executor in (vol.journal_thread, vol.index_thread, vol.sync_thread):
            executor.shutdown(wait=True)

    async def _close_all(self) -> None:
        for vpg in list(self.vpgs.values()):
            vpg.scope.cancel()
            for vol in list(vpg.volumes.values()):
                try:
                    await self._close_volume(vol)
                except Exception:
                    log.exception("closing volume %s/%s", vpg.name, vol.name)
            vpg.log.close()

    # ---- per-volume workers ------------------------------------------------------------
    async def _volume_workers(self, vol: VolumeRuntime) -> None:
        with vol.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, vol, self._committer)
                nursery.start_soon(self._guarded, vol, self._indexer)

    async def _guarded(self, vol: VolumeRuntime, worker: Callable) -> None:
        """A volume worker's unexpected failure (a bug) puts that volume in error; the
        server goes on serving everything else."""
        try:
            await worker(vol)
        except Exception as e:
            log.exception("volume %s/%s: %s failed", vol.vpg, vol.name, worker.__name__)
            vol.error = f"internal error in {worker.__name__.strip('_')}: {e}"
            vol.notify()

    async def _committer(self, vol: VolumeRuntime) -> None:
        """Make appended frames durable, then acknowledge them (group commit)."""
        while True:
            await vol.dirty.wait()
            vol.dirty = trio.Event()
            try:
                # on its own thread: appends go on during the fsync (group commit)
                durable = await on_thread(vol.sync_thread, vol.journal.sync)
            except (OSError, ZfsrepError) as e:
                vol.error = f"journal storage error: {e}"
                log.error("volume %s/%s: %s; no further frames are accepted until the server "
                          "restarts", vol.vpg, vol.name, vol.error)
                vol.notify()
                if vol.conn is not None:
                    vol.conn.scope.cancel()
                return
            if durable > vol.durable_seq:
                vol.durable_seq = durable
                vol.notify()
                if vol.conn is not None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await vol.conn.conn.send({"t": "ack", "seq": durable})

    def _index_some(self, vol: VolumeRuntime, upto: int) -> int:
        """(index thread) Index durable frames after indexed_seq, about INDEX_BATCH_BYTES."""
        index = vol.index
        done = 0
        start = index.indexed_seq + 1
        frame_bytes = 0
        for header, records in vol.journal.read_from(start):
            if header.first_seq > upto:
                break
            if header.first_seq < start:  # the frame holding ``start`` comes whole
                records = [r for r in records if r[0] >= start]
            index.apply(records)
            done += header.raw_len
            frame_bytes += header.frame_len
            if header.last_seq >= upto or done >= INDEX_BATCH_BYTES:
                break
        index.commit()
        vol.indexed_bytes += frame_bytes
        return index.indexed_seq

    async def _indexer(self, vol: VolumeRuntime) -> None:
        while True:
            if vol.indexed_seq >= vol.durable_seq:
                await vol.changed.wait()
                continue
            backlog = vol.received_bytes - vol.indexed_bytes
            if (not vol.index_wanted and backlog < INDEX_DEFER_BYTES
                    and time.monotonic() - vol.last_data < INDEX_QUIET_S):
                # frames are streaming in: index in the quiet after the burst (or once the
                # backlog is large, or when a reader waits), so a busy link does not compete
                # with its own indexing for the CPU; checkpoints only need the journal
                await trio.sleep(INDEX_QUIET_S / 2)
                continue
            try:
                indexed = await on_thread(vol.index_thread, self._index_some, vol,
                                          vol.durable_seq)
            except (OSError, ZfsrepError) as e:
                vol.error = f"index error: {e}"
                log.error("volume %s/%s: %s", vol.vpg, vol.name, vol.error)
                vol.notify()
                return
            if indexed > vol.indexed_seq:
                vol.indexed_seq = indexed
                vol.notify()
                await on_thread(vol.journal_thread, vol.journal.trim, indexed)

    # ---- checkpoints -------------------------------------------------------------------
    async def _scheduler(self, vpg: VpgRuntime) -> None:
        with vpg.scope:
            while True:
                interval = vpg.settings.checkpoint_interval_s
                now = time.time()
                await trio.sleep(math.ceil(now / interval) * interval - now + 0.001)
                if not vpg.volumes:
                    continue
                try:
                    await self.take_checkpoint(vpg, "auto")
                    vpg.last_problem = None
                except ZfsrepError as e:
                    if str(e) != vpg.last_problem:
                        log.info("VPG %s: no automatic checkpoint: %s", vpg.name, e)
                    vpg.last_problem = str(e)
                except Exception as e:  # a bug must not stop checkpoints or the server
                    log.exception("VPG %s: automatic checkpoint failed", vpg.name)
                    vpg.last_problem = f"internal error: {e}"

    async def take_checkpoint(self, vpg: VpgRuntime, kind: str, tag: str | None = None,
                              **extra: Any) -> Checkpoint:
        """Place a checkpoint at the current position of every volume's stream and return
        once it is durable."""
        async with vpg.lock:
            if vpg.deleting:
                raise StateError(f"VPG {vpg.name} is being deleted")
            why = protection_refused(vpg)
            if why is not None:
                raise StateError(why)
            vols = list(vpg.volumes.values())
            if not vols:
                raise StateError(f"VPG {vpg.name} has no volumes")
            for vol in vols:
                if vol.error is not None:
                    raise StateError(f"volume {vol.name}: {vol.error}")
                if vol.conn is None:
                    raise StateError(f"volume {vol.name} is not connected")
                if not vol.meta.synced_seq:
                    raise StateError(f"volume {vol.name}: initial sync is not complete")
            time_ns = time.time_ns()
            positions = await self._positions(vols)
            for vol in vols:
                seq = positions[vol.name]
                if seq < vol.meta.synced_seq:
                    raise StateError(f"volume {vol.name}: initial sync is not complete")
                def durable(v: VolumeRuntime = vol, s: int = seq) -> bool:
                    return v.durable_seq >= s

                if not await vol.wait_until(durable, DURABLE_TIMEOUT):
                    raise StateError(f"volume {vol.name}: records through {seq} were not "
                                     f"acknowledged within {DURABLE_TIMEOUT:g} s")
            cp = Checkpoint(id=0, time_ns=time_ns, kind=kind, tag=tag, positions=positions,
                            **extra)
            return await trio.to_thread.run_sync(vpg.log.append, cp)

    async def _positions(self, vols: list[VolumeRuntime]) -> dict[str, int]:
        """Each volume's stream position for one checkpoint, together a consistent cut.

        One volume: its position now (a prefix-closed cut of its stream). Several: a barrier
        (zfsrep.barrier): freeze every volume (each holds its answers and reports its
        position), then thaw them all; the cut holds only if every volume was still frozen
        when its thaw arrived, so that there was an instant when all were frozen."""
        positions: dict[str, int] = {}
        problems: list[str] = []
        kind = "freeze" if len(vols) > 1 else "mark"
        asked: list[tuple[str, VolumeConnection]] = []

        async def ask_position(vol: VolumeRuntime) -> None:
            conn = vol.conn
            if conn is None:
                problems.append(f"volume {vol.name} disconnected")
                return
            asked.append((vol.name, conn))
            seq, why = await conn.position(kind)
            if seq is None:
                problems.append(f"volume {vol.name}: {why}")
            else:
                positions[vol.name] = seq

        async def thaw(name: str, conn: VolumeConnection) -> None:
            msg, why = await conn.ask("thaw", MARK_TIMEOUT)
            if name not in positions:
                return  # its freeze failed already (it may have frozen late: thawed now)
            if msg is None:
                problems.append(f"volume {name}: {why}")
            elif msg.get("held") is not True:
                problems.append(f"volume {name} thawed by itself before the barrier "
                                "completed")

        async with trio.open_nursery() as nursery:
            for vol in vols:
                nursery.start_soon(ask_position, vol)
        if kind == "freeze":
            with trio.CancelScope(shield=True):  # every volume asked to freeze is thawed
                async with trio.open_nursery() as nursery:
                    for name, conn in asked:
                        nursery.start_soon(thaw, name, conn)
        if problems:
            raise StateError("; ".join(sorted(problems)))
        return positions

    # ---- connections -------------------------------------------------------------------
    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = protocol.MessageStream(stream)
        peer = "?"
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
            with trio.fail_after(HELLO_TIMEOUT):
                hello = await conn.receive()
            if hello is None:
                return
            if hello.get("t") != "hello" or hello.get("proto") != protocol.PROTOCOL:
                raise protocol.ProtocolError(
                    f"expected a {protocol.PROTOCOL} hello, got {hello.get('t')!r} "
                    f"{hello.get('proto')!r}")
            role = hello.get("role")
            if role == "control":
                await conn.send({"t": "welcome", "proto": protocol.PROTOCOL})
                await serve_control(self, conn)
            elif role == "volume":
                await self._serve_volume(conn, hello, peer)
            else:
                raise protocol.ProtocolError(f"unknown role {role!r}")
        except ZfsrepError as e:
            # a mount refused while its VPG is failed over retries every few seconds: info
            level = logging.INFO if isinstance(e, ProtectionStopped) else logging.WARNING
            log.log(level, "connection from %s: %s", peer, e)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await conn.send(protocol.error_reply(e))
        except trio.TooSlowError:
            log.warning("connection from %s: no hello within %g s", peer, HELLO_TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("connection from %s closed: %s", peer, e)
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    def vpg(self, name: object) -> VpgRuntime:
        if not isinstance(name, str):
            raise UsageError("a VPG name is required")
        vpg = self.vpgs.get(name)
        if vpg is None or vpg.deleting:
            raise NotFoundError(f"no VPG named {name}")
        return vpg

    async def _attach(self, vpg: VpgRuntime, hello: dict) -> VolumeRuntime:
        name = check_name("volume", hello.get("volume"))  # type: ignore[arg-type]
        fields = {k: hello.get(k) for k in ("root_ident", "source", "host", "spool_id")}
        if not isinstance(fields["root_ident"], int) or not all(
                isinstance(fields[k], str) for k in ("source", "host", "spool_id")):
            raise protocol.ProtocolError("volume hello lacks root_ident/source/host/spool_id")
        if name in vpg.removing:
            raise StateError(f"volume {name} of VPG {vpg.name} is being removed")
        vol = vpg.volumes.get(name)
        first_seq = hello.get("first_seq", 1)
        durable = 0 if vol is None else vol.durable_seq
        if isinstance(first_seq, int) and first_seq > durable + 1 and (
                vol is None or vol.meta.spool_id == fields["spool_id"]):
            raise StateError(
                f"volume {name} of VPG {vpg.name}: the journal holds records through "
                f"{durable} but the spool starts at record {first_seq} (the records between "
                "were trimmed after another server acknowledged them); protect the directory "
                "again with a new spool (a full initial sync)")
        if vol is None:
            meta = VolumeMeta(name=name, **fields)  # type: ignore[arg-type]
            await trio.to_thread.run_sync(self.store.save_volume, vpg.name, meta)
            log.info("VPG %s: new volume %s (%s on %s)", vpg.name, name, meta.source,
                     meta.host)
            return await self._open_volume(vpg, meta)
        if vol.meta.spool_id != fields["spool_id"]:
            raise StateError(
                f"volume {name} of VPG {vpg.name} holds the stream of {vol.meta.source} on "
                f"{vol.meta.host} from another spool; protect with another --volume name, or "
                f"take the volume out first ('zfsrep vpg remove-volume {vpg.name} {name}')")
        return vol

    async def _serve_volume(self, conn: protocol.MessageStream, hello: dict, peer: str) -> None:
        vpg = self.vpg(hello.get("vpg"))
        why = protection_refused(vpg)
        if why is not None:
            raise ProtectionStopped(why)
        vol = await self._attach(vpg, hello)
        if vol.error is not None:
            raise StateError(f"volume {vol.name}: {vol.error}")
        last_seq = hello.get("last_seq")
        if not isinstance(last_seq, int) or last_seq < vol.durable_seq:
            raise StateError(
                f"volume {vol.name}: the journal holds records through {vol.durable_seq} but "
                f"the spool ends at {last_seq}; this spool does not continue the stream")
        synced = hello.get("synced_seq")
        if isinstance(synced, int) and synced and not vol.meta.synced_seq:
            await self._set_synced(vpg, vol, synced)
        with trio.CancelScope() as scope:
            vc = VolumeConnection(conn, scope)
            old, vol.conn = vol.conn, vc
            if old is not None:
                log.info("volume %s/%s: a new connection replaces the one from %s",
                         vpg.name, vol.name, old.since)
                old.scope.cancel()
            log.info("volume %s/%s connected from %s; journal through record %d",
                     vpg.name, vol.name, peer, vol.durable_seq)
            try:
                hold = await move_holds(self, vpg, vol.name, last_seq)
                await conn.send({"t": "welcome", "proto": protocol.PROTOCOL,
                                 "durable_seq": vol.durable_seq,
                                 "checkpoint_interval": vpg.settings.checkpoint_interval_s,
                                 "hold": hold, "background": self.background})
                await self._volume_messages(vpg, vol, vc)
            finally:
                if vol.conn is vc:
                    vol.conn = None
                    vol.disconnected_since = time.time()
                    log.info("volume %s/%s disconnected", vpg.name, vol.name)

    @property
    def background(self) -> bool:
        """Whether the links should send at background CPU priority (zfsrep.pacer)."""
        return self.pacer is not None and self.pacer.background

    def announce_pace(self) -> None:
        """(event loop, from the pacer's thread) Tell every connected mount the links' CPU
        priority now. Nothing once the server is stopping (an exception here would end the
        event loop)."""
        msg = {"t": "pace", "background": self.background}
        for vpg in list(self.vpgs.values()):
            for vol in list(vpg.volumes.values()):
                if vol.conn is not None and self._nursery is not None:
                    try:
                        self._nursery.start_soon(self._send_quietly, vol.conn.conn, msg)
                    except RuntimeError:  # the nursery is closed: stopping
                        return

    @staticmethod
    async def _send_quietly(conn: protocol.MessageStream, msg: dict) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await conn.send(msg)

    async def _set_synced(self, vpg: VpgRuntime, vol: VolumeRuntime, seq: int) -> None:
        vol.meta.synced_seq = seq
        await trio.to_thread.run_sync(self.store.save_volume, vpg.name, vol.meta)
        log.info("volume %s/%s: initial sync complete at record %d", vpg.name, vol.name, seq)

    async def _volume_messages(self, vpg: VpgRuntime, vol: VolumeRuntime,
                               vc: VolumeConnection) -> None:
        # Appends run on the volume's journal thread, in order, while the next message is
        # received; each finished append wakes the committer. A failed append (a gap, a bad
        # checksum) is raised at the next message or at the end, and ends the connection.
        appending: deque[concurrent.futures.Future] = deque()
        token = trio.lowlevel.current_trio_token()
        failed = trio.CancelScope()  # cancelled when an append fails: its error ends this

        def appended(fut: concurrent.futures.Future, *, msg: dict) -> None:
            def on_loop() -> None:
                vc.conn.release(msg)  # the journal has written the frame: reuse its buffer
                vol.dirty.set()
                if fut.exception() is not None:
                    failed.cancel()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(on_loop)

        try:
            with failed:
                await self._receive_volume(vpg, vol, vc, appending, appended)
                return
            while appending:  # an append failed: raise its error
                appending.popleft().result()
        finally:
            with trio.CancelScope(shield=True):
                while appending:
                    with contextlib.suppress(Exception):
                        await on_future(appending.popleft())

    async def _receive_volume(self, vpg: VpgRuntime, vol: VolumeRuntime, vc: VolumeConnection,
                              appending: deque, appended: Callable) -> None:
        conn = vc.conn
        while True:
            while appending and appending[0].done():
                appending.popleft().result()
            msg = await conn.receive()
            if msg is None:
                return
            kind = msg["t"]
            if kind == "data":
                frame = msg.get("frame")
                if not isinstance(frame, bytes | memoryview):
                    raise protocol.ProtocolError("data message without a frame")
                if vol.error is not None:
                    raise StateError(f"volume {vol.name}: {vol.error}")
                if len(appending) >= APPENDS_IN_FLIGHT:
                    await on_future(appending.popleft())
                fut = vol.journal_thread.submit(vol.journal.append, frame)
                fut.add_done_callback(functools.partial(appended, msg=msg))
                appending.append(fut)
                vol.received_bytes += len(frame)
                vol.last_data = time.monotonic()
            elif kind in ("marked", "frozen", "thawed", "quiesced", "resumed", "retiring",
                          "done"):
                vc.answered(msg)
            elif kind == "stat":
                vol.report = {k: msg.get(k) for k in (
                    "time", "captured_seq", "written_seq", "spool_bytes", "spool_limit",
                    "unacked_bytes", "capture_failed", "scan")}
            elif kind == "synced":
                seq = msg.get("seq")
                if isinstance(seq, int) and seq > 0 and not vol.meta.synced_seq:
                    await self._set_synced(vpg, vol, seq)
            else:
                raise protocol.ProtocolError(f"unexpected message {kind!r} from a volume")

    def disconnect_volumes(self, vpg: VpgRuntime) -> None:
        """Close every protected mount's connection to the VPG (they retry, and are refused
        while protection is stopped)."""
        for vol in vpg.volumes.values():
            if vol.conn is not None:
                vol.conn.scope.cancel()

    # ---- VPG lifecycle (called by zfsrep.control) --------------------------------------
    async def create_vpg(self, settings: VpgSettings) -> VpgRuntime:
        if settings.name in self.vpgs:
            raise StateError(f"VPG {settings.name} already exists")
        await trio.to_thread.run_sync(self.store.create_vpg, settings)
        log.info("VPG %s created", settings.name)
        return await self._load_vpg(settings.name)

    async def delete_vpg(self, name: str, *, force: bool) -> None:
        vpg = self.vpg(name)
        if vpg.operation is not None and vpg.operation.get("phase") != "committed":
            raise StateError(f"VPG {name} is {describe(vpg.operation)}: finish it first")
        connected = sorted(v.name for v in vpg.volumes.values() if v.conn is not None)
        if connected and not force:
            raise StateError(f"VPG {name} has connected volumes ({', '.join(connected)}): stop "
                             "their protected mounts first, or use --force")
        vpg.deleting = True
        vpg.scope.cancel()
        async with vpg.lock:
            for vol in list(vpg.volumes.values()):
                await self._close_volume(vol)
            del self.vpgs[name]
            vpg.log.close()
            await trio.to_thread.run_sync(self.store.delete_vpg, name)
        log.info("VPG %s deleted", name)


async def serve(store_dir: Path, listen: tuple[str, int], ready: Callable[[], None], *,
                background: bool = True) -> None:
    """The wiring of ``zfsrep serve``: the store, the server, signals for an orderly stop.
    ``background``: --cpu-priority background (zfsrep.pacer)."""
    import signal

    from zfsrep.syscalls import keep_large_buffers

    keep_large_buffers()
    store = Store(store_dir)
    server = JournalServer(store)
    if background:  # (before any other thread starts)
        token = trio.lowlevel.current_trio_token()
        server.pacer = Pacer(server.vpgs, lambda _bg: token.run_sync_soon(server.announce_pace))
        server.pacer.start()
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.run, listen)
            ready()
            nursery.start_soon(resume_promotions, server, listeners[0].socket.getsockname())
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        if server.pacer is not None:
            server.pacer.stop()


async def resume_promotions(server: JournalServer, bound: tuple) -> None:
    """After a restart of the recovery host, serve the live volumes of every failover-live
    or move that is before commit again, as ``zfsrep resume`` does (zfsrep.recovery): the
    applications moved there should not wait for an administrator. What cannot be started
    is logged; ``zfsrep resume`` tries again."""
    import argparse

    from zfsrep import recovery

    host, port = bound[0], bound[1]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for name, vpg in list(server.vpgs.items()):
        op = vpg.operation
        if not op or op.get("op") not in ("failover-live", "move") \
                or op.get("phase") != "before-commit":
            continue
        args = argparse.Namespace(vpg=name, server=address, promote_rate=None, json=True)
        try:
            done = await trio.to_thread.run_sync(recovery.resume, args)
        except Exception as e:  # (logged; the server goes on serving)
            log.error("VPG %s: the %s before commit could not be served again: %s; "
                      "`zfsrep resume %s` tries again", name, op.get("op"), e, name)
            continue
        if done.get("resumed"):
            log.warning("VPG %s: %s before commit: served again at the live path, its "
                        "promotion going on: %s", name, op.get("op"), ", ".join(done["resumed"]))
