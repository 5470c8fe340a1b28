"""The one codec of the record stream: frames of zstd-compressed msgpack record batches.

A frame is a fixed 48-byte little-endian header followed by ``comp_len`` bytes of payload: one
zstd frame whose content is a msgpack array of records, each record an array ``[seq, ...]``.
The byte layout, the limits and the order of the checks are documented in
``docs/frame-format.md``; the record vocabulary is in ``docs/record-format.md``.

Decoding trusts nothing: every length is bounded before anything is allocated, the header
carries a CRC-32 of itself and a 64-bit checksum of the payload, decompression is bounded by
the declared raw length, and every failure is a :class:`~zfsrep.errors.FrameError` whose
one-line message names the failed check. Encoding errors (a caller bug) are ``ValueError``.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import zstandard

from zfsrep.errors import FrameError

MAGIC = b"ZFRM"
VERSION = 1
FLAGS = 0
#: The payload is the msgpack bytes themselves, not a zstd frame (chosen by the encoder when a
#: sample of the payload does not compress: captured data that is already compressed or
#: random costs no compression time). comp_len then equals raw_len.
FLAG_STORED = 0x0001
KNOWN_FLAGS = FLAG_STORED
#: Payloads larger than this are sampled before compressing; a sample that shrinks to more
#: than STORE_RATIO of its size means the payload is stored.
SAMPLE_MIN = 256 * 1024
SAMPLE_SLICE = 32 * 1024
STORE_RATIO = 0.8
STORE_STREAK = 8

# magic, version, flags, first_seq, last_seq, record_count, raw_len, comp_len, checksum; then
# the CRC-32 of those 44 bytes
_BODY = struct.Struct("<4sHHQQIII8s")
_CRC = struct.Struct("<I")
_CRC_OFFSET = _BODY.size
HEADER_SIZE = _BODY.size + _CRC.size  # 48

MAX_RAW_LEN = 64 << 20
MAX_RECORDS = 1 << 20
MAX_SEQ = (1 << 64) - 1
_MIN_RECORD_LEN = 2  # a record is at least a 1-byte array header and a 1-byte int


def compress_bound(raw_len: int) -> int:
    """Largest payload zstd produces for ``raw_len`` input bytes (``ZSTD_COMPRESSBOUND``)."""
    small = (128 * 1024 - raw_len) >> 11 if raw_len < 128 * 1024 else 0
    return raw_len + (raw_len >> 8) + small


MAX_COMP_LEN = compress_bound(MAX_RAW_LEN)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    version: int
    flags: int
    first_seq: int
    last_seq: int
    record_count: int
    raw_len: int
    comp_len: int
    checksum: bytes

    @property
    def frame_len(self) -> int:
        """Length of the whole frame, header included."""
        return HEADER_SIZE + self.comp_len


Buffer = bytes | bytearray | memoryview

_local = threading.local()  # zstd contexts are not thread-safe: one per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("cctx", {})
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def payload_checksum(payload: Buffer) -> bytes:
    """The 8-byte payload checksum: the first 8 bytes of XXH3-128 of the compressed payload."""
    from zfsrep import blockhash  # lazy: the native hashing module loads on first use

    return blockhash.digest(payload)[:8]


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _check_seqs(records: Sequence[Sequence]) -> int:
    """Validate the seq numbers of records to encode; return first_seq."""
    first = None
    for i, rec in enumerate(records):
        if not isinstance(rec, (list, tuple)) or not rec:
            raise ValueError(f"record {i} is not a non-empty list or tuple")
        seq = rec[0]
        if type(seq) is not int:
            raise ValueError(f"record {i}: sequence number {seq!r} is not an int")
        if first is None:
            if not 0 <= seq <= MAX_SEQ - len(records) + 1:
                raise ValueError(f"record 0: sequence number {seq} out of range")
            first = seq
        elif seq != first + i:
            raise ValueError(f"record {i}: sequence number {seq}, expected {first + i}")
    assert first is not None
    return first


def encode_frame_parts(
    records: Sequence[Sequence],
    *,
    level: int = 1,
    compressor: zstandard.ZstdCompressor | None = None,
    sampled: bool = False,
) -> tuple[bytes, bytes | memoryview]:
    """Encode ``records`` as ``(header, payload)``, for ``writev``/``sendmsg`` without a join.

    ``compressor`` (optional, reused for speed; not thread-safe) must write the content size.
    ``sampled``: the caller already found the payload worth compressing.
    Raises ``ValueError`` for no records, too many, bad sequence numbers or oversize payloads.
    """
    count = len(records)
    if count == 0:
        raise ValueError("cannot encode a frame with no records")
    if count > MAX_RECORDS:
        raise ValueError(f"{count} records exceed the limit of {MAX_RECORDS} per frame")
    first_seq = _check_seqs(records)
    packer = msgpack.Packer(autoreset=False, use_bin_type=True)
    packer.pack(records if isinstance(records, (list, tuple)) else list(records))
    # The packer's own buffer: no copy of the record data. A stored payload is returned as
    # a view of it (the view keeps this packer, used for nothing else, alive).
    raw = packer.getbuffer()
    raw_len = raw.nbytes
    if raw_len > MAX_RAW_LEN:
        raise ValueError(f"payload of {raw_len} bytes exceeds limit {MAX_RAW_LEN}")
    cctx = _compressor(level) if compressor is None else compressor
    payload: bytes | memoryview
    if raw_len >= SAMPLE_MIN and not sampled and not _sampled_worth_compressing(cctx, raw):
        flags, payload = FLAG_STORED, raw
    else:
        flags, payload = FLAGS, cctx.compress(raw)
        raw.release()
        if zstandard.frame_content_size(payload) != raw_len:
            raise ValueError(
                "the zstd compressor must write the content size (write_content_size)")
    comp_len = len(payload) if isinstance(payload, bytes) else payload.nbytes
    if comp_len > compress_bound(raw_len):  # pragma: no cover - zstd guarantees the bound
        raise ValueError(f"compressed payload of {comp_len} bytes exceeds the zstd bound")
    last_seq = first_seq + count - 1
    fields = (MAGIC, VERSION, flags, first_seq, last_seq, count, raw_len, comp_len)
    head = _BODY.pack(*fields, payload_checksum(payload))
    return head + _CRC.pack(zlib.crc32(head)), payload


#: Record values (WRITE data) at least this large are not copied into the payload buffer by
#: :func:`encode_frame_iov`: the payload is then a list of buffers that refer to them.
IOV_MIN = 64 * 1024
_BIN32 = struct.Struct(">BI")


def _is_large(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview) and \
        memoryview(value).nbytes >= IOV_MIN


class BlockDigests(bytearray):
    """The block digests of a large record value ``source`` (``block_size`` blocks), to be
    computed when the frame is written: a record value that :func:`prepare_frame` packs as
    the bin it will hold (a placeholder of the right length until :meth:`fill`), so the
    frame's bytes are those of the record with its digests computed first."""

    def __init__(self, source: Buffer, block_size: int) -> None:
        from zfsrep import blockhash

        self.source = source
        self.block_size = block_size
        super().__init__(blockhash.block_count(memoryview(source).nbytes, block_size)
                         * blockhash.DIGEST_SIZE)

    def fill(self) -> None:
        from zfsrep import blockhash

        memoryview(self)[:] = blockhash.hash_blocks(self.source, self.block_size)


