"""Append-only pack files holding a volume's block data (docs/store-index.md).

Block contents are stored in **groups**: up to :data:`GROUP_BLOCKS` blocks (in arrival order,
usually consecutive blocks of one file) are concatenated, each with its trailing zero bytes
trimmed, and stored as one blob: zstd-compressed when that saves at least
:data:`MIN_SAVING`, raw otherwise (random data costs 1.0x). All-zero blocks are holes and store
nothing. A blob is addressed by a **group location** ``gloc = pack_no << 40 | offset`` and an
encoded length ``glen = stored_len << 1 | compressed``; a block inside it by its offset and
length in the raw (decompressed) group. The index (``zfsrep.index``) keeps those four numbers
per block version; pack files carry no headers, so their only overhead is compression framing.

Durability: the writer appends with ``os.write`` (readers in this process see the bytes at
once), :meth:`PackWriter.sync` fsyncs every pack written since the last sync, and the index
records the committed end ``(pack_no, pack_len)`` in the same SQLite transaction that makes the
block rows visible. On reopen the writer truncates the pack back to that length and deletes
newer packs, so a crash leaves no garbage that a reader could ever be pointed at.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import zstandard

from zfsrep.errors import CorruptDataError, OSFailure
from zfsrep.records import BLOCK_SIZE

log = logging.getLogger(__name__)

GROUP_BLOCKS = 16
GROUP_RAW_MAX = GROUP_BLOCKS * BLOCK_SIZE
#: Store a group compressed only when that saves at least this fraction of its raw size.
MIN_SAVING = 1 / 32
#: A new pack file is started once the current one is at least this long.
PACK_ROTATE = 1 << 30
PACK_SHIFT = 40
ZSTD_LEVEL = 1
ZERO_BLOCK = bytes(BLOCK_SIZE)


def pack_path(voldir: Path, pack_no: int) -> Path:
    return voldir / "packs" / f"{pack_no:06d}.zpk"


def trim(block: bytes) -> bytes:
    """A block's content without its trailing zero bytes (b"" for an all-zero block: a hole)."""
    if block[-1:] != b"\0":
        return block
    return block.rstrip(b"\0")


_local = threading.local()


def _compress(raw: bytes) -> bytes:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c.compress(raw)


class PackWriter:
    """Appends group blobs to the volume's packs; one writer per volume (the index writer)."""

    def __init__(self, voldir: Path, pack_no: int, pack_len: int) -> None:
        self.dir = voldir / "packs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pack_no = pack_no
        self.pack_len = pack_len
        self._fd = -1
        self._dirty: dict[int, int] = {}  # pack_no -> fd of packs written since sync
        self._new_file = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.rollback(pack_no, pack_len)

    # ---- position, crash cleanup ------------------------------------------------------
    def position(self) -> tuple[int, int]:
        return self.pack_no, self.pack_len

    def rollback(self, pack_no: int, pack_len: int) -> None:
        """Forget everything appended after ``(pack_no, pack_len)``: truncate that pack and
        delete newer ones (what a reopen after a crash, or a refused batch, needs)."""
        self._close_fds()
        for p in self.dir.glob("*.zpk"):
            try:
                n = int(p.stem)
            except ValueError:
                continue
            if n > pack_no:
                log.info("removing uncommitted pack %s", p)
                p.unlink()
        path = pack_path(self.dir.parent, pack_no)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            if size < pack_len:
                os.close(fd)
                raise CorruptDataError(f"pack {path} is {size} bytes, but {pack_len} are "
                                       "committed")
            if size > pack_len:
                log.info("truncating pack %s from %d to %d bytes", path, size, pack_len)
                os.ftruncate(fd, pack_len)
                self._dirty[pack_no] = fd
        except OSError as e:
            raise OSFailure(f"cannot open pack {path}: {e.strerror}") from None
        self._fd = fd
        self.pack_no, self.pack_len = pack_no, pack_len

    # ---- writing ----------------------------------------------------------------------
    def _rotate(self) -> None:
        if self._fd >= 0 and self._fd not in self._dirty.values():
            os.close(self._fd)
        self.pack_no += 1
        self.pack_len = 0
        path = pack_path(self.dir.parent, self.pack_no)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._new_file = True

    def append(self, blob: bytes) -> int:
        """Append one group blob; returns its gloc."""
        if self.pack_len >= PACK_ROTATE:
            self._rotate()
        off = self.pack_len
        view = memoryview(blob)
        while view:
            n = os.pwrite(self._fd, view, off + (len(blob) - len(view)))
            view = view[n:]
        self.pack_len += len(blob)
        self._dirty[self.pack_no] = self._fd
        return self.pack_no << PACK_SHIFT | off

    def encode_groups(self, raws: list[bytes]) -> list[bytes | None]:
        """Compressed form of each raw group, or None where raw storage is better."""
        if len(raws) >= 4:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(1, min(4, os.cpu_count() or 1)),
                    thread_name_prefix="zstd")
            packed = list(self._pool.map(_compress, raws))
        else:
            packed = [_compress(r) for r in raws]
        return [c if len(c) <= len(r) * (1 - MIN_SAVING) else None
                for c, r in zip(packed, raws, strict=True)]

    def sync(self) -> None:
        """Make every appended byte durable (fsync of each pack written since the last sync)."""
        for no, fd in list(self._dirty.items()):
            os.fsync(fd)
            if fd != self._fd:
                os.close(fd)
            del self._dirty[no]
        if self._new_file:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self._new_file = False

    def _close_fds(self) -> None:
        fds = set(self._dirty.values())
        if self._fd >= 0:
            fds.add(self._fd)
        for fd in fds:
            os.close(fd)
        self._dirty.clear()
        self._fd = -1

    def close(self) -> None:
        self._close_fds()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class GroupBuilder:
    """Collects trimmed block contents into groups and writes them to a :class:`PackWriter`.

    :meth:`add` returns a row (a list) whose last four fields ``gloc, glen, boff, blen`` are
    filled in when the group is sealed; the caller inserts rows only after :meth:`seal`.
    """

    def __init__(self, writer: PackWriter) -> None:
        self.writer = writer
        self._parts: list[bytes] = []
        self._rows: list[list] = []
        self._raw_len = 0
        self._sealed_raw: list[tuple[list[bytes], list[list]]] = []

    def add(self, content: bytes, row: list) -> None:
        """Stage non-empty ``content`` (<= one block) for ``row`` (``row[-4:]`` filled later)."""
        if self._raw_len + len(content) > GROUP_RAW_MAX:
            self._close_group()
        row[-2] = self._raw_len
        row[-1] = len(content)
        self._parts.append(content)
        self._rows.append(row)
        self._raw_len += len(content)
        if len(self._parts) >= GROUP_BLOCKS:
            self._close_group()

    def _close_group(self) -> None:
        if self._parts:
            self._sealed_raw.append((self._parts, self._rows))
            self._parts, self._rows, self._raw_len = [], [], 0

    def pending_bytes(self) -> int:
        return self._raw_len + sum(sum(map(len, p)) for p, _ in self._sealed_raw)

    def seal(self) -> int:
        """Compress and append every staged group; returns the bytes appended."""
        self._close_group()
        if not self._sealed_raw:
            return 0
        raws = [b"".join(parts) for parts, _ in self._sealed_raw]
        packed = self.writer.encode_groups(raws)
        total = 0
        for (_, rows), raw, comp in zip(self._sealed_raw, raws, packed, strict=True):
            blob = raw if comp is None else comp
            gloc = self.writer.append(blob)
            glen = len(blob) << 1 | (comp is not None)
            total += len(blob)
            for row in rows:
                row[-4] = gloc
                row[-3] = glen
        self._sealed_raw.clear()
        return total

    def discard(self) -> None:
        self._parts, self._rows, self._raw_len = [], [], 0
        self._sealed_raw.clear()


