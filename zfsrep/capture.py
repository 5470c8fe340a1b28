"""The capture stream of one volume: numbers records, batches them into frames off the request
path, and hands the frames to a sink, with bounded memory.

The request path (``emit``/``emit_write``, called on the event loop right after each backing
system call) only appends a record to the current batch. A batch is handed on when it holds
``frame_bytes`` of data, when ``flush_interval`` has passed or when nothing was recorded for
``QUIET_S``; an encoder thread adds the per-block digests, packs and compresses the batch into
a frame, writes it to the sink when the frame before it is written and reports it to the event
loop. None of them waits for the loop.
Memory held for captured data (batched, encoding or being written) is bounded by
``memory_limit``: when the sink is slower than the application, :meth:`wait_for_room` makes
the writer wait until the sink catches up, so the application runs at the sink's speed and
nothing captured is dropped (see README, "When capture falls behind").
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import trio

from zfsrep import blockhash, frames
from zfsrep.records import BLOCK_SIZE, Op

log = logging.getLogger(__name__)

#: A frame as bytes, or as buffers to write one after the other (header, payload).
FrameData = bytes | Sequence[bytes | memoryview]

#: Frames encoded in parallel worker threads (hashing and compression release the GIL).
ENCODERS = 2
#: The open batch is handed on after this long without a new record; after IDLE_TICKS
#: such ticks with nothing recorded the stream sleeps until the next record (_tick_loop).
QUIET_S = 0.01
IDLE_TICKS = 10

#: Bytes a record without data counts for, against the memory limit.
RECORD_OVERHEAD = 128


class ExternalChunk(Protocol):
    """Records taken from :class:`ExternalWrites` in one go, not yet turned into records."""

    count: int  # how many records
    data_bytes: int  # write data they hold

    def records(self) -> list[tuple[int, tuple]]: ...  # (op, args), oldest first; once


class ExternalWrites(Protocol):
    """Writes completed outside Python (the mount's C fast path), queued in completion order.

    The capture stream takes them before it records anything else, so the stream stays in
    the order the operations completed. It takes them as chunks: numbering a chunk is all
    the event loop does; an encoder thread turns it into records (``records()``)."""

    def pending(self) -> bool: ...

    # WRITE, SETATTR or FALLOCATE records, about max_bytes of write data (at least one)
    def take_chunk(self, max_bytes: int) -> ExternalChunk | None: ...

    def add_held(self, delta: int) -> None: ...  # captured bytes held outside the queue

    # Optional: (True) signal the stream's drain at the first record queued, not at a
    # frame's worth; (False) back to a frame's worth.
    # def wake_on_record(self, on: bool) -> None: ...


class FrameSink(Protocol):
    """Where frames go. Methods are blocking and are called from the encoder threads, one
    call at a time, frames in order."""

    def write_frame(self, frame: FrameData | frames.PendingFrame, first_seq: int,
                    last_seq: int) -> None: ...
    # A sink with a true ``accepts_pending`` attribute is given stored frames as
    # frames.PendingFrame (their digests are computed as they are written); others get
    # FrameData only.

    def mark_incomplete(self, last_seq: int, reason: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class CaptureStats:
    records: int = 0
    frames: int = 0
    data_bytes: int = 0  # write payload bytes captured
    frame_bytes: int = 0  # bytes handed to the sink
    waits: int = 0  # times a writer waited for memory
    last_seq_sunk: int = 0


class CaptureStream:
    """Ordered, numbered records of one volume, framed and sunk in the background."""

    def __init__(self, sink: FrameSink, *, next_seq: int = 1, frame_bytes: int = 4 << 20,
                 memory_limit: int = 64 << 20, flush_interval: float = 0.25,
                 level: int = 1, external: ExternalWrites | None = None,
                 on_numbered: Callable[[int, int], None] | None = None,
                 on_changed: Callable[[int, object, int], None] | None = None,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        self._sink = sink
        #: told (last seq, how many of the records are the fast path's) whenever sequence
        #: numbers are given out, before the requests they record are answered (the spool's
        #: run state: a restart after a crash finds what was lost)
        self._on_numbered = on_numbered
        #: told (op, first argument, seq) of every record made here (not the fast path's),
        #: as it is numbered; and (fast-path records, last seq) in the frames written so far,
        #: as they are written (the run state's table of files with unwritten changes)
        self._on_changed = on_changed
        self._on_written = on_written
        self._fast_numbered = 0
        self._handed: collections.deque[tuple[int, int]] = collections.deque()
        self._external = external
        self._seq = next_seq - 1
        self._frame_bytes = frame_bytes
        self._memory_limit = memory_limit
        self._flush_interval = flush_interval
        self._level = level
        self._batch: list[list] = []
        self._batch_bytes = 0
        self._batch_told = 0  # of which the fast path was told of (ExternalWrites.add_held)
        self._held = 0  # bytes of batched + in-flight records
        self._room = trio.Event()
        self._room.set()
        self._pipeline: _Pipeline | None = None
        self._closed = False
        self._tick_scope = trio.CancelScope()
        self._idle = False  # the tick loop sleeps until the next record (_wake)
        self._wake = trio.Event()
        self.failed: str | None = None  # why capture stopped (the sink failed), if it did
        self.stats = CaptureStats(last_seq_sunk=next_seq - 1)

    # ---- request path (event-loop thread, synchronous) -----------------------------------
    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, op: int, *args: object) -> None:
        if self._external is not None and self._external.pending():
            self.take_external()
        self._append(op, args)

    def _append(self, op: int, args: tuple) -> None:
        if self.failed is not None:
            return
        self._seq += 1
        if self._on_numbered is not None:
            self._on_numbered(self._seq, 0)
        if self._on_changed is not None:
            self._on_changed(op, args[0] if args else None, self._seq)
        if self._idle:
            self._wake.set()
        self._batch.append([self._seq, time.time_ns(), op, *args])
        self._batch_bytes += RECORD_OVERHEAD
        self._held += RECORD_OVERHEAD

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        if self._external is not None and self._external.pending():
            self.take_external()
        self._append_write(ident, offset, data, mtime_ns)

    def take_external(self) -> None:
        """Record the writes the fast path completed (before anything recorded after them):
        each chunk of them gets the next sequence numbers here, and becomes records on an
        encoder thread (:func:`expand`)."""
        if self._external is None:
            return
        while (chunk := self._external.take_chunk(self._frame_bytes)) is not None:
            if self.failed is not None:
                chunk.records()  # nothing is recorded any more; their buffers go
                continue
            first = self._seq + 1
            self._seq += chunk.count
            self._fast_numbered += chunk.count
            if self._idle:
                self._wake.set()
            if self._on_numbered is not None:
                self._on_numbered(self._seq, chunk.count)
            self._batch.append([first, time.time_ns(), CHUNK, chunk])
            size = chunk.data_bytes + chunk.count * RECORD_OVERHEAD
            self.stats.data_bytes += chunk.data_bytes
            self._batch_bytes += size
            self._held += size
            # (told now, not at the hand-off: the fast path's bound counts the chunk from
            # the moment it leaves the queue)
            self._external.add_held(size)
            self._batch_told += size
            if self._batch_bytes >= self._frame_bytes:
                self._hand_off()

    def _append_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        if self.failed is not None:
            return
        self._seq += 1
        if self._on_numbered is not None:
            self._on_numbered(self._seq, 0)
        if self._on_changed is not None:
            self._on_changed(Op.WRITE, ident, self._seq)
        if self._idle:
            self._wake.set()
        self._batch.append([self._seq, time.time_ns(), Op.WRITE, ident, offset, data, None,
                            mtime_ns])
        size = len(data) + RECORD_OVERHEAD
        self.stats.data_bytes += len(data)
        self._batch_bytes += size
        self._held += size
        if self._batch_bytes >= self._frame_bytes:
            self._hand_off()

    def flush(self) -> None:
        """Hand everything recorded so far on to the encoder now (a checkpoint is waiting
        for it) instead of at the next tick."""
        self.take_external()
        self._hand_off()

    @property
    def over_limit(self) -> bool:
        return self._held > self._memory_limit and self.failed is None

    async def wait_for_room(self) -> None:
        """Wait until captured data held in memory is back under the limit."""
        self.stats.waits += 1
        self.take_external()
        if self._held - self._batch_bytes <= self._memory_limit:
            self._hand_off()  # the open batch itself is what holds the memory
        while self._held > self._memory_limit and self.failed is None:
            if self._room.is_set():  # all waiters share one event until the sink sets it
                self._room = trio.Event()
            await self._room.wait()

    def _hand_off(self) -> None:
        if not self._batch or self._pipeline is None:
            return
        batch, size = self._batch, self._batch_bytes
        if self._external is not None and size > self._batch_told:
            self._external.add_held(size - self._batch_told)
        self._batch, self._batch_bytes, self._batch_told = [], 0, 0
        if self._on_written is not None:
            self._handed.append((self._seq, self._fast_numbered))
        self._pipeline.submit(batch, size)

    # ---- background workers ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the encoder threads until :meth:`aclose` and everything captured is sunk."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def on_loop(fn: Callable[..., object], *args: object) -> None:  # from an encoder thread
            # (if the loop is gone, the daemon is failing for another reason)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn, *args)

        pipeline = _Pipeline(self._sink, self._level,
                             sunk=lambda *a: on_loop(self._sunk, *a),
                             release=self._release,
                             stopped=lambda: on_loop(done.set))
        self._pipeline = pipeline
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick_loop)
            task_status.started()
            await done.wait()
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(pipeline.join)  # (they are finishing: short)
        await trio.to_thread.run_sync(self._sink.close)

    async def aclose(self) -> None:
        """Hand on everything captured and stop; :meth:`run` returns once all of it is sunk."""
        if self._closed or self._pipeline is None:
            return
        self._closed = True
        self._tick_scope.cancel()
        self.take_external()
        self._hand_off()
        self._pipeline.close()

    async def _tick_loop(self) -> None:
        """Hand the open batch on once it is ``flush_interval`` old, or as soon as nothing
        was recorded for QUIET_S: when the application pauses, what it did reaches the
        spool in milliseconds, not a quarter of a second (a daemon that dies then loses
        less, and the link ships it sooner); while it keeps recording, frames stay large.

        Ticking every QUIET_S costs an idle daemon 5% of a core, so after IDLE_TICKS empty
        ticks the loop sleeps until the next record (or ``flush_interval``): a record of
        Python's wakes it (``_wake``), and the fast path signals the first one it queues
        (``ExternalWrites.wake_on_record``), which the drain task takes."""
        tick = min(QUIET_S, self._flush_interval)
        wake_on_record = getattr(self._external, "wake_on_record", None)
        seen, age, empty = self._seq, 0.0, 0
        with self._tick_scope:
            while not self._closed:
                if empty >= IDLE_TICKS:
                    if not self._idle:
                        self._idle = True
                        if wake_on_record is not None:
                            wake_on_record(True)
                    with trio.move_on_after(self._flush_interval):
                        await self._wake.wait()
                    self.take_external()
                    if not self._batch and not self._wake.is_set():
                        continue  # nothing came: still idle
                    self._idle, self._wake = False, trio.Event()
                    if wake_on_record is not None:
                        wake_on_record(False)
                    seen, age, empty = self._seq, 0.0, 0
                    continue  # the first record: ticks again
                await trio.sleep(tick)
                self.take_external()
                if not self._batch:
                    age, seen = 0.0, self._seq
                    empty += 1
                    continue
                empty = 0
                age += tick
                if self._seq == seen or age >= self._flush_interval:
                    self._hand_off()
                    age = 0.0
                seen = self._seq

    def _release(self, size: int) -> None:
        """Encoder thread: a frame of ``size`` bytes is written; the fast path may use the room
        at once (the event loop learns of it in :meth:`_sunk`)."""
        if self._external is not None:
            self._external.add_held(-size)

    def _sunk(self, first: int, last: int, size: int, nbytes: int, error: str | None) -> None:
        """Event loop: an encoder wrote (or failed to write) records first..last."""
        self._held -= size
        if error is not None and self.failed is None:
            self.failed = error
            expand(self._batch)  # (dropped: the buffers of fast-path writes go)
            if self._external is not None and self._batch_told:
                self._external.add_held(-self._batch_told)
            self._batch, self._batch_bytes, self._batch_told = [], 0, 0
            log.error("capture stopped after record %d: %s; the mount keeps serving, and the "
                      "spool is marked incomplete (protect again with a new spool)",
                      first - 1, error)
        if self._held <= self._memory_limit or self.failed is not None:
            self._room.set()
        if error is not None or nbytes < 0:
            return
        if self._handed:
            fast = -1
            while self._handed and self._handed[0][0] <= last:
                fast = self._handed.popleft()[1]
            if fast >= 0 and self._on_written is not None:
                self._on_written(fast, last)
        st = self.stats
        st.frames += 1
        st.records += last - first + 1
        st.frame_bytes += nbytes
        st.last_seq_sunk = last


class _Turn:
    """Whose turn it is to write: set, with the error that stopped the sink or None, once
    a frame is written (or given up)."""

    __slots__ = ("_done", "error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: str | None = None

    def set(self, error: str | None) -> None:
        self.error = error
        self._done.set()

    def wait(self) -> str | None:
        self._done.wait()
        return self.error


class _Pipeline:
    """Encoder threads outside the event loop: a frame never waits for the loop between
    being encoded and being written (the loop is busy serving requests).

    Batches are encoded by ENCODERS threads in parallel; each encoder then writes its frame
    itself, after the frame submitted before it (turns): a stored frame's block digests,
    checksum and spool write are then one pass over its data while it is in the CPU's cache
    (:meth:`frames.PendingFrame.write_at`). Still in its turn, so in submission order, the
    encoder calls ``release(size)`` and ``sunk(first, last, size, frame_bytes, error)``
    (which must hand the call to the event loop); no other thread wakes up per frame. After
    a sink error, later frames are not written (they are reported with ``frame_bytes`` -1)
    and the sink is marked incomplete. ``stopped()`` is called once, after the last frame
    submitted before :meth:`close` was reported."""

    def __init__(self, sink: FrameSink, level: int, *,
                 sunk: Callable[[int, int, int, int, str | None], None],
                 release: Callable[[int], None], stopped: Callable[[], None]) -> None:
        self._sink = sink
        self._pending = bool(getattr(sink, "accepts_pending", False))
        self._level = level
        self._sunk = sunk
        self._release = release
        self._stopped = stopped
        self._encoders = ThreadPoolExecutor(ENCODERS, thread_name_prefix="capture-encode")
        self._turn = _Turn()
        self._turn.set(None)

    def submit(self, batch: list[list], size: int) -> None:
        prev, self._turn = self._turn, _Turn()
        # (the executor starts work in submission order: the frame before is never waiting
        # for a thread this one holds)
        self._encoders.submit(self._encode_and_write, batch, size, prev, self._turn)

    def close(self) -> None:
        """No more batches: ``stopped`` follows the report of the last one."""
        last = self._turn

        def finish() -> None:
            last.wait()
            self._stopped()

        self._encoders.submit(finish)

    def join(self) -> None:
        self._encoders.shutdown(wait=True)

    def _encode_and_write(self, batch: list[list], size: int, prev: _Turn,
                          turn: _Turn) -> None:
        """Encoder thread: encode, wait for the frame before, write, report, pass the
        turn on (with the error that stopped the sink, if any)."""
        first, last = batch[0][0], last_seq(batch[-1])
        nbytes, error, stop, released = -1, None, None, False
        try:
            try:
                frame = encode_batch(expand(batch), self._level, deferred=self._pending)
            except Exception as e:  # a bug: say so, stop capturing, keep serving
                log.exception("capture: frame %d..%d could not be made", first, last)
                frame, error = None, f"internal error: {e}"
            del batch
            stop = prev.wait()
            if stop is not None:  # an earlier frame failed: this one is not written
                error = None
                return
            if frame is not None:
                try:
                    self._sink.write_frame(frame, first, last)
                    nbytes = frame.size if isinstance(frame, frames.PendingFrame) else \
                        sum(memoryview(p).nbytes for p in frame)
                except OSError as e:
                    error = f"cannot write the spool: {e.strerror or e}"
                except Exception as e:
                    log.exception("capture: frame %d..%d could not be written", first, last)
                    error = f"internal error: {e}"
                # the room first, then the buffers (the fast path pools a freed request
                # buffer only within its memory limit)
                self._release(size)
                released = True
                del frame  # its buffers go as soon as written
            if error is not None:
                stop = error
                self._mark_incomplete(first - 1, error)
        finally:
            try:
                if not released:
                    self._release(size)
                self._sunk(first, last, size, nbytes, error)
            finally:
                turn.set(stop)

    def _mark_incomplete(self, last_good_seq: int, reason: str) -> None:
        try:
            self._sink.mark_incomplete(last_good_seq, reason)
        except OSError as e:
            log.error("could not mark the spool incomplete: %s", e.strerror or e)


#: The op of a batch entry ``[first_seq, time_ns, CHUNK, chunk]`` that stands for the
#: records of an :class:`ExternalChunk`, numbered from first_seq on (not a record op).
CHUNK = -1


def last_seq(entry: list) -> int:
    """The sequence number of the last record a batch entry stands for."""
    return entry[0] + entry[3].count - 1 if entry[2] == CHUNK else entry[0]


def expand(batch: list[list]) -> list[list]:
    """The records of ``batch``, its chunks of fast-path records turned into records (as
    :meth:`CaptureStream.emit` and ``emit_write`` make them, with the chunk's time)."""
    if not any(entry[2] == CHUNK for entry in batch):
        return batch
    out: list[list] = []
    for entry in batch:
        if entry[2] != CHUNK:
            out.append(entry)
            continue
        seq, ts, _, chunk = entry
        records = chunk.records()
        if len(records) != chunk.count:
            raise ValueError(f"a chunk of {chunk.count} records gave {len(records)}")
        for op, args in records:
            if op == Op.WRITE:
                ident, offset, data, mtime_ns = args
                out.append([seq, ts, Op.WRITE, ident, offset, data, None, mtime_ns])
            else:
                out.append([seq, ts, op, *args])
            seq += 1
    return out


def encode_batch(batch: list[list], level: int, *, deferred: bool = False
                 ) -> list[bytes | memoryview] | frames.PendingFrame:
    """Fill in the block digests of WRITE records and encode the batch as one frame (a list
    of buffers, header first: large write data is referred to, not copied, when the frame
    is stored), with the calling thread's compressor. ``deferred``: the digests of large
    writes are left to be computed as the frame is written, and a stored frame comes as a
    :class:`frames.PendingFrame`."""
    large = []
    for i, rec in enumerate(batch):
        if rec[2] == Op.WRITE:
            is_large = len(rec[5]) >= frames.IOV_MIN
            if rec[6] is None:
                rec[6] = frames.BlockDigests(rec[5], BLOCK_SIZE) if deferred and is_large \
                    else blockhash.hash_blocks(rec[5], BLOCK_SIZE)
            if is_large:
                large.append(i)
    if deferred:
        return frames.prepare_frame(batch, level=level, large=large)
    return frames.encode_frame_iov(batch, level=level, large=large)
