"""CaptureStream: numbering, digests, framing, draining, and the memory limit (no mount)."""

from __future__ import annotations

import os
import threading
import time

import trio
import trio.testing

from zfsrep import blockhash, frames
from zfsrep.capture import RECORD_OVERHEAD, CaptureStream
from zfsrep.records import BLOCK_SIZE, Op


class ListSink:
    """A FrameSink that keeps frames in memory; optionally slow or gated."""

    def __init__(self, *, delay: float = 0.0, gated: bool = False) -> None:
        self.frames: list[tuple[bytes, int, int]] = []
        self.delay = delay
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.closed = False
        self.syncs = 0

    def write_frame(self, frame, first_seq: int, last_seq: int) -> None:
        assert not self.closed, "frame written after close"
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        # a frame is bytes or buffers to write back to back (header, payload)
        data = bytes(frame) if isinstance(frame, bytes) else b"".join(bytes(p) for p in frame)
        self.frames.append((data, first_seq, last_seq))

    def sync(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed = True

    def records(self) -> list[list]:
        out: list[list] = []
        for frame, first, last in self.frames:
            header, recs = frames.decode_frame(frame)
            assert (header.first_seq, header.last_seq) == (first, last)
            out += recs
        return out


async def _run_and_close(stream: CaptureStream, work) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        await work()
        await stream.aclose()


async def test_records_get_consecutive_seqs_starting_at_next_seq():
    sink = ListSink()
    stream = CaptureStream(sink, next_seq=41, flush_interval=0.01)

    async def work():
        stream.emit(Op.SETXATTR, 7, b"user.a", b"1")
        stream.emit_write(7, 0, b"hello", 1000)
        stream.emit(Op.TRUNCATE, 7, 2, 2000)
        assert stream.last_seq == 43

    await _run_and_close(stream, work)
    recs = sink.records()
    assert [r[0] for r in recs] == [41, 42, 43]
    assert [r[2] for r in recs] == [Op.SETXATTR, Op.WRITE, Op.TRUNCATE]
    assert recs[0][3:] == [7, b"user.a", b"1"]
    assert recs[2][3:] == [7, 2, 2000]


async def test_record_times_are_wall_clock_ns_in_emit_order():
    sink = ListSink()
    stream = CaptureStream(sink, flush_interval=0.01)
    before = time.time_ns()

    async def work():
        for i in range(5):
            stream.emit(Op.TRUNCATE, 3, i, 0)

    await _run_and_close(stream, work)
    times = [r[1] for r in sink.records()]
    assert times == sorted(times)
    assert before <= times[0] <= times[-1] <= time.time_ns()


async def test_encoder_fills_in_per_block_digests_of_writes():
    sink = ListSink()
    stream = CaptureStream(sink, flush_interval=0.01)
    payloads = [b"", b"a", bytes(range(256)) * 16, b"x" * BLOCK_SIZE + b"tail",
                b"\xff" * (3 * BLOCK_SIZE)]

    async def work():
        for i, data in enumerate(payloads):
            stream.emit_write(9, i * 100, data, 555)

    await _run_and_close(stream, work)
    recs = sink.records()
    assert len(recs) == len(payloads)
    for rec, data in zip(recs, payloads, strict=True):
        seq, _t, op, ident, offset, got_data, digests, mtime = rec
        assert (op, ident, got_data, mtime) == (Op.WRITE, 9, data, 555)
        assert digests == blockhash.hash_blocks(data, BLOCK_SIZE)
        assert len(digests) == 16 * -(-len(data) // BLOCK_SIZE)


async def test_frames_reach_the_sink_in_order_and_aclose_drains_and_closes():
    sink = ListSink(delay=0.002)
    # small frames so the 200 writes span many frames; long tick so aclose does the last one
    stream = CaptureStream(sink, frame_bytes=1000, flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        for i in range(200):
            stream.emit_write(1, i * 10, b"%010d" % i, i)
            if i % 17 == 0:
                stream.emit(Op.SETATTR, 1, 0o100644, 0, 0, i)
                await trio.sleep(0)
        total = stream.last_seq
        await stream.aclose()
        await stream.aclose()  # a second aclose is harmless
    assert sink.closed
    assert len(sink.frames) > 1
    firsts = [f for _, f, _ in sink.frames]
    lasts = [last for _, _, last in sink.frames]
    assert firsts[0] == 1 and lasts[-1] == total
    assert all(f == prev + 1 for f, prev in zip(firsts[1:], lasts, strict=False))
    recs = sink.records()
    assert [r[0] for r in recs] == list(range(1, total + 1))
    datas = [r[5] for r in recs if r[2] == Op.WRITE]
    assert datas == [b"%010d" % i for i in range(200)]
    assert stream.stats.last_seq_sunk == total


async def test_aclose_before_anything_was_emitted_closes_the_sink():
    sink = ListSink()
    stream = CaptureStream(sink, flush_interval=0.01)

    async def work():
        pass

    await _run_and_close(stream, work)
    assert sink.closed and sink.frames == []
    assert stream.stats.records == 0


async def test_flush_interval_hands_off_a_partial_batch():
    sink = ListSink()
    stream = CaptureStream(sink, frame_bytes=1 << 30, flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        stream.emit_write(4, 0, b"small", 1)
        stream.emit(Op.TRUNCATE, 4, 5, 1)
        with trio.fail_after(5):
            while stream.stats.last_seq_sunk < 2:
                await trio.sleep(0.005)
        assert not sink.closed  # sunk by the tick, not by aclose
        assert [(f, last) for _, f, last in sink.frames] == [(1, 2)]
        await stream.aclose()
    assert sink.closed


async def test_reaching_frame_bytes_hands_off_the_batch_at_once():
    sink = ListSink()
    stream = CaptureStream(sink, frame_bytes=4096, flush_interval=0.02)

    async def work():
        stream.emit(Op.TRUNCATE, 4, 0, 1)
        stream.emit_write(4, 0, b"z" * 4000, 1)  # 4000 + overhead reaches frame_bytes
        stream.emit(Op.TRUNCATE, 4, 10, 1)  # so this one starts the next frame

    await _run_and_close(stream, work)
    assert [(f, last) for _, f, last in sink.frames] == [(1, 2), (3, 3)]


async def test_run_returns_promptly_after_aclose_with_a_long_flush_interval():
    sink = ListSink()
    stream = CaptureStream(sink, flush_interval=5)
    with trio.fail_after(0.5):
        async with trio.open_nursery() as nursery:
            await nursery.start(stream.run)
            await trio.sleep(0.05)  # the tick loop is now in its sleep
            stream.emit(Op.TRUNCATE, 4, 0, 1)
            await stream.aclose()
    assert sink.closed and len(sink.frames) == 1


async def test_stats_count_records_frames_and_bytes():
    sink = ListSink()
    stream = CaptureStream(sink, next_seq=10, frame_bytes=3000, flush_interval=0.02)

    async def work():
        for i in range(6):
            stream.emit_write(2, i * 1000, b"d" * 1000, i)
        stream.emit(Op.REMOVEXATTR, 2, b"user.x")

    await _run_and_close(stream, work)
    st = stream.stats
    assert st.records == 7
    assert st.frames == len(sink.frames) >= 2
    assert st.frame_bytes == sum(len(f) for f, _, _ in sink.frames)
    assert st.last_seq_sunk == 16
    assert st.waits == 0


async def test_stats_count_write_payload_bytes():
    sink = ListSink()
    stream = CaptureStream(sink, flush_interval=0.01)

    async def work():
        stream.emit_write(2, 0, b"d" * 1000, 1)
        stream.emit_write(2, 1000, b"e" * 24, 1)

    await _run_and_close(stream, work)
    assert stream.stats.data_bytes == 1024


def _fill_over_limit(stream: CaptureStream, chunk: int = 8192, count: int = 6) -> None:
    for i in range(count):
        stream.emit_write(1, i * chunk, b"w" * chunk, i)


async def test_over_limit_when_the_sink_falls_behind_and_wait_blocks_until_it_catches_up():
    sink = ListSink(gated=True)
    stream = CaptureStream(sink, frame_bytes=8192, memory_limit=20000, flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        assert not stream.over_limit
        _fill_over_limit(stream)
        assert stream.over_limit
        released = trio.Event()

        async def waiter():
            await stream.wait_for_room()
            released.set()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not released.is_set()
        assert sink.frames == []
        sink.gate.set()
        with trio.fail_after(5):
            await released.wait()
        assert not stream.over_limit
        assert len(sink.frames) >= 1
        assert stream.stats.waits == 1
        await stream.aclose()
    assert [r[0] for r in sink.records()] == list(range(1, 7))


async def test_wait_for_room_returns_at_once_under_the_limit():
    sink = ListSink()
    stream = CaptureStream(sink, memory_limit=1 << 20, flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        stream.emit_write(1, 0, b"x" * 100, 1)
        with trio.fail_after(1):
            await stream.wait_for_room()
        await stream.aclose()


async def test_several_blocked_waiters_are_all_released():
    # Regression: a version that gave each waiter its own trio.Event left all but one
    # waiter blocked forever once the sink caught up.
    sink = ListSink(gated=True)
    stream = CaptureStream(sink, frame_bytes=8192, memory_limit=20000, flush_interval=0.02)
    done: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(stream.run)
            _fill_over_limit(stream)

            async def waiter(i: int) -> None:
                await stream.wait_for_room()
                done.append(i)

            for i in range(5):
                nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            sink.gate.set()
            while len(done) < 5:
                await trio.sleep(0.005)
            await stream.aclose()
    assert sorted(done) == list(range(5))
    assert stream.stats.waits == 5


async def test_concurrent_writers_on_a_slow_sink_all_finish_and_nothing_is_dropped():
    sink = ListSink(delay=0.003)
    chunk, per_task, tasks = 4096, 12, 5
    stream = CaptureStream(sink, frame_bytes=2 * chunk, memory_limit=4 * chunk,
                           flush_interval=0.01)
    seen_over = 0

    async def writer(task: int) -> None:
        nonlocal seen_over
        for i in range(per_task):
            stream.emit_write(task, i * chunk, bytes([task]) * chunk, i)
            if stream.over_limit:
                seen_over += 1
                await stream.wait_for_room()
                assert not stream.over_limit or stream.stats.waits > 0

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(stream.run)
            async with trio.open_nursery() as writers:
                for t in range(tasks):
                    writers.start_soon(writer, t)
            await stream.aclose()
    assert seen_over > 0
    assert stream.stats.waits == seen_over
    recs = sink.records()
    assert [r[0] for r in recs] == list(range(1, tasks * per_task + 1))
    by_task: dict[int, list[int]] = {}
    for r in recs:
        by_task.setdefault(r[3], []).append(r[4])
    assert by_task == {t: [i * chunk for i in range(per_task)] for t in range(tasks)}
    assert stream.stats.records == tasks * per_task
    # everything sunk: nothing held any more
    assert not stream.over_limit


async def test_memory_accounting_counts_record_overhead():
    sink = ListSink(gated=True)
    stream = CaptureStream(sink, memory_limit=3 * RECORD_OVERHEAD, flush_interval=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        for _ in range(3):
            stream.emit(Op.TRUNCATE, 1, 0, 0)
        assert not stream.over_limit
        stream.emit(Op.TRUNCATE, 1, 0, 0)
        assert stream.over_limit
        sink.gate.set()
        with trio.fail_after(5):
            await stream.wait_for_room()
        assert not stream.over_limit
        await stream.aclose()


class _FakeFastPath:
    """An ExternalWrites source like mountd.fusehook.SessionHook's queue."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, tuple]] = []
        self.held: list[int] = []
        self.chunks = 0
        self.expanded = 0

    def pending(self) -> bool:
        return bool(self.queue)

    def take_chunk(self, max_bytes: int) -> _FakeChunk | None:
        if not self.queue:
            return None
        n, data = 0, 0
        while n < len(self.queue) and (n == 0 or data < max_bytes):
            op, args = self.queue[n]
            data += len(args[2]) if op == Op.WRITE else 0
            n += 1
        taken, self.queue = self.queue[:n], self.queue[n:]
        self.chunks += 1
        return _FakeChunk(taken, data, self)

    def add_held(self, delta: int) -> None:  # called from the encoder threads too
        self.held.append(delta)


class _FakeChunk:
    def __init__(self, records: list[tuple[int, tuple]], data_bytes: int,
                 source: _FakeFastPath) -> None:
        self._records: list[tuple[int, tuple]] | None = records
        self.count = len(records)
        self.data_bytes = data_bytes
        self._source = source

    def records(self) -> list[tuple[int, tuple]]:
        assert self._records is not None, "a chunk's records are taken once"
        out, self._records = self._records, None
        self._source.expanded += 1  # (the real chunk's buffers are freed from here on)
        return out


async def test_external_records_are_numbered_before_later_records() -> None:
    from zfsrep.records import Op

    sink = ListSink()
    fast = _FakeFastPath()
    stream = CaptureStream(sink, external=fast, flush_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        fast.queue.append((Op.WRITE, (7, 0, memoryview(b"abc"), 11)))
        fast.queue.append((Op.SETATTR, (7, 0o100644, 0, 0, 12)))
        stream.emit(Op.TRUNCATE, 7, 1, 13)  # completed after the queued ones
        await stream.aclose()
    records = sink.records()
    assert [r[2] for r in records] == [Op.WRITE, Op.SETATTR, Op.TRUNCATE]
    assert [r[0] for r in records] == [1, 2, 3]
    assert bytes(records[0][5]) == b"abc"
    # the fast path is told how much memory capture holds, and that it is all released
    assert fast.held and fast.held[0] > 0 and sum(fast.held) == 0


class _FailingSink(ListSink):
    def __init__(self) -> None:
        super().__init__()
        self.marked: tuple[int, str] | None = None

    def write_frame(self, frame, first_seq: int, last_seq: int) -> None:
        if first_seq > 1:
            raise OSError(28, "No space left on device")
        super().write_frame(frame, first_seq, last_seq)

    def mark_incomplete(self, last_seq: int, reason: str) -> None:
        self.marked = (last_seq, reason)


async def test_a_failing_sink_stops_capture_without_blocking_writers(caplog) -> None:
    from zfsrep.records import Op

    sink = _FailingSink()
    stream = CaptureStream(sink, frame_bytes=1, memory_limit=1 << 10, flush_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        stream.emit_write(1, 0, b"x" * 10, 0)  # frame 1 is written
        with trio.fail_after(10):
            while stream.stats.frames < 1:
                await trio.sleep(0.01)
            for i in range(50):  # frame 2 fails; writers must not wait afterwards
                stream.emit_write(1, i, b"y" * 4096, 0)
                if stream.over_limit:
                    await stream.wait_for_room()
            while stream.failed is None:
                await trio.sleep(0.01)
        stream.emit(Op.TRUNCATE, 1, 0, 0)  # dropped, no error
        await stream.aclose()
    assert sink.marked is not None and sink.marked[0] == 1
    assert "No space left" in sink.marked[1]
    assert not stream.over_limit
    assert any("capture stopped after record 1" in r.message for r in caplog.records)


class _PendingSink(ListSink):
    """A sink that takes stored frames as frames.PendingFrame and writes them to a file the
    way the spool does (digests computed on the way), or fails from a given frame on."""

    accepts_pending = True

    def __init__(self, path, *, fail_from: int | None = None) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.at = 0
        self.pending = 0
        self.fail_from = fail_from
        self.marked: tuple[int, str] | None = None

    def write_frame(self, frame, first_seq: int, last_seq: int) -> None:
        if self.fail_from is not None and first_seq >= self.fail_from:
            raise OSError(28, "No space left on device")
        if isinstance(frame, frames.PendingFrame):
            self.pending += 1
            parts = frame.write_at(self.fd, self.at)
        else:
            parts = list(frame)
            os.pwritev(self.fd, parts, self.at)
        data = b"".join(bytes(memoryview(p)) for p in parts)
        assert os.pread(self.fd, len(data), self.at) == data
        self.at += len(data)
        self.frames.append((data, first_seq, last_seq))

    def mark_incomplete(self, last_seq: int, reason: str) -> None:
        self.marked = (last_seq, reason)

    def close(self) -> None:
        os.close(self.fd)
        super().close()


async def test_stored_frames_get_their_digests_as_they_are_written_in_order(tmp_path):
    sink = _PendingSink(tmp_path / "spool")
    stream = CaptureStream(sink, frame_bytes=1 << 20, flush_interval=60)
    datas = [os.urandom(n) for n in (300_000, 1 << 20, 70_000, 5, (1 << 20) + 1)] * 6

    async def work():
        for i, data in enumerate(datas):
            stream.emit_write(3, i << 21, data, i)
            if i % 7 == 0:
                stream.emit(Op.TRUNCATE, 3, i, i)

    await _run_and_close(stream, work)
    assert sink.pending > 1  # frames went through the one-pass write, several encoders
    recs = sink.records()
    assert [r[0] for r in recs] == list(range(1, stream.last_seq + 1))
    writes = [r for r in recs if r[2] == Op.WRITE]
    assert [r[5] for r in writes] == datas
    for rec in writes:
        assert rec[6] == blockhash.hash_blocks(rec[5], BLOCK_SIZE)
    assert (tmp_path / "spool").read_bytes() == b"".join(f for f, _, _ in sink.frames)


async def test_after_a_pending_frame_fails_later_frames_are_not_written(tmp_path):
    sink = _PendingSink(tmp_path / "spool", fail_from=3)
    stream = CaptureStream(sink, frame_bytes=1, flush_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        for i in range(8):
            stream.emit_write(1, i << 20, os.urandom(1 << 20), 0)
        with trio.fail_after(10):
            while stream.failed is None:
                await trio.sleep(0.01)
        await stream.aclose()
    assert [f for _, f, _ in sink.frames] == [1, 2]
    assert sink.marked is not None and sink.marked[0] == 2
    assert "No space left" in (stream.failed or "")
    assert stream.stats.last_seq_sunk == 2


async def test_fast_path_records_come_in_chunks_numbered_in_order_with_the_rest() -> None:
    """Chunks of fast-path records get their numbers on the event loop and become records
    on an encoder thread: the stream is the one record-by-record taking gave, interleaved
    with records of the Python path, in frames of about frame_bytes."""
    from zfsrep.records import Op

    sink = ListSink()
    fast = _FakeFastPath()
    stream = CaptureStream(sink, external=fast, frame_bytes=64 << 10, flush_interval=60)
    expected: list[tuple] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        for i in range(300):
            data = memoryview(os.urandom(4096 * (1 + i % 5)))
            fast.queue.append((Op.WRITE, (7, i * 20_000, data, 1000 + i)))
            expected.append((Op.WRITE, 7, i * 20_000, bytes(data), 1000 + i))
            if i % 7 == 0:
                fast.queue.append((Op.SETATTR, (7, 0o100600, 0, 0, 2000 + i)))
                expected.append((Op.SETATTR, 7, 0o100600, 0, 0, 2000 + i))
            if i % 50 == 49:  # the Python path records after what the fast path queued
                stream.emit(Op.TRUNCATE, 7, i, 3000 + i)
                expected.append((Op.TRUNCATE, 7, i, 3000 + i))
                await trio.sleep(0)
        stream.take_external()
        await stream.aclose()
    records = sink.records()
    assert [r[0] for r in records] == list(range(1, len(expected) + 1))
    got = [(r[2], *r[3:6], bytes(r[5]), r[7]) if r[2] == Op.WRITE else tuple(r[2:])
           for r in records]
    got = [(g[0], g[1], g[2], g[4], g[5]) if g[0] == Op.WRITE else g for g in got]
    assert got == expected
    for r in records:
        if r[2] == Op.WRITE:
            assert r[6] == blockhash.hash_blocks(r[5], BLOCK_SIZE)
    assert fast.chunks > 5  # several chunks, each at most about a frame
    assert fast.expanded == fast.chunks
    assert all(len(f) < 200 << 10 for f, _, _ in sink.frames)
    assert sum(fast.held) == 0


async def test_chunks_taken_after_capture_stopped_are_dropped_and_freed() -> None:
    from zfsrep.records import Op

    sink = _FailingSink()
    fast = _FakeFastPath()
    stream = CaptureStream(sink, external=fast, frame_bytes=1, flush_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(stream.run)
        stream.emit_write(1, 0, b"x" * 10, 0)  # frame 1 is written, frame 2 fails
        stream.emit_write(1, 0, b"y" * 10, 0)
        with trio.fail_after(10):
            while stream.failed is None:
                await trio.sleep(0.01)
        fast.queue.append((Op.WRITE, (1, 0, memoryview(b"z" * 10), 0)))
        stream.take_external()
        assert not fast.queue and fast.expanded == fast.chunks == 1  # taken and dropped
        await stream.aclose()
    assert stream.last_seq == 2