class PackReader:
    """Reads blocks from packs with a small cache of decompressed groups (one per reader)."""

    def __init__(self, voldir: Path, cache_groups: int = 64) -> None:
        self.voldir = voldir
        self._fds: dict[int, int] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = cache_groups
        self._dctx = zstandard.ZstdDecompressor()
        self.preads = 0  # number of pread calls (tests and the docs' cost argument use it)

    def _fd(self, pack_no: int) -> int:
        fd = self._fds.get(pack_no)
        if fd is None:
            path = pack_path(self.voldir, pack_no)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptDataError(f"pack {path} is missing") from None
            self._fds[pack_no] = fd
        return fd

    def _decode(self, gloc: int, glen: int, blob: bytes) -> bytes:
        if len(blob) != glen >> 1:
            raise CorruptDataError(f"pack group at {gloc:#x} is truncated")
        if glen & 1:
            try:
                return self._dctx.decompress(blob)
            except zstandard.ZstdError as e:
                raise CorruptDataError(f"pack group at {gloc:#x}: {e}") from None
        return blob

    def _remember(self, gloc: int, raw: bytes) -> None:
        self._cache[gloc] = raw
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)

    def group(self, gloc: int, glen: int) -> bytes:
        """The raw content of one group."""
        raw = self._cache.get(gloc)
        if raw is not None:
            self._cache.move_to_end(gloc)
            return raw
        self.preads += 1
        blob = os.pread(self._fd(gloc >> PACK_SHIFT), glen >> 1, gloc & ((1 << PACK_SHIFT) - 1))
        raw = self._decode(gloc, glen, blob)
        self._remember(gloc, raw)
        return raw

    def prefetch(self, groups: list[tuple[int, int]]) -> None:
        """Load the given (gloc, glen) groups with as few preads as possible: groups lying
        back to back in one pack are read with one call."""
        todo = sorted({g for g in groups if g[0] not in self._cache})
        i = 0
        while i < len(todo):
            j = i + 1
            end = todo[i][0] + (todo[i][1] >> 1)
            while (j < len(todo) and todo[j][0] == end
                   and todo[j][0] >> PACK_SHIFT == todo[i][0] >> PACK_SHIFT
                   and end - todo[i][0] < (8 << 20)):
                end += todo[j][1] >> 1
                j += 1
            start = todo[i][0]
            self.preads += 1
            buf = os.pread(self._fd(start >> PACK_SHIFT), end - start,
                           start & ((1 << PACK_SHIFT) - 1))
            mv = memoryview(buf)
            for gloc, glen in todo[i:j]:
                lo = gloc - start
                self._remember(gloc, self._decode(gloc, glen, bytes(mv[lo:lo + (glen >> 1)])))
            i = j

    def block(self, gloc: int, glen: int, boff: int, blen: int) -> bytes:
        """One block's trimmed content (callers pad with zeros)."""
        raw = self.group(gloc, glen)
        if boff + blen > len(raw):
            raise CorruptDataError(f"block outside its group at {gloc:#x}")
        return raw[boff:boff + blen]

    def forget(self) -> None:
        """Drop cached groups (the writer does this when it rolls a batch back)."""
        self._cache.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()
