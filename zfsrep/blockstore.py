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

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported where used: readers of the store need neither)
    import concurrent.futures

    import zstandard

from zfsrep.errors import CorruptDataError, OSFailure
from zfsrep.records import BLOCK_SIZE

log = logging.getLogger(__name__)

GROUP_BLOCKS = 16
GROUP_RAW_MAX = GROUP_BLOCKS * BLOCK_SIZE
#: Store a group compressed only when that saves at least this fraction of its raw size (as
#: ZFS does): data that shrinks by a few percent (fio's default buffers shrink by 3-5%) is
#: not worth zstd's time when written, nor when every read decompresses it.
MIN_SAVING = 1 / 8
SKIP_STREAK = 8
#: After such a streak one group in PROBE_EVERY is tried; every probe that does not compress
#: doubles the gap, up to PROBE_MAX groups (16 MiB of data): a long run of random data costs
#: almost no compression time, and compressible data is noticed again within PROBE_MAX.
PROBE_EVERY = 16
PROBE_MAX = 256
#: A new pack file is started once the current one is at least this long.
PACK_ROTATE = 1 << 30
PACK_SHIFT = 40
PACK_MASK = (1 << PACK_SHIFT) - 1
ZSTD_LEVEL = 1
ZERO_BLOCK = bytes(BLOCK_SIZE)
#: Closed groups handed to a compression worker at once (one thread hop per batch).
ENCODE_BATCH = 8


def pack_path(voldir: Path, pack_no: int) -> Path:
    return voldir / "packs" / f"{pack_no:06d}.zpk"


def trim(block: bytes) -> bytes:
    """A block's content without its trailing zero bytes (b"" for an all-zero block: a hole)."""
    if block[-1:] != b"\0":
        return block
    return block.rstrip(b"\0")


_local = threading.local()


