"""SpoolWriter and the spool readers: segments, reopening, torn tails, gaps, identities."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from zfsrep import frames
from zfsrep.errors import CorruptDataError, NotFoundError, StateError
from zfsrep.records import Op
from zfsrep.spool import (
    META,
    RunState,
    SpoolWriter,
    VolumeIdentity,
    dirty_idents,
    iter_records,
    read_identity,
    records_lost,
    segment_paths,
    spool_stats,
)

IDENT = VolumeIdentity(source="/data/src", root_ident=4242, block_size=4096)


def _records(first: int, count: int) -> list[list]:
    return [[seq, 1_000 + seq, Op.TRUNCATE, 7, seq, 2_000 + seq]
            for seq in range(first, first + count)]


def _frame(first: int, count: int) -> bytes:
    return frames.encode_frame(_records(first, count))


def _write(writer: SpoolWriter, first: int, count: int) -> None:
    writer.write_frame(_frame(first, count), first, first + count - 1)


def _seqs(spool: Path) -> list[int]:
    return [r[0] for r in iter_records(spool)]


@pytest.fixture
def spool(tmp_path: Path, request, monkeypatch) -> Path:
    """A spool directory; written through the page cache (these tests cut segments at
    exact sizes) unless the test is marked ``direct``."""
    import zfsrep.spool

    if request.node.get_closest_marker("direct") is None:
        monkeypatch.setattr(zfsrep.spool, "DIRECT", False)
    return tmp_path / "spool"


def _direct_or_skip(w: SpoolWriter) -> None:
    if not w._direct:
        w.close()
        pytest.skip("the file system under tmp_path does not take O_DIRECT")


@pytest.mark.direct
def test_direct_segments_end_in_zero_padding_that_readers_take_as_their_end(spool: Path,
                                                                           caplog):
    from zfsrep.directio import ALIGN as DIRECT_ALIGN
    from zfsrep.spool import SpoolReader, close_frames

    big = _frame(1, 1)
    w = SpoolWriter(spool, IDENT, segment_bytes=3 * DIRECT_ALIGN)
    _write(w, 1, 1)
    _direct_or_skip(w)
    seq = 2
    for count in (1, 7, 300, 2, 900, 1, 1, 40):  # frames of many sizes, over 2+ segments
        _write(w, seq, count)
        seq += count
    data = [[n, 1_000 + n, Op.TRUNCATE, 7, os.urandom(100_003), 2_000]
            for n in range(seq, seq + 5)]
    pending = frames.prepare_frame(data)  # (stored, large values referred to: as capture's)
    assert isinstance(pending, frames.PendingFrame)
    w.write_frame(pending, seq, seq + 4)
    seq += 5
    w.close()
    segs = segment_paths(spool)
    assert len(segs) >= 2 and all(p.stat().st_size % DIRECT_ALIGN == 0 for p in segs)
    assert len(big) % DIRECT_ALIGN  # (so a segment's end is padding)
    assert _seqs(spool) == list(range(1, seq))
    assert list(iter_records(spool))[-5:] == data
    stats = spool_stats(spool)
    assert (stats["first_seq"], stats["last_seq"]) == (1, seq - 1)
    reader = SpoolReader(spool)
    got = reader.read(1, seq - 1, 1 << 30)
    assert [(a, b) for a, b, _ in got][0] == (1, 1) and got[-1][1] == seq - 1
    close_frames(got)
    reader.close()
    reader = SpoolReader(spool)  # (positioned from the start of a later segment)
    later = segs[-1].name
    first_of_last = int(later.split(".")[0])
    got = reader.read(first_of_last, seq - 1, 1 << 30)
    assert got and got[0][0] == first_of_last and got[-1][1] == seq - 1
    close_frames(got)
    reader.close()
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT)  # reopened: padding is no torn tail
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert w.next_seq == seq
    w.close()


@pytest.mark.direct
def test_the_link_reader_follows_a_writer_appending_to_a_direct_segment(spool: Path):
    """The replication link reads a segment while the capture appends to it. A small frame
    ends inside a block whose padding is on disk until the next frame overwrites it: what
    the reader saw of that padding must not be taken for the next frame later."""
    from zfsrep.spool import SpoolReader

    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 1)
    _direct_or_skip(w)
    reader = SpoolReader(spool)
    try:
        seq = 2
        got = reader.read(1, 1, 1 << 20)
        for count in (1, 3, 1, 50, 2, 1, 200, 1):  # each frame read as soon as it is written
            _write(w, seq, count)
            got = reader.read(seq, seq + count - 1, 1 << 20)
            assert [(a, b) for a, b, _ in got] == [(seq, seq + count - 1)]
            assert frames.decode_frame(got[0][2])[1] == _records(seq, count)
            seq += count
    finally:
        reader.close()
        w.close()


@pytest.mark.direct
def test_direct_torn_frame_is_cut_on_reopen(spool: Path, caplog):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 3)
    _direct_or_skip(w)
    good = w._size
    _write(w, 4, 50)
    w.close()
    last = segment_paths(spool)[-1]
    os.truncate(last, good + 20)  # a crash in the middle of the second frame
    with pytest.raises(CorruptDataError):
        list(iter_records(spool))
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT)
    assert any("cutting invalid tail" in r.getMessage() for r in caplog.records)
    assert last.stat().st_size == good and w.next_seq == 4
    _write(w, 4, 1)
    w.close()
    assert _seqs(spool) == [1, 2, 3, 4]


def test_written_frames_are_read_back_in_order(spool: Path):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 3)
    _write(w, 4, 2)
    w.sync()
    w.close()
    assert list(iter_records(spool)) == _records(1, 5)
    assert read_identity(spool).root_ident == 4242
    assert read_identity(spool).created  # stamped on creation


def test_a_frame_given_as_header_and_payload_buffers_is_written_whole(spool: Path):
    w = SpoolWriter(spool, IDENT)
    header, payload = frames.encode_frame_parts(_records(1, 3))
    w.write_frame((header, memoryview(payload)), 1, 3)
    _write(w, 4, 1)
    w.close()
    assert list(iter_records(spool)) == _records(1, 4)


def test_spool_stats_counts_segments_frames_and_records(spool: Path):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 3)
    _write(w, 4, 2)
    w.close()
    st = spool_stats(spool)
    assert st["segments"] == 1
    assert (st["frames"], st["records"], st["first_seq"], st["last_seq"]) == (2, 5, 1, 5)
    assert st["bytes"] == sum(p.stat().st_size for p in segment_paths(spool))


def test_empty_spool_reads_as_nothing(spool: Path):
    SpoolWriter(spool, IDENT).close()
    assert list(iter_records(spool)) == []
    assert spool_stats(spool)["records"] == 0


def test_reopening_continues_at_next_seq(spool: Path):
    w = SpoolWriter(spool, IDENT)
    assert w.next_seq == 1
    _write(w, 1, 4)
    w.close()
    w = SpoolWriter(spool, IDENT)
    assert w.next_seq == 5
    _write(w, 5, 2)
    w.close()
    assert _seqs(spool) == list(range(1, 7))


def test_frame_with_wrong_first_seq_is_refused(spool: Path):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    with pytest.raises(StateError, match="expected 3"):
        _write(w, 4, 1)
    w.close()
    assert _seqs(spool) == [1, 2]


def test_spool_of_another_root_is_refused(spool: Path):
    SpoolWriter(spool, IDENT).close()
    other = VolumeIdentity(source="/other", root_ident=99, block_size=4096)
    with pytest.raises(StateError, match="belongs to"):
        SpoolWriter(spool, other)
    assert read_identity(spool).root_ident == 4242


def test_segments_rotate_at_segment_bytes(spool: Path):
    frame_len = len(_frame(1, 2))
    w = SpoolWriter(spool, IDENT, segment_bytes=2 * frame_len)
    for first in range(1, 13, 2):
        _write(w, first, 2)
    w.close()
    segs = segment_paths(spool)
    assert len(segs) == 3
    assert [p.name for p in segs] == [f"{n:020d}.zfr" for n in (1, 5, 9)]
    assert _seqs(spool) == list(range(1, 13))
    assert spool_stats(spool)["segments"] == 3


def _truncate_last(spool: Path, cut: int) -> int:
    last = segment_paths(spool)[-1]
    size = last.stat().st_size
    os.truncate(last, size - cut)
    return size


def test_torn_tail_is_cut_on_reopen_with_a_warning(spool: Path, caplog):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 3)
    good_size = segment_paths(spool)[-1].stat().st_size
    _write(w, 4, 3)
    w.close()
    _truncate_last(spool, 5)  # a crash in the middle of the second frame
    with pytest.raises(CorruptDataError):
        list(iter_records(spool))
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cutting invalid tail" in warnings[0].getMessage()
    assert segment_paths(spool)[-1].stat().st_size == good_size
    assert w.next_seq == 4
    _write(w, 4, 1)
    w.close()
    assert _seqs(spool) == [1, 2, 3, 4]


def test_garbage_appended_to_the_last_segment_is_cut(spool: Path, caplog):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    w.close()
    last = segment_paths(spool)[-1]
    good_size = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\x00garbage after a crash" * 3)
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT)
    assert any("cutting invalid tail" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)
    assert last.stat().st_size == good_size
    assert w.next_seq == 3
    w.close()
    assert _seqs(spool) == [1, 2]


def test_a_last_segment_torn_in_its_first_frame_is_dropped(spool: Path, caplog):
    frame_len = len(_frame(1, 2))
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    _write(w, 1, 2)
    _write(w, 3, 2)  # second segment
    w.close()
    assert len(segment_paths(spool)) == 2
    _truncate_last(spool, 1)
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert len(segment_paths(spool)) == 1
    assert w.next_seq == 3
    _write(w, 3, 1)
    w.close()
    assert _seqs(spool) == [1, 2, 3]


def test_reopening_a_clean_spool_logs_nothing(spool: Path, caplog):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    w.close()
    caplog.set_level(logging.DEBUG, logger="zfsrep")
    SpoolWriter(spool, IDENT).close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_gap_between_segments_is_refused_by_iter_records(spool: Path):
    frame_len = len(_frame(1, 2))
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    for first in (1, 3, 5):
        _write(w, first, 2)
    w.close()
    segs = segment_paths(spool)
    assert len(segs) == 3
    segs[1].unlink()
    with pytest.raises(CorruptDataError, match="missing"):
        list(iter_records(spool))


def test_missing_first_segment_is_refused_by_iter_records(spool: Path):
    frame_len = len(_frame(1, 2))
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    for first in (1, 3):
        _write(w, first, 2)
    w.close()
    segment_paths(spool)[0].unlink()
    with pytest.raises(CorruptDataError, match="records 1..2 are missing"):
        list(iter_records(spool))


def test_corrupt_frame_in_the_middle_is_refused_by_readers(spool: Path):
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    _write(w, 3, 2)
    _write(w, 5, 2)
    w.close()
    seg = segment_paths(spool)[0]
    frame_len = len(_frame(1, 2))
    data = bytearray(seg.read_bytes())
    data[frame_len + frames.HEADER_SIZE + 2] ^= 0xFF  # payload byte of the middle frame
    seg.write_bytes(bytes(data))
    got: list[int] = []
    with pytest.raises(CorruptDataError, match="checksum"):
        for rec in iter_records(spool):
            got.append(rec[0])
    assert got == [1, 2]  # nothing after the corruption is delivered
    with pytest.raises(CorruptDataError):
        spool_stats(spool)


def test_read_identity_of_a_missing_spool_is_not_found(tmp_path: Path):
    with pytest.raises(NotFoundError):
        read_identity(tmp_path / "nothing")


@pytest.mark.parametrize("content", [b"not json{", b"[1, 2]", b'"text"', b"\xff\xfe\x00",
                                     b'{"source": "/x"}', b'{"bogus": 1}',
                                     b'{"source": "/x", "root_ident": 1, "block_size": 4096,'
                                     b' "format": 99}'])
def test_read_identity_of_a_garbage_volume_json_is_corrupt(tmp_path: Path, content: bytes):
    (tmp_path / META).write_bytes(content)
    with pytest.raises(CorruptDataError):
        read_identity(tmp_path)


def test_writer_refuses_a_spool_with_a_garbage_volume_json(spool: Path):
    spool.mkdir()
    (spool / META).write_text("{broken")
    with pytest.raises(CorruptDataError):
        SpoolWriter(spool, IDENT)


def test_incomplete_spool_is_refused_by_readers_and_writers(spool: Path):
    from zfsrep.errors import StateError
    from zfsrep.spool import read_incomplete

    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    w.mark_incomplete(2, "cannot write the spool: No space left on device")
    w.close()
    assert read_incomplete(spool)["last_seq"] == 2
    with pytest.raises(StateError, match="incomplete"):
        list(iter_records(spool))
    assert [r[0] for r in iter_records(spool, allow_incomplete=True)] == [1, 2]
    with pytest.raises(StateError, match="incomplete"):
        SpoolWriter(spool, IDENT)


@pytest.mark.direct
def test_an_o_direct_write_the_file_system_refuses_goes_through_the_page_cache(
        spool: Path, monkeypatch, caplog):
    import fcntl

    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 1)
    _direct_or_skip(w)
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data, offset: int) -> int:
        if not refused and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    _write(w, 2, 3)
    monkeypatch.undo()
    assert refused and not w._direct and not w.direct
    assert any("refused an O_DIRECT write" in r.getMessage() for r in caplog.records)
    _write(w, 5, 2)
    w.close()
    assert _seqs(spool) == list(range(1, 7))


@pytest.mark.parametrize("direct", [False, True])
def test_the_link_reader_reads_large_frames_direct_or_hands_them_out_as_ranges(
        spool: Path, direct: bool):
    """SpoolReader.read: small frames as bytes; frames of READ_DIRECT_MIN or more read with
    O_DIRECT into the reader's buffer (views, valid until the next read), or without it as
    ranges of their segment (own descriptors, closed by close_frames); across a segment
    boundary. A frame the segment does not hold whole is refused before anything is handed
    out."""
    from zfsrep.spool import READ_DIRECT_MIN, FileRange, SpoolReader, close_frames

    big = [[seq, 0, Op.WRITE, 7, 0, os.urandom(READ_DIRECT_MIN), None, 0] for seq in (2, 3)]
    frames_in = [_frame(1, 1), frames.encode_frame([big[0]]), frames.encode_frame([big[1]]),
                 _frame(4, 2)]
    w = SpoolWriter(spool, IDENT, segment_bytes=2 * READ_DIRECT_MIN)
    w.direct = direct
    for f, (first, last) in zip(frames_in, [(1, 1), (2, 2), (3, 3), (4, 5)], strict=True):
        w.write_frame(f, first, last)
    if direct:
        _direct_or_skip(w)
    w.close()
    assert len(segment_paths(spool)) == 2
    reader = SpoolReader(spool, direct=direct)
    got = reader.read(1, 5, 1 << 30)
    assert [(g[0], g[1]) for g in got] == [(1, 1), (2, 2), (3, 3), (4, 5)]
    kinds = [type(g[2]) for g in got]
    assert kinds == [bytes, memoryview if direct else FileRange,
                     memoryview if direct else FileRange, bytes]
    for (_first, _last, frame), want in zip(got, frames_in, strict=True):
        data = os.pread(frame.fd, frame.length, frame.offset) if isinstance(
            frame, FileRange) else bytes(frame)
        assert data == want
    fds = [g[2].fd for g in got if isinstance(g[2], FileRange)]
    close_frames(got)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    if direct:  # a batch larger than the buffer: the rest in memory of its own
        reader.close()
        reader = SpoolReader(spool, direct=True)
        import zfsrep.spool as spool_module
        small = spool_module.READ_BUFFER_BYTES
        spool_module.READ_BUFFER_BYTES = READ_DIRECT_MIN
        try:
            got = reader.read(2, 3, 1 << 30)
        finally:
            spool_module.READ_BUFFER_BYTES = small
        assert [bytes(g[2]) for g in got] == frames_in[1:3]
    reader.close()
    # a segment cut inside a large frame: refused, no descriptor left open
    seg = segment_paths(spool)[0]
    os.truncate(seg, seg.stat().st_size - 100 - (seg.stat().st_size - sum(
        len(f) for f in frames_in[:2])))
    before = len(os.listdir("/proc/self/fd"))
    reader = SpoolReader(spool, direct=direct)
    with pytest.raises(CorruptDataError, match="truncated"):
        reader.read(1, 5, 1 << 30)
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before


def _pending(first: int, datas: list[bytes]) -> tuple[frames.PendingFrame, list[list]]:
    """A stored frame of WRITE records whose digests are computed as it is written, and the
    records as they read back."""
    from zfsrep import blockhash

    recs = [[first + i, 7, Op.WRITE, 42, i << 20, d, frames.BlockDigests(d, 4096), 9]
            for i, d in enumerate(datas)]
    frame = frames.prepare_frame(recs)
    assert isinstance(frame, frames.PendingFrame)
    return frame, [[*r[:6], blockhash.hash_blocks(r[5], 4096), 9] for r in recs]


def test_pending_frames_are_written_with_their_digests_between_ordinary_frames(spool: Path):
    w = SpoolWriter(spool, IDENT)
    w.keep_recent = 64 << 20
    _write(w, 1, 2)
    frame, expected = _pending(3, [os.urandom(1 << 20), os.urandom(300_000)])
    w.write_frame(frame, 3, 4)
    _write(w, 5, 1)
    frame2, expected2 = _pending(6, [os.urandom((1 << 20) + 5)])
    w.write_frame(frame2, 6, 6)
    # the link's in-memory copy is the frame as written, digests included
    recent = w.recent(3, 3, 1 << 30)
    assert recent is not None
    assert frames.decode_frame(b"".join(bytes(p) for p in recent[0][2]))[1] == expected
    w.close()
    assert list(iter_records(spool)) == [*_records(1, 2), *expected, *_records(5, 1),
                                         *expected2]


def test_a_pending_frame_whose_header_never_reached_the_disk_is_a_torn_tail(spool: Path,
                                                                             caplog):
    """The payload goes first and the header last: a crash between the two leaves zeros
    where the header belongs, which reopening cuts like any torn tail."""
    w = SpoolWriter(spool, IDENT)
    _write(w, 1, 2)
    frame, _expected = _pending(3, [os.urandom(1 << 20)])
    w.write_frame(frame, 3, 3)
    w.close()
    last = segment_paths(spool)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:  # as if the header had not been written
        f.seek(size - frame.size)
        f.write(bytes(frames.HEADER_SIZE))
    caplog.set_level(logging.WARNING, logger="zfsrep.spool")
    w = SpoolWriter(spool, IDENT)
    assert any("cutting invalid tail" in r.getMessage() for r in caplog.records)
    assert w.next_seq == 3
    assert last.stat().st_size == size - frame.size
    w.close()
    assert _seqs(spool) == [1, 2]


def test_a_spool_trimmed_down_to_a_torn_frame_continues_after_the_trimmed_records(spool: Path):
    """All but the newest segment acknowledged and deleted, and the newest holds only a
    frame cut by a crash: numbering goes on from the trimmed position, not from 1."""
    frame_len = len(_frame(1, 2))
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    _write(w, 1, 2)
    _write(w, 3, 2)  # second segment
    w.trim(2)  # the first segment's records were acknowledged
    w.close()
    assert len(segment_paths(spool)) == 1
    _truncate_last(spool, 1)
    w = SpoolWriter(spool, IDENT, segment_bytes=frame_len)
    assert w.next_seq == 3
    w.close()


def test_run_state_survives_its_writer_and_tells_what_was_lost(spool: Path):
    spool.mkdir()
    assert RunState.read(spool) is None and records_lost(None, 5) is None
    st = RunState(spool, numbered=10)
    st.numbered(11)
    st.numbered(14, fast=3)
    st.counter.cast("Q")[0] = 5  # (the fast path's own count of what it queued)
    # a daemon that died now: 5 queued, 3 numbered; records through 14, the spool holds 12
    dead = RunState.read(spool)
    assert dead == {"pid": os.getpid(), "clean": False, "queued": 5, "taken": 3,
                    "numbered": 14, "busy": 0, "py_busy": 0, "fast_written": 0, "other": 0,
                    "overflow": False, "slots": []}
    why = records_lost(dead, 12)
    assert why is not None and "2 writes the fast path had answered" in why
    assert "records 13..14 were not written" in why
    assert records_lost(dict(dead, queued=3), 14) is None  # everything reached the spool
    assert records_lost(dict(dead, clean=True), 12) is None  # stopped in order
    # a handler was between changing the directory and recording the change
    st.mutating(1)
    st.counter.cast("Q")[0] = 3
    busy = RunState.read(spool)
    assert busy is not None and busy["busy"] == 1
    assert "a change it was making may not have been recorded" in records_lost(busy, 14)
    st.mutating(-1)
    st.counter.cast("Q")[3] = 1  # (the fast path serving a write)
    assert "may not have been recorded" in records_lost(RunState.read(spool), 14)
    st.counter.cast("Q")[3] = 0
    assert records_lost(RunState.read(spool), 14) is None
    st.close(clean=True)
    assert RunState.read(spool)["clean"] is True
    (spool / "mountd.run").write_bytes(b"junk")
    assert RunState.read(spool) is None


def test_run_state_names_the_files_whose_changes_were_lost(spool: Path):
    """Table slots (ident, fast-path mark, seq mark) against what reached the spool: a file
    is to be recorded again if the fast-path record or the seq that last changed it was not
    written; other kinds of loss, an interrupted Python handler and overflow refuse."""
    import struct

    spool.mkdir()
    st = RunState(spool, numbered=10)
    table = st.dirty.cast("Q")
    st.written(4, 12)  # 4 fast-path records and records through 12 written
    for i, (ident, fast, seq) in enumerate([(100, 4, 0), (101, 5, 0), (102, 0, 12),
                                            (103, 0, 13), (104, 2, 14)]):
        table[9 + 3 * i], table[10 + 3 * i] = fast, seq  # (the marks first, as in C)
        table[8 + 3 * i] = ident
    st.numbered(14)
    dead = RunState.read(spool)
    assert dead is not None and dead["fast_written"] == 4
    assert dirty_idents(dead, 12) == ({101, 103, 104}, "")
    assert dirty_idents(dead, 14) == ({101}, "")  # the spool holds more than the state says
    st.other_change(13)
    assert dirty_idents(RunState.read(spool), 12)[0] is None
    assert dirty_idents(RunState.read(spool), 13)[0] == {101, 104}
    st.mutating(1)
    why = dirty_idents(RunState.read(spool), 14)
    assert why[0] is None and "middle of a change" in why[1]
    st.mutating(-1)
    st.overflow()
    assert dirty_idents(RunState.read(spool), 14)[0] is None
    table.release()
    st.close(clean=False)
    # a run state of the version before the table: any loss refuses
    raw = bytearray((spool / "mountd.run").read_bytes())
    raw[:8] = b"ZFSRUN\x00\x01"
    struct.pack_into("=Q", raw, 88, 0)
    (spool / "mountd.run").write_bytes(bytes(raw[:4096]))
    old = RunState.read(spool)
    assert old is not None and old["overflow"] and dirty_idents(old, 14)[0] is None


def test_a_spool_has_one_writer_at_a_time(spool: Path):
    from zfsrep.syscalls import try_lock

    w = SpoolWriter(spool, IDENT)
    with pytest.raises(StateError, match=rf"in use by another mount daemon \(pid {os.getpid()}\)"):
        SpoolWriter(spool, IDENT)
    assert try_lock(spool / "lock") == (None, str(os.getpid()))
    w.close()
    fd, holder = try_lock(spool / "lock")
    assert fd is not None and holder == ""
    os.close(fd)
    SpoolWriter(spool, IDENT).close()


def test_mount_at_reads_the_mount_table(tmp_path: Path):
    from zfsrep.syscalls import mount_at

    assert mount_at("/proc") is not None and mount_at("/proc")[1] == "proc"
    assert mount_at(tmp_path) is None


def test_o_direct_buffers_are_aligned_private_and_in_whole_huge_pages_when_large():
    """The staging and read-back buffers: page-aligned for O_DIRECT; from 2 MiB on in whole
    2 MiB (so transparent huge pages can back them: a 4 MiB transfer is then one or two
    block requests, not 5-8); writable."""
    import ctypes

    from zfsrep import directio

    small = directio.aligned_buffer(100)
    assert len(small) == os.sysconf("SC_PAGE_SIZE")
    large = directio.aligned_buffer(4 * 1024 * 1024 + 1)
    assert len(large) == 6 * 1024 * 1024
    for buf in (small, large):
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert addr % directio.ALIGN == 0
        buf[-1:] = b"x"
        assert buf[-1:] == b"x"
        buf.close()