def _bin_header(n: int) -> bytes:
    """The msgpack header of a bin of ``n`` bytes (the smallest form, as msgpack packs)."""
    if n < 0x100:
        return bytes((0xC4, n))
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return _BIN32.pack(0xC6, n)


def _payload_iov(records: Sequence[Sequence], large: Sequence[int] | None = None
                 ) -> tuple[list[bytes | memoryview], int, dict[int, BlockDigests]]:
    """The msgpack payload of ``records`` as buffers whose concatenation is exactly what
    ``msgpack.packb(records, use_bin_type=True)`` gives, with every bytes-like value of at
    least IOV_MIN bytes referenced instead of copied, and every :class:`BlockDigests` value
    referenced too (``targets`` maps the index of its source's part to it). ``large``: the
    indices of the records that hold such values, if the caller knows them (else every
    value is looked at)."""
    packer = msgpack.Packer(use_bin_type=True)
    if large is None:
        large = [i for i, rec in enumerate(records) if any(map(_is_large, rec))]
    parts: list[bytes | memoryview] = []
    targets: dict[int, BlockDigests] = {}
    buf = bytearray(packer.pack_array_header(len(records)))
    done = 0
    for i in (*large, len(records)):
        if i > done:  # a run of records without large values: one call to the C packer
            run = records[done:i]
            packed = packer.pack(run if isinstance(run, list | tuple) else list(run))
            buf += memoryview(packed)[len(packer.pack_array_header(i - done)):]
        if i == len(records):
            break
        rec = records[i]
        buf += packer.pack_array_header(len(rec))
        source: tuple[int, object] | None = None  # the last large value's part, and it
        for value in rec:
            if isinstance(value, BlockDigests):
                if source is None or source[1] is not value.source:
                    raise ValueError(f"record {i}: block digests of a value that is not "
                                     "the record's large value before them")
                targets[source[0]] = value
                buf += _bin_header(len(value))
                parts.append(bytes(buf))
                parts.append(memoryview(value))
                buf = bytearray()
            elif _is_large(value):
                view = memoryview(value).cast("B")
                buf += _BIN32.pack(0xC6, view.nbytes)
                parts.append(bytes(buf))
                parts.append(view)
                source = (len(parts) - 1, value)
                buf = bytearray()
            else:
                buf += packer.pack(value)
        done = i + 1
    if buf:
        parts.append(bytes(buf))
    return parts, sum(memoryview(p).nbytes for p in parts), targets


