"""XXH3-128 digests of fixed-size blocks, computed a whole buffer per call.

This is the only module that imports the compiled ``zfsrep._blockhash``
(native/blockhash.c, built by native/build_blockhash.py). It also carries
:class:`reference`, a pure-Python implementation on the ``xxhash`` package that
the tests compare the native code against, and which is used instead (with a
logged warning) when the extension is not built.

A buffer of ``n`` bytes has ``ceil(n / block_size)`` blocks; the last one may
be shorter and is hashed as its own shorter input. Digests are 16-byte
canonical (big-endian) XXH3-128 values, equal to ``xxhash.xxh3_128_digest``.

The native calls release the GIL. They are meant for worker threads: hashing
64 MiB takes milliseconds, far too long to run on the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from itertools import compress
from typing import Any, TypeAlias, cast

try:
    from zfsrep._blockhash import ffi as _ffi
    from zfsrep._blockhash import lib as _lib
except ImportError:
    _ffi = _lib = None

log = logging.getLogger(__name__)

#: Anything with a C-contiguous buffer: bytes, bytearray, memoryview, mmap, ...
Buffer: TypeAlias = bytes | bytearray | memoryview

DIGEST_SIZE = 16
#: :func:`write_parts` hashes, checksums and writes its data in pieces of this size, each
#: still in the CPU's cache from the step before (a core's L2 holds several).
WRITE_PIECE = 256 * 1024

#: True when the compiled extension is in use, False for the pure-Python fallback.
NATIVE: bool = _lib is not None


def block_count(length: int, block_size: int) -> int:
    """Number of blocks in ``length`` bytes, counting a partial last block."""
    _check_block_size(block_size)
    if length < 0:
        raise ValueError(f"length must be >= 0, not {length}")
    return -(-length // block_size)


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, not {block_size}")


def _check_piece(block_size: int, piece: int) -> None:
    _check_block_size(block_size)
    if piece <= 0 or piece % block_size:
        raise ValueError(f"piece must be a positive multiple of {block_size}, not {piece}")


def _check_digests(digests: Buffer) -> int:
    """Number of digests in ``digests``; ValueError unless a whole number."""
    size = memoryview(digests).nbytes
    if size % DIGEST_SIZE:
        raise ValueError(f"digests length {size} is not a multiple of {DIGEST_SIZE}")
    return size // DIGEST_SIZE


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _xxh3(data: Buffer) -> bytes:
    try:  # only the reference implementation needs xxhash (a test dependency): imported
        import xxhash  # when it is used, not by every command that hashes natively
    except ImportError:
        raise RuntimeError("pure-Python block hashing needs the xxhash package") from None
    return xxhash.xxh3_128_digest(data)


class reference:
    """Pure-Python implementation, one ``xxhash`` call per block; a namespace
    with the same functions as the module."""

    @staticmethod
    def hash_blocks(buf: Buffer, block_size: int) -> bytes:
        _check_block_size(block_size)
        view = _byte_view(buf)
        return b"".join(
            _xxh3(view[off : off + block_size]) for off in range(0, len(view), block_size)
        )

    @staticmethod
    def diff_blocks(buf: Buffer, digests: Buffer, block_size: int) -> list[int]:
        ndigests = _check_digests(digests)
        old = _byte_view(digests)
        new = reference.hash_blocks(buf, block_size)
        return [
            i
            for i in range(len(new) // DIGEST_SIZE)
            if i >= ndigests
            or new[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            != old[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        ]

    @staticmethod
    def zero_blocks(buf: Buffer, block_size: int) -> list[int]:
        _check_block_size(block_size)
        view = _byte_view(buf)
        return [
            i
            for i, off in enumerate(range(0, len(view), block_size))
            if not any(view[off : off + block_size])
        ]

    @staticmethod
    def digest(buf: Buffer) -> bytes:
        return _xxh3(_byte_view(buf))

    @staticmethod
    def digest_parts(parts: Sequence[Buffer]) -> bytes:
        return _xxh3(b"".join(_byte_view(p) for p in parts))

    @staticmethod
    def write_parts(fd: int, offset: int, parts: Sequence[Buffer],
                    digests: Sequence[bytearray | None], block_size: int,
                    piece: int = WRITE_PIECE) -> bytes:
        from zfsrep.syscalls import pwritev_all

        buf = bytearray(sum(len(_byte_view(p)) for p in parts))
        checksum = reference.stage_parts(memoryview(buf), parts, digests, block_size, piece)
        pwritev_all(fd, offset, [memoryview(buf)])
        return checksum

    @staticmethod
    def stage_parts(dst: memoryview, parts: Sequence[Buffer],
                    digests: Sequence[bytearray | None], block_size: int,
                    piece: int = WRITE_PIECE) -> bytes:
        _check_piece(block_size, piece)
        for part, out in zip(parts, digests, strict=True):
            if out is not None:
                out[:] = reference.hash_blocks(part, block_size)
        at = 0
        for p in parts:
            view = _byte_view(p)
            dst[at:at + len(view)] = view
            at += len(view)
        return reference.digest_parts(parts)

    @staticmethod
    def kernel() -> str:
        return "reference"


if not NATIVE:
    log.warning("zfsrep._blockhash is not built; using the slow pure-Python block hashing")


def _cbuf(buf: Buffer) -> Any:
    # Zero-copy: a uint8_t[] view of the caller's memory (read-only is fine).
    return _ffi.from_buffer("uint8_t[]", buf)


def hash_blocks(buf: Buffer, block_size: int) -> bytes:
    """Concatenated digests of every block of ``buf`` (n * 16 bytes)."""
    _check_block_size(block_size)
    if _lib is None:
        return reference.hash_blocks(buf, block_size)
    src = _cbuf(buf)
    out = _ffi.new("uint8_t[]", block_count(len(src), block_size) * DIGEST_SIZE)
    n = _lib.zb_hash_blocks(src, len(src), block_size, out)
    return cast(bytes, _ffi.buffer(out, n * DIGEST_SIZE)[:])


def diff_blocks(buf: Buffer, digests: Buffer, block_size: int) -> list[int]:
    """Indices of blocks of ``buf`` whose digest differs from the matching one
    in ``digests``; blocks beyond the end of ``digests`` always differ, digests
    beyond the end of ``buf`` are ignored."""
    _check_block_size(block_size)
    ndigests = _check_digests(digests)
    if _lib is None:
        return reference.diff_blocks(buf, digests, block_size)
    src = _cbuf(buf)
    out = _ffi.new("size_t[]", max(block_count(len(src), block_size), 1))
    n = _lib.zb_diff_blocks(src, len(src), block_size, _cbuf(digests), ndigests, out)
    return cast("list[int]", _ffi.unpack(out, n))


def zero_blocks(buf: Buffer, block_size: int) -> list[int]:
    """Indices of the blocks of ``buf`` that are all zero bytes."""
    _check_block_size(block_size)
    if _lib is None:
        return reference.zero_blocks(buf, block_size)
    src = _cbuf(buf)
    flags = _ffi.new("uint8_t[]", max(block_count(len(src), block_size), 1))
    n = _lib.zb_zero_blocks(src, len(src), block_size, flags)
    return list(compress(range(n), _ffi.buffer(flags, n)[:]))  # bytes: ints 0/1


def digest(buf: Buffer) -> bytes:
    """Digest of the whole of ``buf`` (16 bytes)."""
    if _lib is None:
        return reference.digest(buf)
    src = _cbuf(buf)
    out = _ffi.new("uint8_t[]", DIGEST_SIZE)
    _lib.zb_digest(src, len(src), out)
    return cast(bytes, _ffi.buffer(out, DIGEST_SIZE)[:])


def digest_parts(parts: Sequence[Buffer]) -> bytes:
    """Digest of the concatenation of ``parts`` (16 bytes), without joining them."""
    if _lib is None:
        return reference.digest_parts(parts)
    srcs = [_cbuf(p) for p in parts]
    ptrs = _ffi.new("uint8_t *[]", srcs)
    lens = _ffi.new("size_t[]", [len(b) for b in srcs])
    out = _ffi.new("uint8_t[]", DIGEST_SIZE)
    _lib.zb_digest_parts(ptrs, lens, len(srcs), out)
    return cast(bytes, _ffi.buffer(out, DIGEST_SIZE)[:])


def write_parts(fd: int, offset: int, parts: Sequence[Buffer],
                digests: Sequence[bytearray | None], block_size: int,
                piece: int = WRITE_PIECE) -> bytes:
    """Write the concatenation of ``parts`` to ``fd`` from ``offset`` on and return its
    digest (that of :func:`digest_parts`). Where ``digests[i]`` is a bytearray, part ``i``
    is also hashed block by block into it (it must hold ``block_count`` digests), and a
    later part may be that bytearray: it is filled before it is reached. One pass over the
    data, ``piece`` bytes at a time, each hashed, checksummed and written while in the CPU's
    cache. OSError if a write fails (how much was written is then unknown)."""
    _check_piece(block_size, piece)
    if len(digests) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(digests)} digest targets")
    if _lib is None:
        return reference.write_parts(fd, offset, parts, digests, block_size, piece)
    ptrs, lens, targets, count = _part_args(parts, digests, block_size)
    result = _ffi.new("uint8_t[]", DIGEST_SIZE)
    err = _lib.zb_write_parts(fd, offset, ptrs, lens, targets, count, block_size, piece, result)
    if err:
        raise OSError(err, os.strerror(err))
    return cast(bytes, _ffi.buffer(result, DIGEST_SIZE)[:])


def _part_args(parts: Sequence[Buffer], digests: Sequence[bytearray | None],
               block_size: int) -> tuple[Any, Any, Any, int]:
    """The C arrays for ``zb_write_parts`` / ``zb_stage_parts``: parts, their lengths,
    their digest targets (checked for size), and how many."""
    srcs = [_cbuf(p) for p in parts]
    outs = []
    for src, out in zip(srcs, digests, strict=True):
        if out is None:
            outs.append(_ffi.NULL)
            continue
        if len(out) != block_count(len(src), block_size) * DIGEST_SIZE:
            raise ValueError(f"digest target of {len(out)} bytes for {len(src)} bytes of data")
        outs.append(_ffi.from_buffer("uint8_t[]", out, require_writable=True))
    return (_ffi.new("uint8_t *[]", srcs), _ffi.new("size_t[]", [len(b) for b in srcs]),
            _ffi.new("uint8_t *[]", outs), len(srcs))


def stage_parts(dst: memoryview, parts: Sequence[Buffer],
                digests: Sequence[bytearray | None], block_size: int,
                piece: int = WRITE_PIECE) -> bytes:
    """As :func:`write_parts`, but the parts are copied back to back into ``dst`` (a
    writable buffer of at least their total size) instead of written to a file."""
    _check_piece(block_size, piece)
    if len(digests) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(digests)} digest targets")
    if _lib is None:
        return reference.stage_parts(dst, parts, digests, block_size, piece)
    out_buf = _ffi.from_buffer("uint8_t[]", dst, require_writable=True)
    total = sum(len(_byte_view(p)) for p in parts)
    if len(out_buf) < total:
        raise ValueError(f"{len(out_buf)} bytes of room for {total} bytes of parts")
    ptrs, lens, targets, count = _part_args(parts, digests, block_size)
    result = _ffi.new("uint8_t[]", DIGEST_SIZE)
    err = _lib.zb_stage_parts(out_buf, ptrs, lens, targets, count, block_size, piece, result)
    if err:
        raise OSError(err, os.strerror(err))
    return cast(bytes, _ffi.buffer(result, DIGEST_SIZE)[:])


def kernel() -> str:
    """Which implementation runs: "avx512", "avx2", "default" (the header's
    compile-time choice), "shared"/"shared-dispatch" (linked libxxhash) or
    "reference" (pure Python)."""
    if _lib is None:
        return reference.kernel()
    return cast(bytes, _ffi.string(_lib.zb_kernel())).decode()
