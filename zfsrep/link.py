"""The protected side of the replication link: ships a volume's spool to the journal server.

Every frame the capture stream produces is first written to the local spool (so application
writes never wait for the network, DESIGN invariant 5); this task reads the spool behind the
writer and sends the frames to the server, which acknowledges them once they are on stable
storage. Acknowledged segments are trimmed from the spool. After a reconnect the server says
which record it holds last and shipping resumes right after it, so nothing is sent twice into
the journal or skipped (docs/protocol.md).

The link also answers the server's checkpoint marks: the position of a checkpoint is the last
record the capture stream has numbered when the mark arrives, taken on the event loop between
two filesystem requests, so it is a prefix-closed cut of the stream. For a VPG of several
volumes the server freezes and thaws them instead (zfsrep.barrier), so that the positions of
all volumes together form one consistent cut.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from zfsrep import protocol
from zfsrep.barrier import CompletionGate
from zfsrep.errors import OSFailure, StateError, ZfsrepError
from zfsrep.scan import ScanProgress
from zfsrep.spool import SpoolReader, SpoolWriter, close_frames

log = logging.getLogger(__name__)

WINDOW_BYTES = 48 << 20  # sent but not yet acknowledged
READ_BYTES = 8 << 20
POLL = 0.02
STAT_INTERVAL = 1.0


class Recorder(Protocol):
    failed: str | None

    @property
    def last_seq(self) -> int: ...

    def flush(self) -> None: ...


@dataclass
class LinkOptions:
    address: tuple[str, int]
    vpg: str
    volume: str
    host: str = field(default_factory=socket.gethostname)


@dataclass
class LinkState:
    connected: bool = False
    acked_seq: int = 0
    sent_frames: int = 0
    sent_bytes: int = 0


class VolumeShipper:
    """Connects (and reconnects) to the journal server and ships the spool."""

    def __init__(self, opts: LinkOptions, spool: SpoolWriter, recorder: Recorder,
                 scan: ScanProgress, synced_seq: int,
                 gate: CompletionGate | None = None) -> None:
        self.opts = opts
        self.spool = spool
        self.recorder = recorder
        self.gate = gate or CompletionGate()
        #: set when the server committed a move of the VPG: the mount stops and its data goes
        self.retired = False
        self.on_retire: Callable[[], None] | None = None
        #: the mount's half of a restore in place (mountd.inplace), if it can do one
        self.in_place: Any = None
        self.scan = scan
        self.synced_seq = synced_seq  # 0 while the initial sync runs
        self.state = LinkState()
        self._inflight: deque[tuple[int, int]] = deque()  # (last_seq, bytes) sent, not acked
        self._inflight_bytes = 0
        self._acked = trio.Event()
        self._synced_changed = trio.Event()
        self._pending: tuple[protocol.MessageStream, dict] | None = None
        self._reader: SpoolReader | None = None

    # ---- called by the mount daemon ----------------------------------------------------
    async def first_contact(self) -> None:
        """Connect once before the mount starts, so a refusal (unknown VPG, a volume that
        belongs to another spool) fails the protect command. An unreachable server is not an
        error: the spool holds the frames until it is back."""
        try:
            self._pending = await protocol.connect(self.opts.address, self._hello())
        except protocol.ServerUnreachable as e:
            log.warning("%s; frames wait in the spool until it is reachable", e)

    def initial_sync_done(self, end_seq: int) -> None:
        self.synced_seq = end_seq
        self._synced_changed.set()

    def mark(self) -> tuple[int | None, str | None]:
        """The stream position for a checkpoint now, or None and why there is none."""
        if self.recorder.failed is not None:
            return None, f"capture stopped: {self.recorder.failed}"
        if not self.synced_seq:
            return None, "initial sync is running"
        if self.in_place is not None and self.in_place.recording:
            return None, "a restore in place is being recorded"
        # the fast path's queued writes completed before now: number them first
        self.recorder.flush()
        return self.recorder.last_seq, None

    def freeze(self) -> tuple[int | None, str | None]:
        """The first half of a cross-volume checkpoint barrier (zfsrep.barrier): hold every
        mutating answer from now on, and return the position as of now."""
        seq, why = self.mark()
        if seq is not None:
            self.gate.freeze()
        return seq, why

    async def drain(self, timeout: float) -> bool:
        """Wait until everything in the spool is acknowledged (at most ``timeout`` s)."""
        with trio.move_on_after(timeout):
            while self.state.acked_seq < self.spool.next_seq - 1:
                if not self.state.connected:
                    await trio.sleep(0.1)
                    continue
                self._acked = trio.Event()
                await self._acked.wait()
            return True
        log.warning("stopping with records %d..%d not yet acknowledged; they stay in the "
                    "spool and are shipped when the volume is protected again",
                    self.state.acked_seq + 1, self.spool.next_seq - 1)
        return False

    # ---- the link ----------------------------------------------------------------------
    def _hello(self) -> dict:
        ident = self.spool.identity
        return {"role": "volume", "vpg": self.opts.vpg, "volume": self.opts.volume,
                "root_ident": ident.root_ident, "source": ident.source,
                "host": self.opts.host, "spool_id": ident.stream_id,
                "first_seq": self.spool.first_seq(), "last_seq": self.spool.next_seq - 1,
                "synced_seq": self.synced_seq}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        delay = 0.2
        reported: str | None = None
        while True:
            try:
                if self._pending is not None:
                    conn, welcome = self._pending
                    self._pending = None
                else:
                    conn, welcome = await protocol.connect(self.opts.address, self._hello())
                delay = 0.2
                reported = None
                await self._session(conn, welcome)
            except Exception as exc:  # the link never takes the mount down with it
                e = _cause(exc)
                if e is None:
                    log.exception("replication link failed")
                    e = exc
                text = str(e) or type(e).__name__
                if text != reported:
                    level = logging.ERROR if isinstance(e, ZfsrepError) and not isinstance(
                        e, protocol.ServerUnreachable) else logging.WARNING
                    log.log(level, "replication link: %s (retrying)", text)
                    reported = text
            finally:
                self.state.connected = False
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _session(self, conn: protocol.MessageStream, welcome: dict) -> None:
        durable = int(welcome.get("durable_seq", 0))
        # the frames go at background CPU priority while the server says so (zfsrep.pacer)
        conn.background = bool(welcome.get("background", False))
        async with conn:
            self.state.connected = True
            log.info("replication link up: %s:%d holds records through %d",
                     *self.opts.address, durable)
            self._inflight.clear()
            self._inflight_bytes = 0
            self._ack(durable)
            if welcome.get("hold"):  # a planned move of the VPG holds this volume's changes
                await self.gate.quiesce()
            else:
                self.gate.resume()
            reader = self._reader = SpoolReader(self.spool.path, direct=self.spool.direct)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive, conn, nursery)
                    nursery.start_soon(self._report, conn)
                    nursery.start_soon(self._send, conn, reader, durable + 1)
            finally:
                self._reader = None
                reader.close()
                self.gate.thaw()  # no thaw will come over this connection (a quiesce for
                # a move stays: the server resumes or re-quiesces when the link is back)

    def _ack(self, seq: int) -> None:
        if seq < self.state.acked_seq:
            return
        self.state.acked_seq = seq
        while self._inflight and self._inflight[0][0] <= seq:
            self._inflight_bytes -= self._inflight.popleft()[1]
        self._acked.set()

    async def _send(self, conn: protocol.MessageStream, reader: SpoolReader, seq: int) -> None:
        last_trim = 0
        while True:
            written = self.spool.next_seq - 1
            if seq > written or self._inflight_bytes >= WINDOW_BYTES:
                if self.state.acked_seq - last_trim > 0 and self.state.acked_seq > last_trim:
                    last_trim = self.state.acked_seq
                    await trio.to_thread.run_sync(self.spool.trim, last_trim)
                if self._inflight_bytes >= WINDOW_BYTES:
                    self._acked = trio.Event()
                    await self._acked.wait()
                else:
                    await trio.sleep(POLL)
                continue
            held = self.spool.recent(seq, written, READ_BYTES)
            if held is None:  # behind what memory holds: from the spool's files
                batch: list = await conn.in_worker(reader.read, seq, written, READ_BYTES)
            else:
                batch = held
            try:
                sizes = await conn.send_frames([frame for _first, _last, frame in batch])
                for (_first, last, _frame), size in zip(batch, sizes, strict=True):
                    self._inflight.append((last, size))
                    self._inflight_bytes += size
                    self.state.sent_frames += 1
                    self.state.sent_bytes += size
                    seq = last + 1
            finally:
                close_frames(batch if held is None else ())

    async def _quiesce(self, conn: protocol.MessageStream, answer_id: object) -> None:
        if self.recorder.failed is None and self.synced_seq:
            await self.gate.quiesce()
        seq, why = self.mark()
        await conn.send({"t": "quiesced", "id": answer_id, "seq": seq, "reason": why})

    async def _receive(self, conn: protocol.MessageStream, nursery: trio.Nursery) -> None:
        while True:
            msg = await conn.receive()
            if msg is None:
                raise protocol.ServerUnreachable("the journal server closed the connection")
            kind = msg["t"]
            if kind == "ack":
                self._ack(int(msg["seq"]))
            elif kind == "pace":  # the links' CPU priority (zfsrep.pacer)
                conn.background = bool(msg.get("background"))
                log.info("the journal server asks for replication at %s CPU priority",
                         "background" if conn.background else "normal")
            elif kind == "mark":
                seq, why = self.mark()
                await conn.send({"t": "marked", "id": msg.get("id"), "seq": seq,
                                 "reason": why})
            elif kind == "freeze":
                seq, why = self.freeze()
                await conn.send({"t": "frozen", "id": msg.get("id"), "seq": seq,
                                 "reason": why})
            elif kind == "thaw":
                held = self.gate.thaw()
                await conn.send({"t": "thawed", "id": msg.get("id"), "held": held})
            elif kind == "quiesce":  # a planned move: hold changes, report the position
                # in its own task: waiting for requests under way must not keep this loop
                # from receiving the thaw of a checkpoint barrier one of them waits for
                nursery.start_soon(self._quiesce, conn, msg.get("id"))
            elif kind == "resume":
                self.gate.resume()
                await conn.send({"t": "resumed", "id": msg.get("id")})
            elif kind == "retire":  # the move is committed: stop, and remove the data
                log.warning("the move of VPG %s is committed: unmounting, then removing %s "
                            "and the spool", self.opts.vpg, self.spool.identity.source)
                self.retired = True
                await conn.send({"t": "retiring", "id": msg.get("id")})
                if self.on_retire is not None:
                    self.on_retire()
            elif kind in ("restore", "restore-commit", "restore-rollback"):
                nursery.start_soon(self._restore, conn, kind, msg)
            elif kind == "error":
                protocol.raise_for_error(msg)
            else:
                raise protocol.ProtocolError(f"unexpected message {kind!r} from the server")

    async def _restore(self, conn: protocol.MessageStream, kind: str, msg: dict) -> None:
        """A step of a restore in place (zfsrep.inplace): answer ``done`` with its result,
        or with the error that refused it."""
        answer: dict[str, Any] = {"t": "done", "id": msg.get("id"), "error": None}
        try:
            if self.in_place is None:
                raise StateError("this mount cannot restore in place (it does not capture)")
            if kind == "restore":
                seq = msg.get("seq")
                if type(seq) is not int or seq <= 0:
                    raise protocol.ProtocolError(f"bad restore position {seq!r}")
                answer.update(await self.in_place.restore(seq, msg.get("checkpoint")))
            elif kind == "restore-commit":
                answer.update(await self.in_place.commit())
            else:
                answer.update(await self.in_place.rollback())
        except Exception as e:  # the answer says why; the link goes on
            if isinstance(e, ZfsrepError):
                text, code = str(e), e.exit_code
            elif isinstance(e, OSError):
                text, code = f"{e.strerror or e} ({e.filename or ''})", OSFailure.exit_code
            else:
                log.exception("%s failed", kind)
                text, code = f"internal error: {type(e).__name__}: {e}", 1
            log.warning("%s refused: %s", kind, text)
            answer.update(error=text, code=code)
        await conn.send(answer)

    async def _report(self, conn: protocol.MessageStream) -> None:
        sent_synced = self.synced_seq
        while True:
            if self.synced_seq != sent_synced:
                sent_synced = self.synced_seq
                await conn.send({"t": "synced", "seq": sent_synced})
            scan = self.scan
            unacked = await trio.to_thread.run_sync(self._unacked_bytes)  # lists the spool
            await conn.send({
                "t": "stat", "time": time.time(), "captured_seq": self.recorder.last_seq,
                "written_seq": self.spool.next_seq - 1, "spool_bytes": self.spool.bytes,
                "spool_limit": self.spool.limit, "unacked_bytes": unacked,
                "capture_failed": self.recorder.failed,
                "scan": {"entries": scan.entries, "bytes": scan.bytes,
                         "total_bytes": scan.total_bytes, "done": scan.done}})
            with trio.move_on_after(STAT_INTERVAL):
                self._synced_changed = trio.Event()
                await self._synced_changed.wait()

    def _unacked_bytes(self) -> int:
        """Bytes of frames the server has not acknowledged: in flight plus not yet read."""
        if self.state.acked_seq >= self.spool.next_seq - 1:
            return 0
        if self._reader is None:
            return self.spool.bytes
        return self._inflight_bytes + self._reader.unread_bytes()


_EXPECTED = (ZfsrepError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _cause(exc: BaseException) -> BaseException | None:
    """The first of the failures in ``exc`` (a session's tasks fail together, as an
    exception group) when all are what a link expects (the server went away, refused,
    answered badly): logged as one line. None for anything else (a bug: logged with its
    traceback)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_cause(e) for e in exc.exceptions]
        return None if not leaves or None in leaves else leaves[0]
    return exc if isinstance(exc, _EXPECTED) else None


def default_spool(vpg: str, volume: str) -> Path:
    return Path("/var/lib/zfsrep/spool") / vpg / volume