def _iov_slice(parts: Sequence[bytes | memoryview], start: int, n: int) -> bytes:
    out = bytearray()
    for p in parts:
        view = memoryview(p)
        if start >= view.nbytes:
            start -= view.nbytes
            continue
        take = view[start:start + n - len(out)]
        out += take
        start = 0
        if len(out) >= n:
            break
    return bytes(out)


class PendingFrame:
    """A stored frame (its payload does not compress) whose :class:`BlockDigests` are still
    to be computed: :meth:`write_at` computes them while it writes the frame, in one pass
    over the data; :meth:`finish` computes them in memory. Either gives the bytes
    :func:`encode_frame` gives for the records with their digests filled in."""

    def __init__(self, fields: tuple, parts: list[bytes | memoryview],
                 targets: dict[int, BlockDigests], raw_len: int) -> None:
        self._fields = fields
        self.parts = parts
        self._targets = targets
        self.size = HEADER_SIZE + raw_len

    def header(self, checksum: bytes) -> bytes:
        head = _BODY.pack(*self._fields, checksum[:8])
        return head + _CRC.pack(zlib.crc32(head))

    def finish(self) -> list[bytes | memoryview]:
        """The frame as buffers, header first, with every digest computed."""
        from zfsrep import blockhash

        for digests in self._targets.values():
            digests.fill()
        return [self.header(blockhash.digest_parts(self.parts)), *self.parts]

    def write_at(self, fd: int, offset: int) -> list[bytes | memoryview]:
        """Write the frame at ``offset`` of the file ``fd``: the payload first, hashed,
        checksummed and written piece by piece, then the header (until then a reader sees
        no frame there, a crash leaves a torn tail). Returns the frame as buffers, header
        first. OSError if a write fails."""
        from zfsrep import blockhash

        block_size, digests = self._digest_targets()
        checksum = blockhash.write_parts(fd, offset + HEADER_SIZE, self.parts, digests,
                                         block_size)
        head = self.header(checksum)
        if os.pwrite(fd, head, offset) != len(head):
            raise OSError(errno.EIO, "short write of a frame header")
        return [head, *self.parts]

    def stage(self, dst: memoryview) -> list[bytes | memoryview]:
        """Copy the frame into ``dst`` (``size`` bytes, header first), the payload hashed
        and checksummed as it is copied (for a file written with O_DIRECT). Returns the
        frame as buffers, header first."""
        from zfsrep import blockhash

        block_size, digests = self._digest_targets()
        checksum = blockhash.stage_parts(dst[HEADER_SIZE:self.size], self.parts, digests,
                                         block_size)
        head = self.header(checksum)
        dst[:HEADER_SIZE] = head
        return [head, *self.parts]

    def _digest_targets(self) -> tuple[int, list[bytearray | None]]:
        from zfsrep import blockhash

        sizes = {d.block_size for d in self._targets.values()}
        if len(sizes) > 1:
            raise ValueError(f"block digests of one frame in several block sizes: {sizes}")
        block_size = sizes.pop() if sizes else blockhash.WRITE_PIECE
        return block_size, [self._targets.get(i) for i in range(len(self.parts))]