def _compress_all(raws: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Compressed forms of ``raws``. After SKIP_STREAK groups in a row that did not compress
    (random or already compressed data), groups are returned as they are (the caller then
    stores them raw) except for probes, PROBE_EVERY groups apart at first and twice as far
    after every probe that fails, so incompressible data costs almost no compression time
    and compressible data is noticed again."""
    c = getattr(_local, "cctx", None)
    if c is None:
        import zstandard

        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.streak = _local.skipped = 0
        _local.gap = PROBE_EVERY
    out: list[bytes | memoryview] = []
    for raw in raws:
        if _local.streak >= SKIP_STREAK and _local.skipped < _local.gap:
            _local.skipped += 1
            out.append(raw)
            continue
        probe = _local.streak >= SKIP_STREAK
        _local.skipped = 0
        comp = c.compress(raw)
        if len(comp) > len(raw) * (1 - MIN_SAVING):
            _local.streak += 1
            if probe:
                _local.gap = min(PROBE_MAX, _local.gap * 2)
        else:
            _local.streak, _local.gap = 0, PROBE_EVERY
        out.append(comp)
    return out


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
        return self.append_many([blob])[0]

    def append_many(self, blobs: list[bytes | memoryview]) -> list[int]:
        """Append group blobs (few system calls); returns their glocs."""
        glocs = []
        i = 0
        while i < len(blobs):
            if self.pack_len >= PACK_ROTATE:
                self._rotate()
            start = off = self.pack_len
            j = i
            while j < len(blobs) and j - i < 512 and off - start < PACK_ROTATE:
                glocs.append(self.pack_no << PACK_SHIFT | off)
                off += len(blobs[j])
                j += 1
            bufs = [memoryview(b) for b in blobs[i:j]]
            pos = start
            while bufs:
                n = os.pwritev(self._fd, bufs, pos)
                pos += n
                while bufs and n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                if bufs and n:
                    bufs[0] = bufs[0][n:]
            self.pack_len = off
            self._dirty[self.pack_no] = self._fd
            i = j
        return glocs

    def start_encode(self, raws: list[bytes | memoryview]) -> concurrent.futures.Future:
        """Compress groups on a worker thread; the future's result is the list of
        compressed forms (the caller keeps the raw form where that is not smaller)."""
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="zstd")
        return self._pool.submit(_compress_all, raws)

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

    Blocks are grouped per file (so a file read back decompresses each group once); a file's
    group is closed, and its compression started on a worker thread, as soon as it is full.
    At :meth:`seal` the partial groups left over (small files, the last blocks of a batch)
    are packed together, in file order, into shared groups. :meth:`add` takes a row (a list)
    whose last four fields ``gloc, glen, boff, blen`` are filled in by :meth:`seal`; the
    caller inserts rows only after that.
    """

    def __init__(self, writer: PackWriter) -> None:
        self.writer = writer
        self._open: dict[int, list] = {}  # ident -> [parts, rows, raw_len]
        self._closed: list[tuple[list[list], bytes | memoryview]] = []
        # closed groups not handed to a compression job yet
        self._unsent: list[bytes | memoryview] = []
        self._jobs: list[tuple[int, concurrent.futures.Future]] = []

    def add(self, ident: int, content: bytes, row: list) -> None:
        """Stage non-empty ``content`` (at most one block) for ``row``."""
        g = self._open.get(ident)
        if g is None:
            g = self._open[ident] = [[], [], 0]
        elif g[2] + len(content) > GROUP_RAW_MAX:
            self._close(g)
        row[-2] = g[2]
        row[-1] = len(content)
        g[0].append(content)
        g[1].append(row)
        g[2] += len(content)
        if len(g[0]) >= GROUP_BLOCKS:
            self._close(g)

    def add_run(self, ident: int, contents: list[bytes], rows: list[list]) -> None:
        """:meth:`add` for many blocks of one file; empty contents (holes) are skipped."""
        g = self._open.get(ident)
        if g is None:
            g = self._open[ident] = [[], [], 0]
        parts, grows, raw_len = g
        for content, row in zip(contents, rows, strict=True):
            n = len(content)
            if not n:
                continue
            if raw_len + n > GROUP_RAW_MAX:
                g[2] = raw_len
                self._close(g)
                parts, grows, raw_len = g
            row[5] = raw_len
            row[6] = n
            parts.append(content)
            grows.append(row)
            raw_len += n
            if len(parts) >= GROUP_BLOCKS:
                g[2] = raw_len
                self._close(g)
                parts, grows, raw_len = g
        g[2] = raw_len

    def add_span(self, ident: int, span: memoryview, contents: list, rows: list[list]) -> None:
        """:meth:`add_run` for consecutive blocks that are the slices of ``span``: when none
        is trimmed, whole groups are cut from ``span`` without copying it."""
        if len(contents) < GROUP_BLOCKS or any(len(c) != BLOCK_SIZE for c in contents):
            self.add_run(ident, contents, rows)
            return
        g = self._open.get(ident)
        head = 0
        if g is not None and g[0]:  # fill the file's open group first
            head = GROUP_BLOCKS - len(g[0])
            self.add_run(ident, contents[:head], rows[:head])
        n = len(contents) - (len(contents) - head) % GROUP_BLOCKS
        for i in range(head, n, GROUP_BLOCKS):
            grows = rows[i:i + GROUP_BLOCKS]
            for k, row in enumerate(grows):
                row[5] = k * BLOCK_SIZE
                row[6] = BLOCK_SIZE
            self._closed.append((grows, span[i * BLOCK_SIZE:(i + GROUP_BLOCKS) * BLOCK_SIZE]))
            self._unsent.append(self._closed[-1][1])
            if len(self._unsent) >= ENCODE_BATCH:
                self._send()
        if n < len(contents):
            self.add_run(ident, contents[n:], rows[n:])

    def _close(self, g: list) -> None:
        raw = b"".join(g[0])
        self._closed.append((g[1], raw))
        self._unsent.append(raw)
        if len(self._unsent) >= ENCODE_BATCH:
            self._send()
        g[0], g[1], g[2] = [], [], 0

    def _send(self) -> None:
        if self._unsent:
            self._jobs.append((len(self._unsent), self.writer.start_encode(self._unsent)))
            self._unsent = []

    def seal(self) -> int:
        """Compress and append every staged group; returns the bytes appended."""
        shared: list = [[], [], 0]
        for ident in sorted(self._open):
            parts, rows, _ = self._open[ident]
            for content, row in zip(parts, rows, strict=True):
                if shared[2] + len(content) > GROUP_RAW_MAX or len(shared[0]) >= GROUP_BLOCKS:
                    self._close(shared)
                row[-2] = shared[2]
                shared[0].append(content)
                shared[1].append(row)
                shared[2] += len(content)
        self._open.clear()
        if shared[0]:
            self._close(shared)
        self._send()
        packed: list[bytes | memoryview] = []
        for _, fut in self._jobs:
            packed += fut.result()
        self._jobs.clear()
        blobs: list[bytes | memoryview] = []
        flags: list[bool] = []
        for (_, raw), comp in zip(self._closed, packed, strict=True):
            small = len(comp) <= len(raw) * (1 - MIN_SAVING)
            blobs.append(comp if small else raw)
            flags.append(small)
        glocs = self.writer.append_many(blobs)
        for (rows, _), blob, compressed, gloc in zip(self._closed, blobs, flags, glocs,
                                                         strict=True):
            glen = len(blob) << 1 | compressed
            for row in rows:
                row[-4] = gloc
                row[-3] = glen
        self._closed.clear()
        return sum(map(len, blobs))

    def discard(self) -> None:
        for _, fut in self._jobs:
            fut.cancel()
        self._jobs.clear()
        self._unsent = []
        self._open.clear()
        self._closed.clear()


class PackReader:
    """Reads blocks from packs with a small cache of decompressed groups (one per reader)."""

    def __init__(self, voldir: Path, cache_groups: int = 64) -> None:
        self.voldir = voldir
        self._fds: dict[int, int] = {}
        #: read mostly front to back (a whole-tree copy): ask the kernel for more readahead
        self.sequential = False
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = cache_groups
        self._dctx: zstandard.ZstdDecompressor | None = None  # made for the first compressed
        self.preads = 0  # number of pread calls (tests and the docs' cost argument use it)

    def fd(self, pack_no: int) -> int:
        """The reader's descriptor of pack ``pack_no`` (it stays the reader's)."""
        return self._fd(pack_no)

    def _fd(self, pack_no: int) -> int:
        fd = self._fds.get(pack_no)
        if fd is None:
            path = pack_path(self.voldir, pack_no)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptDataError(f"pack {path} is missing") from None
            self._fds[pack_no] = fd
            if self.sequential:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _decode(self, gloc: int, glen: int, blob: bytes) -> bytes:
        if len(blob) != glen >> 1:
            raise CorruptDataError(f"pack group at {gloc:#x} is truncated")
        if glen & 1:
            import zstandard

            if self._dctx is None:
                self._dctx = zstandard.ZstdDecompressor()
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
