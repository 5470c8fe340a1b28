"""VolumeJournal: idempotent appends, group commit, torn tails, fsync failures, trim, reads."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest
from conftest import checked_logs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfsrep import frames
from zfsrep import journal as journal_module
from zfsrep.errors import CorruptDataError, FrameError, NotFoundError, OSFailure
from zfsrep.journal import (
    FaultInjectingFS,
    SimulatedCrash,
    VolumeJournal,
    segment_name,
)

SMALL = 300  # segment size for rotation tests: three of the frames below per segment


def _records(first: int, count: int) -> list[list]:
    return [[seq, b"x" * 40] for seq in range(first, first + count)]


def _frame(first: int, count: int = 3) -> bytes:
    return frames.encode_frame(_records(first, count))


def _fill(j: VolumeJournal, upto: int, *, count: int = 3) -> None:
    """Append frames of ``count`` records until record ``upto`` is written."""
    while j.written_seq < upto:
        assert j.append(_frame(j.written_seq + 1, count))


def _seqs(j: VolumeJournal, start: int) -> list[int]:
    return [r[0] for _h, recs in j.read_from(start) for r in recs]


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture(autouse=True)
def logs():
    yield from checked_logs()


# -- appending and group commit


def test_a_new_journal_is_empty_and_its_open_segment_exists(jpath: Path):
    with VolumeJournal(jpath) as j:
        assert (j.durable_seq, j.written_seq, j.first_seq) == (0, 0, 1)
        assert list(j.read_from(1)) == []
    assert _files(jpath) == [segment_name(1)]


def test_appended_frames_are_durable_only_after_sync(jpath: Path):
    j = VolumeJournal(jpath)
    assert j.append(_frame(1))
    assert j.append(_frame(4))
    assert (j.written_seq, j.durable_seq) == (6, 0)
    assert list(j.read_from(1)) == []  # readers see durable frames only
    assert j.sync() == 6
    assert j.durable_seq == 6
    assert _seqs(j, 1) == list(range(1, 7))
    j.close()


def test_a_resent_frame_is_dropped(jpath: Path):
    j = VolumeJournal(jpath)
    j.append(_frame(1))
    j.append(_frame(4))
    size = (jpath / segment_name(1)).stat().st_size
    assert j.append(_frame(1)) is False
    assert j.append(_frame(4)) is False
    assert j.append(_frame(2, 2)) is False  # any frame ending at or before written_seq
    assert (jpath / segment_name(1)).stat().st_size == size
    assert j.written_seq == 6
    j.close()


@pytest.mark.parametrize(("first", "count", "words"), [
    (5, 3, "overlaps the records written up to 6"),
    (9, 1, "leaves a gap: records 7..8 missing"),
])
def test_a_frame_that_does_not_follow_is_refused_and_nothing_is_written(
        jpath: Path, first: int, count: int, words: str):
    j = VolumeJournal(jpath)
    j.append(_frame(1))
    j.append(_frame(4))
    size = (jpath / segment_name(1)).stat().st_size
    with pytest.raises(CorruptDataError, match=words):
        j.append(_frame(first, count))
    assert (jpath / segment_name(1)).stat().st_size == size
    assert j.written_seq == 6
    assert j.append(_frame(7))  # the stream goes on
    j.close()


@pytest.mark.parametrize("damage", ["header", "payload", "short", "long"])
def test_a_malformed_frame_is_refused_and_nothing_is_written(jpath: Path, damage: str):
    frame = bytearray(_frame(1))
    if damage == "header":
        frame[10] ^= 1
    elif damage == "payload":
        frame[-1] ^= 1
    elif damage == "short":
        frame = frame[:-1]
    else:
        frame += b"\0"
    j = VolumeJournal(jpath)
    with pytest.raises(FrameError):
        j.append(bytes(frame))
    assert (jpath / segment_name(1)).stat().st_size == 0
    assert j.written_seq == 0
    j.close()


def test_a_new_journal_can_start_later_in_the_stream(jpath: Path):
    with VolumeJournal(jpath, first_seq=100) as j:
        assert j.durable_seq == 99
        assert j.append(_frame(1)) is False  # before the start: already had
        with pytest.raises(CorruptDataError):
            j.append(_frame(101))
        j.append(_frame(100))
        j.sync()
    with VolumeJournal(jpath) as j:  # the files, not the argument, say where it continues
        assert j.durable_seq == 102


def test_reopening_continues_the_stream_and_logs_nothing(jpath: Path, logs):
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        _fill(j, 30)
        j.sync()
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        assert (j.durable_seq, j.written_seq) == (30, 30)
        j.append(_frame(31))
        j.sync()
        assert _seqs(j, 1) == list(range(1, 34))
    assert logs.take() == []


def test_segments_rotate_and_every_full_segment_is_fsynced(jpath: Path):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, segment_bytes=SMALL)
    _fill(j, 12)  # four frames: the fourth starts a new segment
    assert _files(jpath) == [segment_name(1), segment_name(10)]
    assert ("fsync", segment_name(1)) in fs.calls
    assert j.durable_seq == 9  # the full segment is durable; the open one is not yet
    j.sync()
    assert fs.calls[-3:] == [("fsync", segment_name(10)), ("fsync_dir", "journal"),
                             ("close", segment_name(10))]
    j.close()


def test_a_sync_with_nothing_new_does_no_io(jpath: Path):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs)
    j.append(_frame(1))
    j.sync()
    n = len(fs.calls)
    assert j.sync() == 3
    assert len(fs.calls) == n
    j.close()


def test_appends_continue_while_another_thread_syncs(jpath: Path):
    j = VolumeJournal(jpath, segment_bytes=2000)
    stop = threading.Event()
    synced: list[int] = []

    def syncer() -> None:
        while not stop.is_set():
            synced.append(j.sync())

    t = threading.Thread(target=syncer)
    t.start()
    try:
        _fill(j, 600)
    finally:
        stop.set()
        t.join()
    j.sync()
    assert synced == sorted(synced)
    assert _seqs(j, 1) == list(range(1, 601))
    j.close()
    with VolumeJournal(jpath) as j2:
        assert j2.durable_seq == 600


# -- torn and corrupt tails


def _three_frames(jpath: Path) -> tuple[int, int]:
    """Write frames 1-3, 4-6, 7-9; return (end of the second frame, length of the third)."""
    with VolumeJournal(jpath) as j:
        _fill(j, 9)
        j.sync()
    n = len(_frame(7))
    return (jpath / segment_name(1)).stat().st_size - n, n


def test_a_tail_torn_at_every_byte_of_the_last_frame_is_cut(jpath: Path, logs):
    good, n = _three_frames(jpath)
    seg = jpath / segment_name(1)
    for cut in range(n):
        os.truncate(seg, good + cut)
        with VolumeJournal(jpath) as j:
            assert (j.durable_seq, j.written_seq) == (6, 6), cut
            assert seg.stat().st_size == good
            warned = logs.take()
            if cut:
                assert len(warned) == 1
                assert f"{segment_name(1)} at byte {good}" in warned[0]
                assert "truncated" in warned[0]
            else:
                assert warned == []
            assert j.append(_frame(7))
            j.sync()
        with VolumeJournal(jpath) as j:
            assert j.durable_seq == 9
    assert _seqs(VolumeJournal(jpath), 1) == list(range(1, 10))


@pytest.mark.parametrize("where", [5, 20, 47, 48, -1])
def test_a_corrupt_byte_in_the_last_frame_cuts_that_frame(jpath: Path, logs, where: int):
    good, n = _three_frames(jpath)
    seg = jpath / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[good + (where if where >= 0 else n + where)] ^= 0x40
    seg.write_bytes(bytes(data))
    with VolumeJournal(jpath) as j:
        assert j.durable_seq == 6
        assert seg.stat().st_size == good
    (warned,) = logs.take()
    assert f"at byte {good}" in warned


def test_garbage_after_the_last_frame_is_cut(jpath: Path, logs):
    good, n = _three_frames(jpath)
    seg = jpath / segment_name(1)
    with open(seg, "ab") as f:
        f.write(b"\1" * 100)
    with VolumeJournal(jpath) as j:
        assert j.durable_seq == 9
    (warned,) = logs.take()
    assert "bad magic" in warned and "100 bytes cut" in warned


@pytest.mark.parametrize("zeros", [1, 100, 4095])
def test_zero_padding_after_the_last_frame_is_its_end(jpath: Path, logs, zeros: int):
    """What O_DIRECT appends leave behind a crash: fewer than 4096 zero bytes."""
    good, n = _three_frames(jpath)
    seg = jpath / segment_name(1)
    with open(seg, "ab") as f:
        f.write(bytes(zeros))
    for direct in (True, False):
        with VolumeJournal(jpath, direct=direct) as j:
            assert j.durable_seq == j.written_seq
            j.append(_frame(j.written_seq + 1))
            j.sync()
    assert logs.take() == []
    assert _seqs(VolumeJournal(jpath), 1) == list(range(1, 16))
    assert seg.stat().st_size == good + 3 * n  # closed: no padding


@pytest.mark.parametrize("zeros,then", [(4096, b""), (100, b"\1")])
def test_zeros_that_are_no_padding_are_a_torn_tail(jpath: Path, logs, zeros: int, then: bytes):
    """A whole block of zeros, or zeros followed by data (a frame whose header did not
    reach the disk), are no padding."""
    good, n = _three_frames(jpath)
    seg = jpath / segment_name(1)
    with open(seg, "ab") as f:
        f.write(bytes(zeros) + then)
    with VolumeJournal(jpath) as j:
        assert j.durable_seq == 9
        assert seg.stat().st_size == good + n
    (warned,) = logs.take()
    assert "bad magic" in warned


def test_direct_appends_rewrite_the_last_block_and_closing_cuts_the_padding(jpath: Path):
    with VolumeJournal(jpath, direct=True) as j:
        assert j._direct  # (the test's directory is on a file system that takes O_DIRECT)
        seg = jpath / segment_name(1)
        sizes = []
        for _ in range(100):
            j.append(_frame(j.written_seq + 1))
            sizes.append(seg.stat().st_size)
        j.sync()
        assert all(size % 4096 == 0 for size in sizes)
        assert _seqs(j, 1) == list(range(1, 301))
    assert seg.stat().st_size == sum(len(_frame(first)) for first in range(1, 301, 3))
    with VolumeJournal(jpath, direct=True) as j:  # reopened in the middle of a block
        j.append(_frame(301))
        j.sync()
        assert _seqs(j, 295) == list(range(295, 304))


def test_a_frame_out_of_sequence_in_the_last_segment_is_cut(jpath: Path, logs):
    good, n = _three_frames(jpath)
    with open(jpath / segment_name(1), "ab") as f:
        f.write(_frame(20))
    with VolumeJournal(jpath) as j:
        assert j.durable_seq == 9
    (warned,) = logs.take()
    assert "sequence gap: expected record 10, frame starts at 20" in warned


def test_a_new_segment_torn_in_its_first_frame_is_kept_empty(jpath: Path, logs):
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        _fill(j, 12)
        j.sync()
    seg = jpath / segment_name(10)
    os.truncate(seg, 30)
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        assert j.durable_seq == 9
        assert seg.stat().st_size == 0
        assert j.trim(9) == 1  # even with nothing before it, the empty segment says 9
    assert len(logs.take()) == 1
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        assert (j.first_seq, j.durable_seq) == (10, 9)
        assert list(j.read_from(10)) == []
        j.append(_frame(10))


# -- faults through the seam


def test_an_fsync_failure_claims_nothing_and_refuses_appends_until_reopened(
        jpath: Path, logs):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs)
    j.append(_frame(1))
    j.sync()
    j.append(_frame(4))
    fs.fail("fsync", errno.EIO)
    with pytest.raises(OSFailure, match=r"fsync failed \(Input/output error.*EIO"):
        j.sync()
    assert j.durable_seq == 3
    assert j.broken is not None
    with pytest.raises(OSFailure, match="refuses writes until reopened"):
        j.append(_frame(4))
    with pytest.raises(OSFailure):
        j.sync()  # not retried: the kernel may have dropped the dirty pages
    assert _seqs(j, 1) == [1, 2, 3]
    j.close()
    (error,) = logs.take(logging.ERROR)
    assert "refusing writes until reopened" in error
    with VolumeJournal(jpath) as j:  # what was not durable was cut off: the peer resends it
        assert j.durable_seq == 3
        assert j.append(_frame(4))
        j.sync()
        assert j.durable_seq == 6


def test_a_directory_fsync_failure_after_rotation_is_a_sync_failure(jpath: Path, logs):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, segment_bytes=SMALL)
    _fill(j, 12)
    fs.fail("fsync_dir")
    with pytest.raises(OSFailure):
        j.sync()
    assert j.durable_seq == 9
    j.close()
    assert len(logs.take()) == 1
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        assert j.durable_seq == 9


def test_an_fsync_failure_while_rotating_refuses_the_append(jpath: Path, logs):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, segment_bytes=SMALL)
    _fill(j, 9)
    fs.fail("fsync")
    with pytest.raises(OSFailure):
        j.append(_frame(10))
    assert (j.durable_seq, j.written_seq) == (0, 0)
    assert _files(jpath) == [segment_name(1)]
    assert len(logs.take()) == 1
    j.close()


def test_an_o_direct_write_the_file_system_refuses_goes_through_the_page_cache(
        jpath: Path, logs):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, direct=True)
    if not j._direct:
        pytest.skip("the file system under tmp_path does not take O_DIRECT")
    j.append(_frame(1))
    fs.fail("write", errno.EINVAL)
    assert j.append(_frame(4))
    (warned,) = logs.take()
    assert "refused an O_DIRECT write" in warned and "page cache" in warned
    assert not j._direct
    j.append(_frame(7))
    j.sync()
    j.close()
    seg = jpath / segment_name(1)
    assert seg.stat().st_size == sum(len(_frame(f)) for f in (1, 4, 7))
    with VolumeJournal(jpath) as j:
        assert _seqs(j, 1) == list(range(1, 10))


@pytest.mark.parametrize("direct", [False, True])
def test_a_crash_half_way_through_a_write_loses_only_that_frame(jpath: Path, logs,
                                                                 direct: bool):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, direct=direct)
    j.append(_frame(1))
    j.sync()
    # O_DIRECT writes the first frame again in front of the second one
    fs.crash_in_write(keep=30 + (len(_frame(1)) if direct else 0))
    with pytest.raises(SimulatedCrash):
        j.append(_frame(4))
    fs.release()  # the process is gone: no close, no sync
    with VolumeJournal(jpath) as j:
        assert j.durable_seq == 3
        (warned,) = logs.take()
        # (O_DIRECT: the rest of the header is the first block's padding)
        assert ("crc mismatch" if direct else "truncated, 30 of 48 bytes") in warned
        j.append(_frame(4))


@pytest.mark.parametrize("direct", [False, True])
def test_a_failed_write_is_taken_back_and_the_stream_continues(jpath: Path, direct: bool):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs, direct=direct)
    j.append(_frame(1))
    size = len(_frame(1))
    fs.fail("write", errno.ENOSPC)
    with pytest.raises(OSFailure, match="ENOSPC"):
        j.append(_frame(4))
    assert (jpath / segment_name(1)).stat().st_size == size
    assert j.broken is None
    assert j.append(_frame(4))
    j.sync()
    assert _seqs(j, 1) == list(range(1, 7))
    j.close()


def test_a_failed_write_that_cannot_be_taken_back_breaks_the_journal(jpath: Path):
    fs = FaultInjectingFS()
    j = VolumeJournal(jpath, fs=fs)
    fs.fail("write", errno.EIO)
    fs.fail("truncate", errno.EIO)
    with pytest.raises(OSFailure):
        j.append(_frame(1))
    with pytest.raises(OSFailure, match="refuses writes"):
        j.append(_frame(1))
    j.close()


# -- trimming and reading


def test_trim_deletes_whole_segments_only(jpath: Path):
    j = VolumeJournal(jpath, segment_bytes=SMALL)
    _fill(j, 30)  # segments 1, 10, 19, 28
    j.sync()
    assert j.trim(9) == 1
    assert j.trim(17) == 0  # 10..18 still holds 18
    assert j.first_seq == 10
    assert j.trim(10**9) == 2  # never the open segment
    assert _files(jpath) == [segment_name(28)]
    assert j.stats() == {"bytes": (jpath / segment_name(28)).stat().st_size, "segments": 1,
                         "first_seq": 28, "last_seq": 30, "written_seq": 30}
    j.close()
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        assert (j.first_seq, j.durable_seq) == (28, 30)
        assert _seqs(j, 28) == [28, 29, 30]


def test_reading_trimmed_records_is_refused(jpath: Path):
    j = VolumeJournal(jpath, segment_bytes=SMALL)
    _fill(j, 30)
    j.sync()
    j.trim(20)
    with pytest.raises(NotFoundError, match="record 5 is not in the journal, which starts at 19"):
        list(j.read_from(5))
    assert _seqs(j, 19) == list(range(19, 31))
    j.close()


def test_read_from_crosses_segments_and_starts_at_the_frame_holding_seq(jpath: Path):
    j = VolumeJournal(jpath, segment_bytes=SMALL)
    _fill(j, 30)
    j.sync()
    got = [(h.first_seq, h.last_seq) for h, _r in j.read_from(8)]
    assert got == [(7, 9), (10, 12), (13, 15), (16, 18), (19, 21), (22, 24), (25, 27),
                   (28, 30)]
    assert list(j.read_from(31)) == []
    raw = [f for _h, f in j.read_raw_from(28)]
    assert raw == [_frame(28)]
    j.close()


def test_read_from_stops_at_durable_seq(jpath: Path):
    j = VolumeJournal(jpath, segment_bytes=SMALL)
    _fill(j, 6)
    j.sync()
    _fill(j, 12)  # rotation made 1..9 durable, 10..12 not yet
    assert _seqs(j, 1) == list(range(1, 10))
    j.close()


def test_a_damaged_full_segment_is_reported_when_read(jpath: Path):
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:
        _fill(j, 30)
        j.sync()
    seg = jpath / segment_name(10)
    data = bytearray(seg.read_bytes())
    data[-1] ^= 1
    seg.write_bytes(bytes(data))
    with VolumeJournal(jpath, segment_bytes=SMALL) as j:  # only the open segment is scanned
        assert j.durable_seq == 30
        with pytest.raises(CorruptDataError, match=f"{segment_name(10)} at byte 154: "
                                                   "frame payload: checksum mismatch"):
            list(j.read_from(1))
    os.truncate(seg, 154)
    with VolumeJournal(jpath, segment_bytes=SMALL) as j, \
            pytest.raises(CorruptDataError, match="records 16..18 are missing"):
        list(j.read_from(1))


# -- a model-based check


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["append", "sync", "reopen", "trim", "tear"]),
                          st.integers(1, 5)), max_size=30))
def test_any_history_of_operations_keeps_a_contiguous_stream(tmp_path_factory, logs,
                                                              ops):
    path = tmp_path_factory.mktemp("j") / "journal"
    j = VolumeJournal(path, segment_bytes=SMALL)
    synced = 0
    try:
        for op, n in ops:
            if op == "append":
                j.append(_frame(j.written_seq + 1, n))
            elif op == "sync":
                synced = j.sync()
            elif op == "trim":
                j.trim(synced - n)
            else:
                j.close()
                if op == "tear":  # a crash in the middle of a write to the open segment
                    with open(path / max(_files(path)), "ab") as f:
                        f.write(b"ZFRM"[:n % 4] + b"Z" * n)
                j = VolumeJournal(path, segment_bytes=SMALL)
                assert len(logs.take()) == (op == "tear")
                synced = j.durable_seq
            assert j.durable_seq >= synced
            trimmed = j.first_seq
            seqs = _seqs(j, trimmed)
            assert seqs == list(range(trimmed, j.durable_seq + 1))
    finally:
        j.close()


def test_trimming_everything_empties_a_large_open_segment_and_keeps_the_position(
        jpath: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(journal_module, "ROTATE_TRIMMED_BYTES", 1)
    j = VolumeJournal(jpath)
    _fill(j, 9)
    j.sync()
    j.trim(5)  # not everything: the open segment stays as it is
    assert _files(jpath) == [segment_name(1)]
    j.trim(9)
    assert _files(jpath) == [segment_name(10)]
    assert (jpath / segment_name(10)).stat().st_size == 0
    j.close()
    with VolumeJournal(jpath) as j:
        assert (j.first_seq, j.durable_seq) == (10, 9)
        assert j.append(_frame(10))
        assert j.sync() == 12
        assert _seqs(j, 10) == [10, 11, 12]
