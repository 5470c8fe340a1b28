"""Tests of the frame codec (zfsrep.frames): round trips, every malformed case, fuzzing."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import tracemalloc
import types
import zlib

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from zfsrep import blockhash
except ImportError:  # pragma: no cover - the native module may not be written yet
    import xxhash

    blockhash = types.ModuleType("zfsrep.blockhash")
    blockhash.digest = xxhash.xxh3_128_digest  # type: ignore[attr-defined]
    sys.modules["zfsrep.blockhash"] = blockhash

from zfsrep import frames
from zfsrep.errors import ExitCode, FrameError
from zfsrep.frames import (
    FLAG_STORED,
    HEADER_SIZE,
    MAGIC,
    MAX_COMP_LEN,
    MAX_RAW_LEN,
    MAX_RECORDS,
    VERSION,
    FrameHeader,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_frame_parts,
    iter_frames,
    parse_header,
    read_frame,
)

# The documented layout, spelled out independently of the module under test.
LAYOUT = struct.Struct("<4sHHQQIII8sI")


def build(
    raw: bytes,
    *,
    first_seq: int = 1,
    count: int | None = None,
    last_seq: int | None = None,
    raw_len: int | None = None,
    payload: bytes | None = None,
    magic: bytes = MAGIC,
    version: int = VERSION,
    flags: int = 0,
    comp_len: int | None = None,
) -> bytes:
    """A frame with arbitrary fields but correct checksums (so deeper checks are reached)."""
    if count is None:
        count = len(msgpack.unpackb(raw))
    if last_seq is None:
        last_seq = first_seq + count - 1
    if payload is None:
        payload = zstandard.ZstdCompressor(level=1).compress(raw)
    if raw_len is None:
        raw_len = len(raw)
    if comp_len is None:
        comp_len = len(payload)
    checksum = blockhash.digest(payload)[:8]
    head = LAYOUT.pack(
        magic, version, flags, first_seq, last_seq, count, raw_len, comp_len, checksum, 0
    )[:-4]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def expect(buf: bytes, fragment: str) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_frame(buf)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.CORRUPT
    return info.value


RECORDS = [[10, "write", 7, 4096, b"x" * 100], [11, "truncate", 7, 0], [12, "fsync", 7]]


# --- round trips -------------------------------------------------------------------------


def test_header_size_and_layout() -> None:
    assert HEADER_SIZE == LAYOUT.size == 48
    frame = encode_frame(RECORDS)
    fields = LAYOUT.unpack_from(frame)
    assert fields[:6] == (MAGIC, VERSION, 0, 10, 12, 3)
    assert fields[7] == len(frame) - HEADER_SIZE
    assert fields[9] == zlib.crc32(frame[:44])
    assert fields[8] == blockhash.digest(frame[HEADER_SIZE:])[:8]


def test_roundtrip_mixed_values() -> None:
    records = [
        [0, None, True, False, -1, 2**63, "text", "", b"", [1, [2, b"3"]], {"k": b"v", "m": {}}],
        [1],
    ]
    header, decoded = decode_frame(encode_frame(records))
    assert decoded == records
    assert (header.first_seq, header.last_seq, header.record_count) == (0, 1, 2)


def test_roundtrip_tuples_and_memoryviews_decode_as_lists_and_bytes() -> None:
    records = ((5, memoryview(b"abc")), (6, bytearray(b"de")))
    _, decoded = decode_frame(encode_frame(records))
    assert decoded == [[5, b"abc"], [6, b"de"]]


def test_roundtrip_empty_bytes_fields() -> None:
    records = [[s, b"", "", b""] for s in range(1, 50)]
    assert decode_frame(encode_frame(records))[1] == records


def test_roundtrip_large_random_bytes() -> None:
    records = [[s, "write", os.urandom(1 << 20)] for s in range(100, 104)]
    frame = encode_frame(records, level=3)
    header, decoded = decode_frame(frame)
    assert decoded == records
    assert header.comp_len <= frames.compress_bound(header.raw_len)


def test_roundtrip_many_small_records() -> None:
    records = [[s, "setattr", s % 97, "mode", 0o644] for s in range(7, 100_007)]
    header, decoded = decode_frame(encode_frame(records))
    assert decoded == records and header.record_count == 100_000


def test_roundtrip_seq_at_top_of_range() -> None:
    top = 2**64 - 1
    records = [[top - 1, "a"], [top, "b"]]
    assert decode_frame(encode_frame(records))[1] == records


def test_roundtrip_payload_at_raw_limit() -> None:
    data = bytes(MAX_RAW_LEN - 16)
    header, decoded = decode_frame(encode_frame([[1, data]]))
    assert header.raw_len <= MAX_RAW_LEN and decoded[0][1] == data


def test_encode_parts_join_to_the_frame_and_reused_compressor() -> None:
    cctx = zstandard.ZstdCompressor(level=5)
    header, payload = encode_frame_parts(RECORDS, compressor=cctx)
    assert len(header) == HEADER_SIZE
    assert decode_frame(header + payload)[1] == RECORDS
    assert decode_frame(encode_frame(RECORDS, compressor=cctx))[1] == RECORDS


def test_parse_header_fields() -> None:
    frame = encode_frame(RECORDS)
    header = parse_header(memoryview(frame))
    assert isinstance(header, FrameHeader)
    assert header == parse_header(frame[:HEADER_SIZE])
    assert header.frame_len == len(frame)
    assert decode_payload(header, frame[HEADER_SIZE:]) == RECORDS


# --- encoding refusals ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "fragment"),
    [
        ([], "no records"),
        ([[1], [3]], "expected 2"),
        ([[1], [1]], "expected 2"),
        ([["1"]], "not an int"),
        ([[True]], "not an int"),
        ([[1.0]], "not an int"),
        ([[-1]], "out of range"),
        ([[2**64 - 1], [2**64]], "out of range"),
        ([[]], "non-empty"),
        ([b"ab"], "non-empty"),
    ],
)
def test_encode_refuses_bad_records(records: list, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        encode_frame(records)


def test_encode_refuses_oversize_payload() -> None:
    with pytest.raises(ValueError, match="exceeds limit"):
        encode_frame([[1, bytes(MAX_RAW_LEN)]])


def test_encode_refuses_too_many_records() -> None:
    with pytest.raises(ValueError, match="exceed the limit"):
        encode_frame([[s] for s in range(MAX_RECORDS + 1)])


def test_encode_refuses_compressor_without_content_size() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    with pytest.raises(ValueError, match="content size"):
        encode_frame(RECORDS, compressor=cctx)


# --- malformed headers ---------------------------------------------------------------------

GOOD_RAW = msgpack.packb(RECORDS)


def test_build_helper_makes_a_valid_frame() -> None:
    assert decode_frame(build(GOOD_RAW, first_seq=10))[1] == RECORDS


def test_bad_magic() -> None:
    expect(b"XXXX" + encode_frame(RECORDS)[4:], "frame header: bad magic b'XXXX'")


def test_bad_version() -> None:
    expect(build(GOOD_RAW, first_seq=10, version=2), "frame header: unsupported version 2")


def test_header_crc_mismatch() -> None:
    frame = bytearray(encode_frame(RECORDS))
    frame[9] ^= 0x40  # inside first_seq
    expect(bytes(frame), "frame header: crc mismatch")


def test_unknown_flags() -> None:
    expect(build(GOOD_RAW, first_seq=10, flags=2), "frame header: unknown flags 0x0002")


def test_incompressible_payload_is_stored_and_round_trips() -> None:
    records = [[i + 1, 0, 5, 7, i << 20, os.urandom(1 << 20)] for i in range(4)]
    frame = encode_frame(records)
    header, out = decode_frame(frame)
    assert header.flags & FLAG_STORED
    assert header.comp_len == header.raw_len
    assert out == records


def test_compressible_payload_is_compressed() -> None:
    records = [[i + 1, 0, 5, 7, 0, b"text " * 100_000] for i in range(4)]
    header, out = decode_frame(encode_frame(records))
    assert not header.flags & FLAG_STORED
    assert header.comp_len < header.raw_len // 10
    assert out == records


def test_stored_frame_with_length_mismatch_is_refused() -> None:
    raw = msgpack.packb([[1, 0, b"x" * 100]])
    expect(build(raw, first_seq=1, flags=FLAG_STORED, payload=raw, comp_len=len(raw) - 1),
           "frame payload: stored payload")


@pytest.mark.parametrize("n", [1, 4, 20, HEADER_SIZE - 1])
def test_truncated_header(n: int) -> None:
    expect(encode_frame(RECORDS)[:n], f"frame header: truncated, {n} of 48 bytes")


def test_empty_buffer() -> None:
    expect(b"", "frame header: truncated, 0 of 48")


def test_truncated_payload() -> None:
    frame = encode_frame(RECORDS)
    expect(frame[:-1], "frame payload: truncated")
    expect(frame[:HEADER_SIZE], "frame payload: truncated, 0 of")


def test_trailing_bytes() -> None:
    expect(encode_frame(RECORDS) + b"\0", "frame: 1 trailing bytes")


def test_raw_len_over_limit() -> None:
    expect(
        build(GOOD_RAW, first_seq=10, raw_len=999_999_999),
        "frame payload: declared raw length 999999999 exceeds limit 67108864",
    )


def test_comp_len_over_limit() -> None:
    expect(
        build(GOOD_RAW, first_seq=10, raw_len=MAX_RAW_LEN, comp_len=MAX_COMP_LEN + 1),
        f"declared compressed length {MAX_COMP_LEN + 1} exceeds bound",
    )
    expect(build(GOOD_RAW, first_seq=10, comp_len=2**32 - 1), "exceeds bound")


def test_comp_len_over_bound_for_raw_len() -> None:
    expect(
        build(GOOD_RAW, first_seq=10, raw_len=10, count=3, comp_len=1000),
        "compressed length 1000 exceeds bound",
    )


def test_record_count_over_limit() -> None:
    expect(
        build(GOOD_RAW, count=MAX_RECORDS + 1, raw_len=MAX_RAW_LEN),
        f"frame header: record count {MAX_RECORDS + 1} exceeds limit {MAX_RECORDS}",
    )


def test_record_count_zero() -> None:
    expect(build(GOOD_RAW, count=0, last_seq=0), "record count is 0")


def test_seq_range_does_not_match_count() -> None:
    expect(build(GOOD_RAW, first_seq=10, last_seq=20), "seq range 10..20 does not hold 3")
    expect(build(GOOD_RAW, first_seq=10, last_seq=9), "seq range 10..9")


def test_raw_len_too_small_for_count() -> None:
    expect(build(GOOD_RAW, first_seq=10, raw_len=6, count=3), "raw length 6 too small")


def test_header_error_before_payload_is_needed() -> None:
    frame = build(GOOD_RAW, raw_len=999_999_999)
    expect(frame[:HEADER_SIZE], "exceeds limit")


# --- malformed payloads --------------------------------------------------------------------


def test_payload_checksum_mismatch() -> None:
    frame = bytearray(encode_frame(RECORDS))
    frame[-3] ^= 1
    expect(bytes(frame), "frame payload: checksum mismatch")


def test_decode_payload_wrong_length() -> None:
    frame = encode_frame(RECORDS)
    with pytest.raises(FrameError, match="bytes, header says"):
        decode_payload(parse_header(frame), frame[HEADER_SIZE:-1])


def test_zstd_garbage() -> None:
    expect(
        build(GOOD_RAW, first_seq=10, payload=b"not a zstd frame at all"),
        "frame payload: bad zstd frame header",
    )


def test_zstd_corrupt_body() -> None:
    payload = bytearray(zstandard.ZstdCompressor(level=1).compress(os.urandom(64) + GOOD_RAW))
    payload[-8:] = b"\xff" * 8
    frame = build(GOOD_RAW, first_seq=10, raw_len=64 + len(GOOD_RAW), payload=bytes(payload))
    expect(frame, "frame payload: zstd decompression failed")


def test_zstd_content_size_mismatch() -> None:
    expect(
        build(GOOD_RAW, first_seq=10, raw_len=len(GOOD_RAW) + 1),
        f"content size {len(GOOD_RAW)}, header says raw length {len(GOOD_RAW) + 1}",
    )


def test_zstd_without_content_size() -> None:
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(GOOD_RAW)
    expect(build(GOOD_RAW, first_seq=10, payload=payload), "zstd frame declares no content size")


def test_zstd_second_frame_appended() -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    payload = cctx.compress(GOOD_RAW) + cctx.compress(b"more")
    expect(build(GOOD_RAW, first_seq=10, payload=payload), "zstd decompression failed")


def test_zstd_skippable_frame() -> None:
    payload = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    expect(build(GOOD_RAW, first_seq=10, payload=payload), "frame payload: ")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """200 MiB of zeros as one zstd frame (a few kB) that declares its content size."""
    return zstandard.ZstdCompressor(level=1).compress(bytes(200 << 20))


def _peak_alloc(buf: bytes, fragment: str) -> int:
    tracemalloc.start()
    try:
        expect(buf, fragment)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bomb_with_small_declared_raw_len(bomb: bytes) -> None:
    assert len(bomb) < 64 << 10
    frame = build(b"", count=1, raw_len=1000, payload=bomb)
    assert _peak_alloc(frame, "frame payload: declared compressed length") < 1 << 20


def test_bomb_with_max_declared_raw_len(bomb: bytes) -> None:
    frame = build(b"", count=1, raw_len=MAX_RAW_LEN, payload=bomb)
    assert _peak_alloc(frame, f"content size {200 << 20}, header says") < 1 << 20


def test_bomb_with_huge_declared_raw_len(bomb: bytes) -> None:
    frame = build(b"", count=1, raw_len=200 << 20, payload=bomb)
    assert _peak_alloc(frame, "declared raw length 209715200 exceeds limit") < 1 << 20


def test_bomb_without_content_size() -> None:
    payload = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(200 << 20))
    frame = build(b"", count=1, raw_len=MAX_RAW_LEN, payload=payload)
    assert _peak_alloc(frame, "no content size") < 1 << 20


def test_zstd_frame_lying_about_content_size() -> None:
    """A frame whose content-size field is smaller than what it really holds."""
    payload = bytearray(zstandard.ZstdCompressor(level=1).compress(bytes(1 << 20)))
    fhd = payload[4]
    assert fhd >> 6 == 2  # 4-byte content-size field
    offset = 5 + (0 if fhd & 0x20 else 1)  # single-segment frames have no window byte
    payload[offset : offset + 4] = struct.pack("<I", 70_000)
    assert zstandard.frame_content_size(bytes(payload)) == 70_000
    frame = build(b"", count=1, raw_len=70_000, payload=bytes(payload))
    assert _peak_alloc(frame, "zstd decompression failed") < 1 << 20


@pytest.mark.parametrize(
    ("raw", "count", "fragment"),
    [
        (b"\xc1\xc1\xc1\xc1", 1, "bad msgpack"),  # 0xc1 is never used
        (msgpack.packb([[1]]) + b"\x00", 1, "bad msgpack"),  # extra data
        (b"\x91\xdd\xff\xff\xff\xff", 1, "bad msgpack"),  # array claiming 2**32-1 items
        (b"\x91\xc6\xff\xff\xff\xff", 1, "bad msgpack"),  # bin claiming 4 GiB
        (b"\x91\x92\x01\xa2\xff\xfe", 1, "bad msgpack"),  # invalid utf-8
        (msgpack.packb([[1, {1: 2}]]), 1, "bad msgpack"),  # non-str map key
        (msgpack.packb([[1, msgpack.ExtType(5, b"x")]]), 1, "bad msgpack"),
        (msgpack.packb([[1, msgpack.Timestamp(1, 0)]]), 1, "bad msgpack"),
        (b"\x91" * 5000 + b"\x01", 1, "bad msgpack"),  # nesting deeper than the unpacker allows
        (msgpack.packb({"a": 1}), 1, "not an array of records (dict)"),
        (msgpack.packb(12345), 1, "not an array of records (int)"),
        (msgpack.packb(["abc"]), 1, "record 0 is not a non-empty array"),
        (msgpack.packb([[1], {"a": 1}]), 2, "record 1 is not a non-empty array"),
        (msgpack.packb([[1], [], [3, "x"]]), 3, "record 1 is not a non-empty array"),
        (msgpack.packb([["x", 1]]), 1, "record 0 seq is str, not int"),
        (msgpack.packb([[True, 1]]), 1, "record 0 seq is bool, not int"),
        (msgpack.packb([[1.0, 1]]), 1, "record 0 seq is float, not int"),
        (msgpack.packb([[None, 1]]), 1, "record 0 seq is NoneType, not int"),
        (msgpack.packb([[1], [3]]), 2, "record 1 has seq 3, expected 2"),
        (msgpack.packb([[2], [3]]), 2, "record 0 has seq 2, expected 1"),
        (msgpack.packb([[1, "abc"], [2, "d"]]), 3, "2 records, header says 3"),
        (msgpack.packb([[1], [2], [3]]), 2, "3 records, header says 2"),
    ],
)
def test_malformed_payload(raw: bytes, count: int, fragment: str) -> None:
    expect(build(raw, first_seq=1, count=count), fragment)


# --- streams -------------------------------------------------------------------------------


class Dribble(io.RawIOBase):
    """A raw stream that returns at most ``step`` bytes per read (like a socket)."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def, override]
        n = min(len(buf), self._step, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class ReadOnly:
    """A stream with ``read`` but no ``readinto``."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, 5))


TWO = [[[1, b"a"], [2, b"b"]], [[3, "c"]]]


@pytest.mark.parametrize("wrap", [io.BytesIO, Dribble, ReadOnly])
def test_read_two_frames_then_eof(wrap) -> None:  # type: ignore[no-untyped-def]
    f = wrap(b"".join(encode_frame(r) for r in TWO))
    first, second = read_frame(f), read_frame(f)
    assert first is not None and first[1] == TWO[0]
    assert second is not None and second[1] == TWO[1] and second[0].first_seq == 3
    assert read_frame(f) is None
    assert read_frame(f) is None


def test_read_frame_empty_stream_is_eof() -> None:
    assert read_frame(io.BytesIO()) is None


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [(HEADER_SIZE - 1, "frame header: truncated, 47 of 48"), (1, "frame payload: truncated")],
)
def test_read_truncated_second_frame(cut: int, fragment: str) -> None:
    second = encode_frame(TWO[1])
    cut_at = cut if cut >= HEADER_SIZE - 1 else len(second) - cut
    f = Dribble(encode_frame(TWO[0]) + second[:cut_at])
    assert read_frame(f) is not None
    with pytest.raises(FrameError, match=fragment):
        read_frame(f)


def test_iter_frames() -> None:
    f = io.BytesIO(b"".join(encode_frame(r) for r in TWO))
    assert [records for _, records in iter_frames(f)] == TWO


def test_iter_frames_stops_with_error_on_a_bad_frame() -> None:
    f = io.BytesIO(encode_frame(TWO[0]) + b"junk" * 20)
    it = iter_frames(f)
    assert next(it)[1] == TWO[0]
    with pytest.raises(FrameError, match="bad magic b'junk'"):
        next(it)


# --- property tests ------------------------------------------------------------------------

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def record_batches(draw: st.DrawFn) -> list[list]:
    first = draw(st.integers(0, 2**64 - 100))
    bodies = draw(st.lists(st.lists(values, max_size=4), min_size=1, max_size=8))
    return [[first + i, *body] for i, body in enumerate(bodies)]


@settings(max_examples=200, deadline=None)
@given(record_batches())
def test_roundtrip_property(records: list[list]) -> None:
    header, decoded = decode_frame(encode_frame(records))
    assert decoded == records
    assert header.record_count == len(records)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_batches(), st.data())
def test_any_single_byte_change_is_detected(records: list[list], data: st.DataObject) -> None:
    frame = bytearray(encode_frame(records))
    index = data.draw(st.integers(0, len(frame) - 1), label="index")
    frame[index] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(FrameError):
        decode_frame(bytes(frame))
    with pytest.raises(FrameError):
        read_frame(io.BytesIO(bytes(frame)))


def test_every_single_byte_change_of_one_frame_is_detected() -> None:
    frame = encode_frame(RECORDS)
    for index in range(len(frame)):
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[index] ^= xor
            with pytest.raises(FrameError):
                decode_frame(bytes(bad))


def _only_frame_errors(buf: bytes) -> None:
    try:
        decode_frame(buf)
    except FrameError as exc:
        assert "\n" not in str(exc)
    with contextlib.suppress(FrameError):
        list(iter_frames(io.BytesIO(buf)))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_frame_error(buf: bytes) -> None:
    _only_frame_errors(buf)
    _only_frame_errors(MAGIC + buf)


@settings(max_examples=500, deadline=None)
@given(
    raw=st.binary(max_size=200),
    first_seq=st.integers(0, 2**64 - 1),
    count=st.integers(0, 70),
    raw_len_delta=st.integers(-3, 3),
    compress=st.booleans(),
)
def test_random_payload_behind_valid_header_only_raises_frame_error(
    raw: bytes, first_seq: int, count: int, raw_len_delta: int, compress: bool
) -> None:
    """Valid magic, crc and checksum: the zstd and msgpack layers see arbitrary input."""
    payload = zstandard.ZstdCompressor(level=1).compress(raw) if compress else raw
    raw_len = max(0, len(raw) + raw_len_delta)
    last_seq = min(first_seq + max(count - 1, 0), 2**64 - 1)
    _only_frame_errors(
        build(
            raw,
            first_seq=first_seq,
            count=count,
            last_seq=last_seq,
            raw_len=raw_len,
            payload=payload,
        )
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(values, max_size=6), st.integers(0, 10), st.integers(0, 6))
def test_arbitrary_msgpack_payload_only_raises_frame_error(
    obj: list, first_seq: int, count: int
) -> None:
    raw = msgpack.packb(obj)
    frame = build(raw, first_seq=first_seq, count=count, last_seq=first_seq + max(count, 1) - 1)
    try:
        header, records = decode_frame(frame)
    except FrameError:
        return
    assert [r[0] for r in records] == list(range(header.first_seq, header.last_seq + 1))


def test_after_a_streak_of_stored_frames_sampling_resumes_within_the_streak() -> None:
    random_recs = [[1, 0, 5, 7, 0, os.urandom(1 << 19)]]
    for _ in range(frames.STORE_STREAK * 2):
        assert decode_frame(encode_frame(random_recs))[0].flags & FLAG_STORED
    text_recs = [[1, 0, 5, 7, 0, b"text " * 100_000]]
    flags = [decode_frame(encode_frame(text_recs))[0].flags
             for _ in range(frames.STORE_STREAK + 1)]
    assert any(not f & FLAG_STORED for f in flags)  # sampled again, and compressed
    assert not flags[-1] & FLAG_STORED


def _write_records(first: int, datas: list[bytes]) -> list[list]:
    return [[first + i, 7, 5, 42, i << 20, d, b"\x01" * 16, 9] for i, d in enumerate(datas)]


@pytest.mark.parametrize("datas", [
    [os.urandom(1 << 20) for _ in range(3)],                       # stored, referenced
    [os.urandom(70_000), b"small", os.urandom(300_000), b""],      # mixed sizes
    [b"compressible " * 40_000, b"x" * 100_000],                   # compressed: one buffer
    [os.urandom(1000) for _ in range(10)],                         # below IOV_MIN
])
def test_encode_frame_iov_gives_the_bytes_of_encode_frame(datas: list[bytes]) -> None:
    from zfsrep.frames import encode_frame_iov

    records = _write_records(5, datas)
    parts = encode_frame_iov(records)
    joined = b"".join(bytes(memoryview(p)) for p in parts)
    assert joined == encode_frame(records)
    header, decoded = decode_frame(joined)
    assert decoded == [[r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]] for r in records]
    if datas[0][:5] != b"compr" and len(datas[0]) >= 1 << 20:
        assert header.flags & FLAG_STORED
        assert any(isinstance(p, memoryview) and p.obj is d for p in parts for d in datas)


def test_encode_frame_iov_with_known_large_records_and_runs_between() -> None:
    from zfsrep.frames import encode_frame_iov

    big = [os.urandom(1 << 20), os.urandom(100_000)]
    datas = [b"a", big[0], b"b", b"c" * 10, big[1], b"d"]
    records = _write_records(1, datas)
    for large in (None, [1, 4]):
        parts = encode_frame_iov(records, large=large)
        assert b"".join(bytes(memoryview(p)) for p in parts) == encode_frame(records)
    assert len(encode_frame_iov(records[:1], large=[])) == 2  # header and one payload


@pytest.mark.parametrize("datas", [
    [os.urandom(1 << 20) for _ in range(4)],                       # stored: written in pieces
    [os.urandom(70_000), b"small", os.urandom(300_000), b""],      # mixed sizes
    [os.urandom(300_000), os.urandom((1 << 20) + 1)],              # a partial last block
    [b"compressible " * 40_000, b"x" * 100_000],                   # compressed: digests first
    [os.urandom(1000) for _ in range(10)],                         # below IOV_MIN
])
def test_a_pending_frame_written_gives_the_bytes_of_the_frame_with_its_digests(
        datas: list[bytes], tmp_path) -> None:
    from zfsrep import blockhash
    from zfsrep.frames import BlockDigests, PendingFrame, prepare_frame

    def records(deferred: bool) -> list[list]:
        return [[5 + i, 7, 5, 42, i << 20, d,
                 BlockDigests(d, 4096) if deferred and len(d) >= frames.IOV_MIN
                 else blockhash.hash_blocks(d, 4096), 9] for i, d in enumerate(datas)]

    expected = encode_frame(records(False))
    frame = prepare_frame(records(True))
    if isinstance(frame, PendingFrame):
        assert frame.size == len(expected)
        fd = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            parts = frame.write_at(fd, 1000)
        finally:
            os.close(fd)
        assert (tmp_path / "spool").read_bytes()[1000:] == expected
        assert b"".join(bytes(memoryview(p)) for p in parts) == expected
    else:  # not stored, or too small: digests computed before packing, as before
        assert b"".join(bytes(memoryview(p)) for p in frame) == expected
    again = prepare_frame(records(True))
    finished = again.finish() if isinstance(again, PendingFrame) else again
    assert b"".join(bytes(memoryview(p)) for p in finished) == expected
    assert decode_frame(expected)[1] == records(False)


def test_block_digests_must_follow_their_own_large_value() -> None:
    from zfsrep.frames import BlockDigests, prepare_frame

    data, other = os.urandom(1 << 20), os.urandom(1 << 20)
    with pytest.raises(ValueError, match="block digests"):
        prepare_frame([[1, 7, 5, 42, 0, data, BlockDigests(other, 4096), 9]])
    with pytest.raises(ValueError, match="block digests"):
        prepare_frame([[1, 7, 5, 42, 0, BlockDigests(data, 4096), data, 9]])
