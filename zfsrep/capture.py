"""The capture stream of one volume: numbers records, batches them into frames off the request
path, and hands the frames to a sink, with bounded memory.

The request path (``emit``/``emit_write``, called on the event loop right after each backing
system call) only appends a record to the current batch. A batch is handed on when it holds
``frame_bytes`` of data or ``flush_interval`` has passed; an encoder worker thread adds the
per-block digests, packs and compresses the batch into a frame; a sink worker thread writes the
frame. Memory held for captured data (batched, encoding or being written) is bounded by
``memory_limit``: when the sink is slower than the application, :meth:`wait_for_room` makes the
writer wait until the sink catches up, so the application runs at the sink's speed and nothing
captured is dropped (see README, "When capture falls behind").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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

#: Bytes a record without data counts for, against the memory limit.
RECORD_OVERHEAD = 128


class ExternalWrites(Protocol):
    """Writes completed outside Python (the mount's C fast path), queued in completion order.

    The capture stream takes them before it records anything else, so the stream stays in
    the order the operations completed."""

    def pending(self) -> bool: ...

    def take(self) -> list[tuple[int, tuple]]: ...  # (op, args): WRITE or SETATTR records

    def set_held(self, nbytes: int) -> None: ...


class FrameSink(Protocol):
    """Where frames go. Methods are blocking and are called from one worker thread."""

    def write_frame(self, frame: FrameData, first_seq: int, last_seq: int) -> None: ...

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
                 level: int = 1, external: ExternalWrites | None = None) -> None:
        self._sink = sink
        self._external = external
        self._seq = next_seq - 1
        self._frame_bytes = frame_bytes
        self._memory_limit = memory_limit
        self._flush_interval = flush_interval
        self._level = level
        self._batch: list[list] = []
        self._batch_bytes = 0
        self._held = 0  # bytes of batched + in-flight records
        self._room = trio.Event()
        self._room.set()
        self._send_batch: trio.MemorySendChannel | None = None
        self._closed = False
        self._tick_scope = trio.CancelScope()
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
        self._batch.append([self._seq, time.time_ns(), op, *args])
        self._batch_bytes += RECORD_OVERHEAD
        self._held += RECORD_OVERHEAD

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        if self._external is not None and self._external.pending():
            self.take_external()
        self._append_write(ident, offset, data, mtime_ns)

    def take_external(self) -> None:
        """Record the writes the fast path completed (before anything recorded after them)."""
        if self._external is None:
            return
        for op, args in self._external.take():
            if op == Op.WRITE:
                self._append_write(*args)
            else:
                self._append(op, args)
        self._external.set_held(self._held if self.failed is None else 0)

    def _append_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        if self.failed is not None:
            return
        self._seq += 1
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
        if not self._batch or self._send_batch is None:
            return
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        self._send_batch.send_nowait((batch, size))

    # ---- background workers ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the encoder and sink workers until :meth:`aclose` and the queue is drained."""
        send_batch, receive_batch = trio.open_memory_channel[tuple[list[list], int]](
            float("inf"))
        # Frames being encoded, in stream order: each entry is the receiving end of a
        # one-frame channel, so up to ENCODERS frames encode in parallel threads while the
        # sink still writes them in order.
        send_order, receive_order = trio.open_memory_channel[trio.MemoryReceiveChannel](
            ENCODERS - 1)
        self._send_batch = send_batch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._encode_loop, receive_batch, send_order)
            nursery.start_soon(self._sink_loop, receive_order)
            nursery.start_soon(self._tick_loop)
            task_status.started()
        await trio.to_thread.run_sync(self._sink.close)

    async def aclose(self) -> None:
        """Hand on everything captured and stop; :meth:`run` returns once all of it is sunk."""
        if self._closed or self._send_batch is None:
            return
        self._closed = True
        self._tick_scope.cancel()
        self.take_external()
        self._hand_off()
        await self._send_batch.aclose()

    async def _tick_loop(self) -> None:
        with self._tick_scope:
            while not self._closed:
                await trio.sleep(self._flush_interval)
                self.take_external()
                self._hand_off()

    async def _encode_loop(self, receive: trio.MemoryReceiveChannel,
                           send_order: trio.MemorySendChannel) -> None:
        limiter = trio.CapacityLimiter(ENCODERS)
        async with send_order, trio.open_nursery() as nursery:
            async for batch, size in receive:
                send_one, receive_one = trio.open_memory_channel[tuple](1)
                await send_order.send(receive_one)  # waits while ENCODERS are busy
                nursery.start_soon(self._encode_one, batch, size, send_one, limiter)

    async def _encode_one(self, batch: list[list], size: int, send_one: trio.MemorySendChannel,
                          limiter: trio.CapacityLimiter) -> None:
        async with send_one:
            frame = await trio.to_thread.run_sync(encode_batch, batch, self._level,
                                                  limiter=limiter)
            await send_one.send((frame, batch[0][0], batch[-1][0], size))

    async def _sink_loop(self, receive_order: trio.MemoryReceiveChannel) -> None:
        async for receive_one in receive_order:
            async with receive_one:
                frame, first, last, size = await receive_one.receive()
            if self.failed is None:
                try:
                    await trio.to_thread.run_sync(self._sink.write_frame, frame, first, last)
                except OSError as e:
                    await self._fail(first - 1, f"cannot write the spool: {e.strerror or e}")
            self._held -= size
            if self._external is not None:
                self._external.set_held(self._held if self.failed is None else 0)
            if self._held <= self._memory_limit or self.failed is not None:
                self._room.set()
            if self.failed is not None:
                continue
            st = self.stats
            st.frames += 1
            st.records += last - first + 1
            st.frame_bytes += sum(len(memoryview(p)) for p in frame)
            st.last_seq_sunk = last

    async def _fail(self, last_good_seq: int, reason: str) -> None:
        """Stop capturing but never the application: later records are dropped, the spool is
        marked incomplete so nothing replays it as if it were whole (DESIGN invariant 5)."""
        self.failed = reason
        self._batch, self._batch_bytes = [], 0
        log.error("capture stopped after record %d: %s; the mount keeps serving, and the "
                  "spool is marked incomplete (protect again with a new spool)",
                  last_good_seq, reason)
        try:
            await trio.to_thread.run_sync(self._sink.mark_incomplete, last_good_seq, reason)
        except OSError as e:
            log.error("could not mark the spool incomplete: %s", e.strerror or e)


def encode_batch(batch: list[list], level: int) -> list[bytes | memoryview]:
    """Fill in the block digests of WRITE records and encode the batch as one frame (a list
    of buffers, header first: large write data is referred to, not copied, when the frame
    is stored), with the calling thread's compressor."""
    large = []
    for i, rec in enumerate(batch):
        if rec[2] == Op.WRITE:
            if rec[6] is None:
                rec[6] = blockhash.hash_blocks(rec[5], BLOCK_SIZE)
            if len(rec[5]) >= frames.IOV_MIN:
                large.append(i)
    return frames.encode_frame_iov(batch, level=level, large=large)


class NullRecorder:
    """A recorder that records nothing (``zfsrep protect --no-capture``, benchmarks)."""

    over_limit = False
    last_seq = 0

    def emit(self, op: int, *args: object) -> None:
        pass

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        pass

    async def wait_for_room(self) -> None:
        pass