def _fill(records: Sequence[Sequence], large: Sequence[int] | None) -> None:
    """Compute every :class:`BlockDigests` value of ``records`` now (before they are packed
    as they are)."""
    for i in range(len(records)) if large is None else large:
        for value in records[i]:
            if isinstance(value, BlockDigests):
                value.fill()


def encode_frame_iov(records: Sequence[Sequence], *, level: int = 1,
                     large: Sequence[int] | None = None) -> list[bytes | memoryview]:
    """Encode ``records`` as one frame given as buffers to write back to back (header
    first): the same bytes as :func:`encode_frame`, but when the payload is stored (it does
    not compress) its large values are not copied, only referred to. For ``writev``.
    ``large`` lists the records holding values of at least IOV_MIN bytes, if known."""
    frame = prepare_frame(records, level=level, large=large)
    return frame.finish() if isinstance(frame, PendingFrame) else frame


def prepare_frame(records: Sequence[Sequence], *, level: int = 1,
                  large: Sequence[int] | None = None
                  ) -> list[bytes | memoryview] | PendingFrame:
    """:func:`encode_frame_iov`, except that a stored frame whose records hold
    :class:`BlockDigests` comes as a :class:`PendingFrame`, to be written (or finished)
    with its digests computed on the way."""
    count = len(records)
    if count == 0 or count > MAX_RECORDS:
        return list(encode_frame_parts(records, level=level))  # raises the ValueError
    first_seq = _check_seqs(records)
    if large is not None and not large:
        return list(encode_frame_parts(records, level=level))
    parts, raw_len, targets = _payload_iov(records, large)
    if len(parts) <= 1 or raw_len < SAMPLE_MIN:
        _fill(records, large)
        return list(encode_frame_parts(records, level=level))
    if raw_len > MAX_RAW_LEN:
        raise ValueError(f"payload of {raw_len} bytes exceeds limit {MAX_RAW_LEN}")
    cctx = _compressor(level)
    sample = memoryview(b"".join(
        _iov_slice(parts, start, SAMPLE_SLICE)
        for start in (0, (raw_len - SAMPLE_SLICE) // 2, raw_len - SAMPLE_SLICE)))
    if _sampled_worth_compressing(cctx, sample):
        _fill(records, large)
        return list(encode_frame_parts(records, level=level, sampled=True))
    last_seq = first_seq + count - 1
    fields = (MAGIC, VERSION, FLAG_STORED, first_seq, last_seq, count, raw_len, raw_len)
    return PendingFrame(fields, parts, targets, raw_len)


def _sampled_worth_compressing(cctx: zstandard.ZstdCompressor, raw: memoryview) -> bool:
    """_worth_compressing, but after STORE_STREAK stored frames in a row (in this thread)
    only every STORE_STREAK-th frame is sampled: a stream of incompressible data (media,
    archives, encrypted files) then costs no compression time at all."""
    streak = getattr(_local, "stored_streak", 0)
    if streak >= STORE_STREAK and streak % STORE_STREAK:
        _local.stored_streak = streak + 1
        return False
    worth = _worth_compressing(cctx, raw)
    _local.stored_streak = 0 if worth else streak + 1
    return worth


def _worth_compressing(cctx: zstandard.ZstdCompressor, raw: memoryview) -> bool:
    """Compress three slices (start, middle, end); False if they barely shrink."""
    n = raw.nbytes
    total = packed = 0
    for start in (0, (n - SAMPLE_SLICE) // 2, n - SAMPLE_SLICE):
        piece = raw[start:start + SAMPLE_SLICE]
        total += piece.nbytes
        packed += len(cctx.compress(piece))
    return packed <= STORE_RATIO * total


def encode_frame(
    records: Sequence[Sequence],
    *,
    level: int = 1,
    compressor: zstandard.ZstdCompressor | None = None,
) -> bytes:
    """Encode ``records`` (each ``[seq, ...]``, seqs consecutive) as one frame."""
    header, payload = encode_frame_parts(records, level=level, compressor=compressor)
    return b"".join((header, payload))


def parse_header(buf: Buffer) -> FrameHeader:
    """Parse and validate the header at the start of ``buf`` (later bytes are ignored)."""
    if len(buf) < HEADER_SIZE:
        raise FrameError(f"frame header: truncated, {len(buf)} of {HEADER_SIZE} bytes")
    magic, version, flags, first_seq, last_seq, count, raw_len, comp_len, checksum = (
        _BODY.unpack_from(buf)
    )
    (crc,) = _CRC.unpack_from(buf, _CRC_OFFSET)
    if magic != MAGIC:
        raise FrameError(f"frame header: bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(f"frame header: unsupported version {version}, expected {VERSION}")
    actual_crc = zlib.crc32(memoryview(buf)[:_CRC_OFFSET])
    if crc != actual_crc:
        raise FrameError(
            f"frame header: crc mismatch (stored {crc:#010x}, computed {actual_crc:#010x})"
        )
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"frame header: unknown flags {flags:#06x}")
    if count == 0:
        raise FrameError("frame header: record count is 0")
    if count > MAX_RECORDS:
        raise FrameError(f"frame header: record count {count} exceeds limit {MAX_RECORDS}")
    if last_seq < first_seq or last_seq - first_seq + 1 != count:
        raise FrameError(
            f"frame header: seq range {first_seq}..{last_seq} does not hold {count} records"
        )
    if raw_len > MAX_RAW_LEN:
        raise FrameError(
            f"frame payload: declared raw length {raw_len} exceeds limit {MAX_RAW_LEN}"
        )
    if raw_len < 1 + _MIN_RECORD_LEN * count:
        raise FrameError(f"frame header: raw length {raw_len} too small for {count} records")
    if flags & FLAG_STORED and comp_len != raw_len:
        raise FrameError(
            f"frame payload: stored payload of {comp_len} bytes, header says raw length {raw_len}"
        )
    if comp_len > compress_bound(raw_len):
        raise FrameError(
            f"frame payload: declared compressed length {comp_len} exceeds bound "
            f"{compress_bound(raw_len)} for raw length {raw_len}"
        )
    return FrameHeader(version, flags, first_seq, last_seq, count, raw_len, comp_len, checksum)


def _decompress(header: FrameHeader, payload: Buffer) -> bytes:
    try:
        declared = zstandard.frame_content_size(payload)
    except Exception as exc:  # untrusted input: any parser failure means a bad frame
        raise FrameError(f"frame payload: bad zstd frame header ({_oneline(exc)})") from None
    if declared != header.raw_len:
        what = "no content size" if declared == -1 else f"content size {declared}"
        raise FrameError(
            f"frame payload: zstd frame declares {what}, header says raw length {header.raw_len}"
        )
    try:
        raw = _decompressor().decompress(
            payload, max_output_size=header.raw_len, allow_extra_data=False
        )
    except Exception as exc:
        raise FrameError(f"frame payload: zstd decompression failed ({_oneline(exc)})") from None
    if len(raw) != header.raw_len:
        raise FrameError(
            f"frame payload: decompressed {len(raw)} bytes, header says {header.raw_len}"
        )
    return raw


def decode_payload(header: FrameHeader, payload: Buffer) -> list[list]:
    """Verify and decode the payload that follows ``header``; return its records."""
    if len(payload) != header.comp_len:
        raise FrameError(f"frame payload: {len(payload)} bytes, header says {header.comp_len}")
    if payload_checksum(payload) != header.checksum:
        raise FrameError("frame payload: checksum mismatch")
    raw = payload if header.flags & FLAG_STORED else _decompress(header, payload)
    n = header.raw_len
    try:
        records = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # untrusted input: any parser failure means a bad frame
        raise FrameError(f"frame payload: bad msgpack ({_oneline(exc)})") from None
    if type(records) is not list:
        raise FrameError(f"frame payload: not an array of records ({type(records).__name__})")
    if len(records) != header.record_count:
        raise FrameError(
            f"frame payload: {len(records)} records, header says {header.record_count}"
        )
    expected = header.first_seq
    for i, rec in enumerate(records):
        if type(rec) is not list or not rec:
            raise FrameError(f"frame payload: record {i} is not a non-empty array")
        seq = rec[0]
        if type(seq) is not int:
            raise FrameError(f"frame payload: record {i} seq is {type(seq).__name__}, not int")
        if seq != expected:
            raise FrameError(f"frame payload: record {i} has seq {seq}, expected {expected}")
        expected += 1
    return records


def decode_frame(buf: Buffer) -> tuple[FrameHeader, list[list]]:
    """Decode a buffer that holds exactly one frame."""
    header = parse_header(buf)
    if len(buf) < header.frame_len:
        raise FrameError(
            f"frame payload: truncated, {len(buf) - HEADER_SIZE} of {header.comp_len} bytes"
        )
    if len(buf) > header.frame_len:
        raise FrameError(f"frame: {len(buf) - header.frame_len} trailing bytes after payload")
    return header, decode_payload(header, memoryview(buf)[HEADER_SIZE:])


def _read_into(f: BinaryIO, buf: bytearray) -> int:
    """Fill ``buf`` from ``f``; return how many bytes were read (short only at EOF)."""
    view = memoryview(buf)
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < len(buf):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = f.read(len(buf) - got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got


def read_frame(f: BinaryIO, *, padded: bool = False) -> tuple[FrameHeader, list[list]] | None:
    """Read one frame from a blocking binary stream; ``None`` at a clean EOF, and with
    ``padded`` (a spool segment) also at zero bytes where a header would start (the
    padding after a segment's last frame).

    A stream that ends inside a frame raises :class:`FrameError`; ``OSError`` propagates.
    """
    head = bytearray(HEADER_SIZE)
    got = _read_into(f, head)
    if got == 0 or (padded and padding_to_end(f, head[:got])):
        return None
    if got < HEADER_SIZE:
        raise FrameError(f"frame header: truncated, {got} of {HEADER_SIZE} bytes")
    header = parse_header(head)  # bounds comp_len before the payload buffer is allocated
    payload = bytearray(header.comp_len)
    got = _read_into(f, payload)
    if got < header.comp_len:
        raise FrameError(f"frame payload: truncated, {got} of {header.comp_len} bytes")
    return header, decode_payload(header, payload)


#: A segment written with O_DIRECT (spool or open journal segment) ends with fewer than this
#: many zero bytes after its last frame (zfsrep.directio).
SEGMENT_PAD = 4096


def padding_to_end(f: BinaryIO, head: bytes | bytearray) -> bool:
    """Whether ``head``, just read from ``f`` where a frame header would start, begins a
    segment's O_DIRECT padding: zero bytes (a header starts with the magic), fewer than
    SEGMENT_PAD of them, through the end of the file. Zero bytes followed by data (a frame
    whose header was not written) are no padding; ``f`` is then moved past ``head``."""
    if any(head):
        return False
    rest = f.read(SEGMENT_PAD)
    if len(head) + len(rest) < SEGMENT_PAD and not any(rest):
        return True
    f.seek(-len(rest), os.SEEK_CUR)
    return False


def iter_frames(f: BinaryIO) -> Iterator[tuple[FrameHeader, list[list]]]:
    """Yield every frame of a stream until a clean EOF."""
    while (frame := read_frame(f)) is not None:
        yield frame
