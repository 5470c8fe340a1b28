"""A local spool directory of frame files: the first frame sink, and a reader of what it holds.

Layout (see docs/spool-format.md)::

    SPOOL/volume.json                       identity of the volume the frames belong to
    SPOOL/segments/<first seq, 20 digits>.zfr   frames back to back, in sequence order

A segment is closed (fsynced) when it reaches ``segment_bytes``; the open one is fsynced on
:meth:`SpoolWriter.sync` and on close. Opening a spool for writing checks the last segment and
cuts a torn or corrupt tail (a crash in the middle of a write), logging what it cut.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from zfsrep import directio, frames
from zfsrep.errors import CorruptDataError, FrameError, NotFoundError, StateError
from zfsrep.syscalls import lower_thread_priority, pwritev_all, try_lock

log = logging.getLogger(__name__)

FORMAT = 1
#: Present when capture stopped (the spool could not be written): the stream ends at
#: ``last_seq`` and does not describe the directory after that.
INCOMPLETE = "INCOMPLETE"
#: State of the initial sync (the first recording of a non-empty directory):
#: {"state": "running"} while it runs, {"state": "done", "end_seq": N} after.
INITIAL_SYNC = "initial-sync.json"
#: {"first_seq": N}: records before N were acknowledged by the journal server and trimmed.
TRIMMED = "trimmed.json"
#: The mount daemon's run state while it writes the spool (:class:`RunState`).
RUN_STATE = "mountd.run"
#: Locked (flock) by the one writer of the spool, which writes its pid there.
LOCK = "lock"
CLOSING_MAX = 4
#: An open segment whose frames were all acknowledged is closed at the next frame once it
#: holds this much, so a replicated spool does not keep a large acknowledged segment.
ROTATE_ACKED_BYTES = 1 << 20
META = "volume.json"
SEGMENTS = "segments"
SUFFIX = ".zfr"


@dataclass(frozen=True)
class VolumeIdentity:
    """What a spool's frames belong to: the backing root's inode number identifies it."""

    source: str
    root_ident: int
    block_size: int
    created: str = ""
    format: int = FORMAT
    #: Names this stream for the journal server (a new spool is a new stream).
    spool_id: str = ""

    @property
    def stream_id(self) -> str:
        return self.spool_id or f"{self.root_ident}@{self.created}"


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SUFFIX}"


def _segment_first_seq(path: Path) -> int:
    return int(path.name[: -len(SUFFIX)])


def segment_paths(spool: Path) -> list[Path]:
    seg_dir = spool / SEGMENTS
    if not seg_dir.is_dir():
        return []
    return sorted(p for p in seg_dir.iterdir() if p.name.endswith(SUFFIX))


def read_identity(spool: Path) -> VolumeIdentity:
    meta = spool / META
    try:
        data = json.loads(meta.read_text())
        ident = VolumeIdentity(**data)
    except FileNotFoundError:
        raise NotFoundError(f"{spool} is not a zfsrep spool (no {META})") from None
    except (ValueError, TypeError) as e:
        raise CorruptDataError(f"{meta}: unreadable volume identity ({e})") from None
    if ident.format != FORMAT:
        raise CorruptDataError(f"{meta}: unsupported spool format {ident.format}")
    return ident


def read_incomplete(spool: Path) -> dict | None:
    """The INCOMPLETE marker's content ({last_seq, reason, time}), or None."""
    try:
        return json.loads((spool / INCOMPLETE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"last_seq": None, "reason": "unreadable marker", "time": None}


def check_complete(spool: Path) -> None:
    """Refuse a spool whose capture stopped (StateError, exit code 4)."""
    marker = read_incomplete(spool)
    if marker is not None:
        raise StateError(f"spool {spool} is incomplete: capture stopped after record "
                         f"{marker.get('last_seq')} ({marker.get('reason')}); it does not "
                         "describe the directory after that. Protect again with a new spool.")


class RunState:
    """What a running mount daemon has captured, kept in a shared mapping of
    ``SPOOL/mountd.run`` so that it outlives the daemon: how many records the C fast path
    queued (counted by the fast path itself before it answers each request), how many of them
    the capture stream has numbered, the last sequence number given out, whether a mutating
    request is being served (by the fast path, and how many by Python: from before the
    backing directory changes until the change is recorded), and whether the daemon stopped
    in order (everything captured in the spool). After a crash or ``kill -9`` the page cache
    still holds the file, and :func:`records_lost` tells from it whether the directory may
    hold changes the spool lacks.

    It also says which files those changes are in, so that a restart can record them again
    (:func:`dirty_idents`) instead of refusing the spool: a table of idents, each with the
    number of the last fast-path record that changed it (counted as the fast path queues
    them) and the sequence number of the last Python record that did (data records: WRITE,
    TRUNCATE, SETATTR, FALLOCATE; marked by the fast path before it changes the file, by the
    capture stream as it numbers a record), beside how many fast-path records and which
    sequence numbers are in frames written to the spool, and the sequence number of the last
    record of any other kind (a lost one of those, a name or xattr change, cannot be
    repaired by recording file contents). (Native byte order: the fast path writes its part
    as uint64_t.)"""

    # magic, pid, clean, queued by the fast path, numbered of them, last seq, fast path busy,
    # Python handlers busy; then fast-path records written, last seq written, last seq of a
    # record of another kind, table overflow; the table's slots from _SLOTS
    _FMT = "=8sQQQQQQQQQQQ"
    _MAGIC = b"ZFSRUN\x00\x02"
    _CLEAN, _QUEUED, _TAKEN, _NUMBERED, _PY_BUSY = 16, 24, 32, 40, 56
    _DIRTY, _OTHER, _OVERFLOW, _SLOTS = 64, 80, 88, 128
    SLOTS = 512  # (native/fusehook.h ZF_DIRTY_SLOTS)
    SIZE = 16384

    def __init__(self, spool: Path, numbered: int) -> None:
        import mmap
        import struct

        self._pack = struct.Struct("=Q").pack_into
        self._pack2 = struct.Struct("=QQ").pack_into
        self._taken = 0
        self._busy = 0
        path = spool / RUN_STATE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            # written, not just sized: a page of a sparse file would be allocated when first
            # stored to, and on a full file system that store is a SIGBUS
            os.write(fd, bytes(self.SIZE))
            self._map: mmap.mmap | None = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)
        struct.pack_into(self._FMT, self._map, 0, self._MAGIC, os.getpid(), 0, 0, 0, numbered,
                         0, 0, 0, numbered, 0, 0)
        #: the fast path's part (queued, numbered, last seq, busy), for
        #: SessionHook.set_run_counter
        self.counter = memoryview(self._map)[self._QUEUED:self._PY_BUSY]
        #: the table (from the fast-path records written on), for SessionHook.set_dirty_table
        self.dirty = memoryview(self._map)[self._DIRTY:self._SLOTS + 24 * self.SLOTS]

    def numbered(self, seq: int, fast: int = 0) -> None:
        """The capture stream gave out sequence numbers through ``seq``, ``fast`` of them to
        records the fast path queued (before the requests are answered). The last seq is
        stored first: a crash between the two stores then still shows the loss."""
        if self._map is not None:
            self._pack(self._map, self._NUMBERED, seq)
            if fast:
                self._taken += fast
                self._pack(self._map, self._TAKEN, self._taken)

    def written(self, fast: int, seq: int) -> None:
        """Frames through record ``seq``, holding the first ``fast`` fast-path records, are
        in the spool (table slots marked no later are free again)."""
        if self._map is not None:
            self._pack2(self._map, self._DIRTY, fast, seq)

    def other_change(self, seq: int) -> None:
        """Record ``seq`` changes something a file's content and attributes do not hold."""
        if self._map is not None:
            self._pack(self._map, self._OTHER, seq)

    def overflow(self) -> None:
        """A changed file could not be put in the table."""
        if self._map is not None:
            self._pack(self._map, self._OVERFLOW, 1)

    def mutating(self, delta: int) -> None:
        """A Python handler that changes the backing directory starts (+1) or has recorded
        its change, or failed (-1)."""
        if self._map is not None:
            self._busy += delta
            self._pack(self._map, self._PY_BUSY, self._busy)

    def close(self, clean: bool) -> None:
        """Stop recording (the fast path must have stopped counting); ``clean``: everything
        captured is in the spool."""
        if self._map is None:
            return
        if clean:
            self._pack(self._map, self._CLEAN, 1)
        self.counter.release()
        self.dirty.release()
        self._map.close()
        self._map = None

    @classmethod
    def read(cls, spool: Path) -> dict | None:
        """The state a daemon left in ``spool`` (None if there is none or it is not one)."""
        import struct

        try:
            raw = (spool / RUN_STATE).read_bytes()
            (magic, pid, clean, queued, taken, numbered, fast_busy, py_busy, fast_written,
             _seq_written, other, overflow) = struct.unpack_from(cls._FMT, raw)[:12]
        except (FileNotFoundError, struct.error):
            return None
        if magic == b"ZFSRUN\x00\x01":  # (an older daemon's: no table)
            fast_written, other, overflow, slots = 0, 0, 1, []
        elif magic != cls._MAGIC or len(raw) < cls._SLOTS + 24 * cls.SLOTS:
            return None
        else:
            words = struct.unpack_from(f"={3 * cls.SLOTS}Q", raw, cls._SLOTS)
            slots = [words[i:i + 3] for i in range(0, len(words), 3) if words[i]]
        return {"pid": pid, "clean": bool(clean), "queued": queued, "taken": taken,
                "numbered": numbered, "busy": fast_busy + py_busy, "py_busy": py_busy,
                "fast_written": fast_written, "other": other, "overflow": bool(overflow),
                "slots": slots}


def after_crash(state: dict | None, spooled_seq: int
                ) -> tuple[str | None, set[int] | None, str]:
    """What a spool whose daemon left ``state`` (:meth:`RunState.read`) needs, for a spool
    holding records through ``spooled_seq``: (why records are missing or None, the files to
    record again or None if that cannot repair it, why not). Nothing missing: (None, set(),
    "")."""
    lost = records_lost(state, spooled_seq)
    if lost is None or state is None:
        return None, set(), ""
    idents, why_not = dirty_idents(state, spooled_seq)
    return lost, idents, why_not


def dirty_idents(state: dict, spooled_seq: int) -> tuple[set[int] | None, str]:
    """The files (idents) whose changes a daemon that died lost, from its
    :meth:`RunState.read`, for a spool holding records through ``spooled_seq``: recording
    their current content and attributes again repairs the spool. (None, why) when that is
    not enough: a lost change of another kind (names, xattrs), a Python handler stopped in
    the middle of a change, or more changed files than the table holds."""
    if state["overflow"]:
        return None, "more files had unwritten changes than the daemon could track"
    if state["py_busy"]:
        return None, "it stopped in the middle of a change to names or attributes"
    if state["other"] > spooled_seq:
        return None, (f"record {state['other']}, lost, changed names or extended "
                      "attributes")
    fast = state["fast_written"]
    return {ident for ident, fast_mark, seq_mark in state["slots"]
            if fast_mark > fast or seq_mark > spooled_seq}, ""


def records_lost(state: dict | None, spooled_seq: int) -> str | None:
    """Why records a previous daemon captured are missing from a spool that holds records
    through ``spooled_seq`` (None: nothing is missing), from its :meth:`RunState.read`."""
    if state is None or state["clean"]:
        return None
    missing = []
    queued = state["queued"] - state["taken"]
    if queued > 0:
        missing.append(f"{queued} write{'s' if queued > 1 else ''} the fast path had answered "
                       f"{'were' if queued > 1 else 'was'} still in its queue")
    if state["numbered"] > spooled_seq:
        missing.append(f"records {spooled_seq + 1}..{state['numbered']} were not written")
    if state.get("busy"):
        missing.append("a change it was making may not have been recorded")
    if not missing:
        return None
    return (f"the mount daemon (pid {state['pid']}) stopped without writing everything it "
            f"had captured (killed or crashed): {' and '.join(missing)}")


def _scan_segment(path: Path) -> tuple[int, int | None, str | None]:
    """(offset after the last valid frame, its last seq, why the rest is invalid or None)."""
    last_seq = None
    good = 0
    with open(path, "rb") as f:
        while True:
            try:
                item = frames.read_frame(f, padded=True)
            except FrameError as e:
                return good, last_seq, str(e)
            if item is None:
                return good, last_seq, None
            header, _records = item
            if last_seq is not None and header.first_seq != last_seq + 1:
                return good, last_seq, f"sequence gap: {last_seq} then {header.first_seq}"
            last_seq = header.last_seq
            good = f.tell()


#: Segments are written with O_DIRECT where the file system takes it (zfsrep.directio); a
#: segment then ends with up to directio.ALIGN - 1 zero bytes after its last frame (read as
#: its end: docs/spool-format.md).
#: False: segments are always written through the page cache (ZFSREP_SPOOL_DIRECT=0).
DIRECT = os.environ.get("ZFSREP_SPOOL_DIRECT", "1") != "0"


class SpoolWriter:
    """Appends frames to a spool directory (a :class:`zfsrep.capture.FrameSink`).

    Where the file system takes it and ``direct`` is on, segments are written with
    O_DIRECT: each frame is copied (hashed and checksummed on the way) into an aligned
    buffer after the bytes of the segment's last partial block, padded with zeros to a
    whole block and written in one call. Buffered, the data is copied into the page cache
    and written back from there, which on a virtual machine costs about a CPU-second per
    GiB, as much as the application's own write; the copy into the buffer costs a tenth of
    that."""

    def __init__(self, spool: Path, identity: VolumeIdentity, *,
                 segment_bytes: int = 64 << 20, limit: int | None = None) -> None:
        self.path = spool
        self.identity = identity
        self._segment_bytes = segment_bytes
        self._fd: int | None = None
        self._size = 0
        #: Write new segments with O_DIRECT where the file system takes it. A replication
        #: link sends recent frames from memory (keep_recent); what falls further behind it
        #: reads back from the disk, at background CPU priority.
        self.direct = DIRECT
        self._direct = False  # the segment is written with O_DIRECT
        self._appender = directio.DirectAppender()
        self.next_seq = 1
        #: Bytes of segments on disk; writing past ``limit`` fails with ENOSPC (capture then
        #: stops, the application goes on: see docs/spool-format.md).
        self.limit = limit
        self.bytes = 0
        self._bytes_lock = threading.Lock()
        self._rotate_soon = False  # everything written was acknowledged: start a new segment
        #: Bytes of recently written frames kept in memory for the replication link (0: none).
        self.keep_recent = 0
        self._recent: deque[tuple[int, int, list[memoryview], int]] = deque()
        self._recent_bytes = 0
        # Full segments are fsynced and closed (and the directory entry of the next one made
        # durable) by this worker while frames go on into the next segment: the writer does
        # not stall for a 64 MiB fsync unless CLOSING_MAX segments are still waiting for the
        # disk. close() waits for all of them.
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-fsync",
                                          initializer=_background)
        self._closing: deque[Future[None]] = deque()
        self._lock = -1
        try:
            self._open()
        except BaseException:
            self._closer.shutdown(wait=False)
            raise

    def _open(self) -> None:
        spool = self.path
        spool.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_spool(spool)
        try:
            self._open_locked()
        except BaseException:
            os.close(self._lock)
            raise

    def _open_locked(self) -> None:
        spool = self.path
        check_complete(spool)
        (spool / SEGMENTS).mkdir(parents=True, exist_ok=True)
        meta = spool / META
        if meta.exists():
            existing = read_identity(spool)
            if existing.root_ident != self.identity.root_ident:
                raise StateError(
                    f"spool {spool} belongs to {existing.source} (root inode "
                    f"{existing.root_ident}), not to {self.identity.source}")
            self.identity = existing
        else:
            ident = asdict(self.identity)
            ident["created"] = datetime.now(UTC).isoformat(timespec="seconds")
            ident["spool_id"] = uuid.uuid4().hex
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(ident, indent=1) + "\n")
            os.replace(tmp, meta)
            self.identity = VolumeIdentity(**ident)
            _fsync_dir(spool)
        segs = segment_paths(spool)
        while segs:
            good, last_seq, problem = _scan_segment(segs[-1])
            if problem is not None:
                log.warning("spool %s: cutting invalid tail of %s at byte %d: %s",
                            spool, segs[-1].name, good, problem)
                os.truncate(segs[-1], good)
            if last_seq is None:
                segs.pop().unlink()  # empty after the cut: a fresh segment replaces it
                continue
            self.next_seq = last_seq + 1
            break
        if not segs:  # every segment was trimmed, or the last one held only a torn frame
            try:
                self.next_seq = int(json.loads((spool / TRIMMED).read_text())["first_seq"])
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CorruptDataError(f"{spool / TRIMMED}: unreadable ({e})") from None
        self.bytes = sum(p.stat().st_size for p in segment_paths(spool))

    def _rotate(self, first_seq: int) -> None:
        while len(self._closing) >= CLOSING_MAX or (self._closing and self._closing[0].done()):
            self._closing.popleft().result()
        old, self._fd = self._fd, None
        path = self.path / SEGMENTS / _segment_name(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._direct = self.direct and directio.try_direct(self._fd)
        self._appender.reset()
        self._closing.append(self._closer.submit(_retire, old, self.path / SEGMENTS))

    #: :meth:`write_frame` takes :class:`frames.PendingFrame` (the capture pipeline asks).
    accepts_pending = True

    def write_frame(self, frame: bytes | Sequence[bytes | memoryview] | frames.PendingFrame,
                    first_seq: int, last_seq: int) -> None:
        """Append one frame, given as bytes, as buffers written back to back, or as a
        :class:`frames.PendingFrame` (its digests computed as it is written)."""
        if first_seq != self.next_seq:
            raise StateError(f"spool {self.path}: frame starts at {first_seq}, "
                             f"expected {self.next_seq}")
        if self._fd is None or self._size >= self._segment_bytes or (
                self._rotate_soon and self._size >= ROTATE_ACKED_BYTES):
            self._rotate_soon = False
            self._rotate(first_seq)
        parts: list[memoryview] = []
        if isinstance(frame, frames.PendingFrame):
            size = frame.size
        else:
            parts = [memoryview(frame)] if isinstance(frame, bytes) else [
                memoryview(p) for p in frame]
            size = sum(p.nbytes for p in parts)
        if self.limit is not None and self.bytes + size > self.limit:
            raise OSError(errno.ENOSPC, f"spool limit of {self.limit >> 20} MiB reached "
                          "(the journal server has not acknowledged enough)")
        assert self._fd is not None
        if self._direct:
            parts = self._write_direct(frame, parts, size)
        elif isinstance(frame, frames.PendingFrame):
            parts = [memoryview(p) for p in frame.write_at(self._fd, self._size)]
        else:
            pwritev_all(self._fd, self._size, parts)
        self._size += size
        with self._bytes_lock:
            self.bytes += size
            if self.keep_recent:
                # the replication link sends recent frames from here, not from the disk
                self._recent.append((first_seq, last_seq, parts, size))
                self._recent_bytes += size
                while self._recent_bytes > self.keep_recent and len(self._recent) > 1:
                    self._recent_bytes -= self._recent.popleft()[3]
        self.next_seq = last_seq + 1

    def _write_direct(self, frame: object, parts: list[memoryview], size: int
                      ) -> list[memoryview]:
        """Write one frame at the end of an O_DIRECT segment (the class docstring); the
        frame as buffers."""
        assert self._fd is not None
        slot = self._appender.slot(size)
        if isinstance(frame, frames.PendingFrame):
            parts = [memoryview(p) for p in frame.stage(slot)]
        else:
            at = 0
            for p in parts:
                slot[at:at + p.nbytes] = p.cast("B")
                at += p.nbytes
        fd = self._fd

        def write_at(block: memoryview, offset: int) -> None:
            if os.pwrite(fd, block, offset) != len(block):
                raise OSError(errno.EIO, f"short write to spool segment in {self.path}")

        if not self._appender.write(fd, write_at, self._size, f"spool {self.path}"):
            self._direct = self.direct = False
        return parts

    def recent(self, start_seq: int, upto_seq: int, max_bytes: int
               ) -> list[tuple[int, int, list[memoryview]]] | None:
        """Frames from ``start_seq`` through at most ``upto_seq`` still held in memory (as
        written: lists of buffers), about ``max_bytes``; None if ``start_seq`` is no longer
        (or not yet) there."""
        with self._bytes_lock:
            if not self._recent or not self._recent[0][0] <= start_seq <= self._recent[-1][0]:
                return None
            out: list[tuple[int, int, list[memoryview]]] = []
            total = 0
            for first, last, parts, size in self._recent:
                if first < start_seq:
                    continue
                if first > upto_seq or (out and total >= max_bytes):
                    break
                out.append((first, last, parts))
                total += size
            return out if out and out[0][0] == start_seq else None

    def first_seq(self) -> int:
        """The first record the spool still holds (1 unless acknowledged segments were
        trimmed; the next record to write when it holds none)."""
        segs = segment_paths(self.path)
        return _segment_first_seq(segs[0]) if segs else self.next_seq

    def trim(self, upto_seq: int) -> int:
        """Delete segments whose records are all <= ``upto_seq`` (acknowledged by the
        journal server); the newest segment always stays. Returns the bytes freed."""
        segs = segment_paths(self.path)
        freed = 0
        for seg, nxt in zip(segs, segs[1:], strict=False):
            if _segment_first_seq(nxt) - 1 > upto_seq:
                break
            # say so first: a spool that lacks its first records was trimmed, not damaged
            (self.path / TRIMMED).write_text(json.dumps({"first_seq": _segment_first_seq(nxt)}))
            size = seg.stat().st_size
            seg.unlink()
            freed += size
        with self._bytes_lock:
            self.bytes -= freed
        if upto_seq >= self.next_seq - 1:
            self._rotate_soon = True  # so the acknowledged open segment can go next time
        return freed

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def mark_incomplete(self, last_seq: int, reason: str) -> None:
        """Record that the stream stops at ``last_seq`` (written small, so it has the best
        chance on a full disk)."""
        marker = json.dumps({"last_seq": last_seq, "reason": reason,
                             "time": datetime.now(UTC).isoformat(timespec="seconds")})
        fd = os.open(self.path / INCOMPLETE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, marker.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            _fsync_close(self._fd)
            self._fd = None
        self._appender.close()
        while self._closing:
            self._closing.popleft().result()
        self._closer.shutdown(wait=True)
        _fsync_dir(self.path / SEGMENTS)
        if self._lock >= 0:
            os.close(self._lock)  # (the lock goes with the descriptor)
            self._lock = -1


def _lock_spool(spool: Path) -> int:
    """An exclusive lock on ``SPOOL/lock`` for as long as the descriptor returned is open:
    two writers would interleave frames in the same segment. StateError if another process
    (or another writer in this one) holds it; the file names the holder's pid."""
    fd, holder = try_lock(spool / LOCK)
    if fd is None:
        raise StateError(f"spool {spool} is in use by another mount daemon"
                         f"{f' (pid {holder})' if holder else ''}: one spool, one mount")
    return fd


def _background() -> None:
    """The fsync worker only waits for the disk: at normal priority each of its wakeups
    preempts the application or the mount's request path."""
    lower_thread_priority(19)


def _retire(fd: int | None, segments: Path) -> None:
    """fsync and close a full segment, and make the new segment's name durable."""
    if fd is not None:
        _fsync_close(fd)
    _fsync_dir(segments)


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_spool_frames(spool: Path, *, allow_trimmed: bool = False
                      ) -> Iterator[tuple[frames.FrameHeader, list[list]]]:
    """Every frame in the spool in sequence order; refuses gaps and corrupt frames, and a
    spool whose first records were trimmed after the journal server acknowledged them
    (unless ``allow_trimmed``, for inspection)."""
    segs = segment_paths(spool)
    expected = _segment_first_seq(segs[0]) if segs else 1
    if expected != 1:
        try:
            trimmed = json.loads((spool / TRIMMED).read_text()).get("first_seq", 1)
        except (OSError, ValueError, AttributeError):
            trimmed = 1
        if trimmed < expected:
            raise CorruptDataError(f"{spool}: records 1..{expected - 1} are missing")
        if not allow_trimmed:
            raise StateError(f"spool {spool}: records 1..{expected - 1} were acknowledged by "
                             "the journal server and trimmed; restore from the server instead")
    for path in segs:
        with open(path, "rb") as f:
            while True:
                try:
                    item = frames.read_frame(f, padded=True)
                except FrameError as e:
                    raise CorruptDataError(f"{path}: {e}") from None
                if item is None:
                    break
                header, records = item
                if header.first_seq != expected:
                    raise CorruptDataError(
                        f"{path}: records {expected}..{header.first_seq - 1} are missing")
                expected = header.last_seq + 1
                yield header, records


def iter_records(spool: Path, *, allow_incomplete: bool = False) -> Iterator[list]:
    """Every record in the spool in sequence order; refuses an incomplete spool unless
    ``allow_incomplete`` (for inspection)."""
    if not allow_incomplete:
        check_complete(spool)
    for _header, records in iter_spool_frames(spool, allow_trimmed=allow_incomplete):
        yield from records


def spool_stats(spool: Path) -> dict[str, int]:
    """Counts for ``zfsrep spool show``: segments, frames, records, bytes, sequence range."""
    segs = segment_paths(spool)
    out = {"segments": len(segs), "frames": 0, "records": 0,
           "bytes": sum(p.stat().st_size for p in segs),
           "first_seq": 0, "last_seq": 0, "raw_bytes": 0}
    for header, _records in iter_spool_frames(spool, allow_trimmed=True):
        out["frames"] += 1
        out["records"] += header.record_count
        out["raw_bytes"] += header.raw_len
        out["first_seq"] = out["first_seq"] or header.first_seq
        out["last_seq"] = header.last_seq
    return out


def read_initial_sync(spool: Path) -> dict | None:
    try:
        data = json.loads((spool / INITIAL_SYNC).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise CorruptDataError(f"{spool / INITIAL_SYNC}: unreadable") from None
    return data if isinstance(data, dict) else None


def write_initial_sync(spool: Path, state: dict) -> None:
    tmp = spool / (INITIAL_SYNC + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, spool / INITIAL_SYNC)
    _fsync_dir(spool)


class SpoolReader:
    """Reads whole frames, as stored, from a spool that is still being written (for the
    replication link). Only frames the writer has finished (seq < its ``next_seq``) are read,
    so a frame being written is never seen half-way.

    Frames of READ_DIRECT_MIN bytes or more are read with O_DIRECT (``direct``, where the
    file system takes it) into the reader's aligned buffer, as the writer wrote them: no page
    cache to fill and free again for data that is read once. (The link reads back what it
    did not send from memory, about 1 GiB a GiB while the journal server is in the
    background: through the page cache that cost the application 5% of its write rate.)
    Such a frame comes as a memoryview that is valid until the next :meth:`read` or
    :meth:`close`. Without O_DIRECT it comes as a :class:`FileRange` for ``sendfile``."""

    def __init__(self, spool: Path, *, direct: bool = DIRECT) -> None:
        self.path = spool
        self._f: BinaryIO | None = None
        self._next = 0
        self.direct = direct
        self._dfd = -1  # the current segment opened with O_DIRECT (-1: not, or not possible)
        self._dname = ""
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._used = 0  # bytes of the buffer the frames of this read() occupy

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._close_direct()
        if self._view is not None:
            self._view.release()  # (frames handed out keep the memory until they go)
            self._view = None
            self._buf = None

    def _close_direct(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
        self._dfd, self._dname = -1, ""

    def _open_at(self, seq: int) -> None:
        self.close()
        segs = [p for p in segment_paths(self.path) if _segment_first_seq(p) <= seq]
        if not segs:
            raise CorruptDataError(f"spool {self.path}: record {seq} is no longer in the spool")
        f = open(segs[-1], "rb", buffering=0)  # noqa: SIM115 (kept open across calls; see read)
        while True:
            head = f.read(frames.HEADER_SIZE)
            if len(head) < frames.HEADER_SIZE or frames.padding_to_end(f, head):
                f.close()
                raise CorruptDataError(f"spool {self.path}: record {seq} not found in "
                                       f"{segs[-1].name}")
            header = frames.parse_header(head)
            if header.first_seq == seq:
                f.seek(-frames.HEADER_SIZE, os.SEEK_CUR)
                break
            if header.first_seq > seq:
                f.close()
                raise CorruptDataError(f"spool {self.path}: record {seq} is inside a frame "
                                       f"that starts at {header.first_seq}")
            f.seek(header.comp_len, os.SEEK_CUR)
        self._f, self._next = f, seq

    def unread_bytes(self) -> int:
        """Bytes of segments after the read position (for lag reports)."""
        f = self._f
        total = 0
        try:
            pos_name, pos = (Path(f.name).name, f.tell()) if f is not None else ("", 0)
            for seg in segment_paths(self.path):
                if seg.name > pos_name:
                    total += seg.stat().st_size
                elif seg.name == pos_name:
                    total += seg.stat().st_size - pos
        except (OSError, ValueError):
            pass
        return total

    def read(self, start_seq: int, upto_seq: int, max_bytes: int
             ) -> list[tuple[int, int, bytes | memoryview | FileRange]]:
        """Frames (first_seq, last_seq, frame) from ``start_seq`` through at most
        ``upto_seq``, at least one and about ``max_bytes`` in all. A frame of READ_DIRECT_MIN
        bytes or more comes as a view of the reader's buffer (valid until the next call), or
        where O_DIRECT is not possible, unread, as a :class:`FileRange` (its own descriptor
        of the segment, which the caller closes) for the kernel to send from the page cache.

        The segments are read unbuffered: the writer appends while they are read, and bytes
        read ahead past the last frame written (a payload whose header is not yet written,
        or an O_DIRECT segment's padding) must not be taken for what is there later."""
        out: list[tuple[int, int, bytes | memoryview | FileRange]] = []
        self._used = 0  # (the frames of the last read() were sent)
        if start_seq > upto_seq:
            return out
        if self._f is None or self._next != start_seq:
            self._open_at(start_seq)
        total = 0
        try:
            while self._next <= upto_seq and (not out or total < max_bytes):
                f = self._f
                assert f is not None
                head = f.read(frames.HEADER_SIZE)
                if not head or frames.padding_to_end(f, head):  # end of this segment:
                    # the next one starts at the next seq
                    nxt = self.path / SEGMENTS / _segment_name(self._next)
                    f.close()
                    try:
                        self._f = open(nxt, "rb", buffering=0)  # noqa: SIM115
                    except FileNotFoundError:
                        self._f = None
                        raise CorruptDataError(f"spool {self.path}: segment {nxt.name} is "
                                               "missing") from None
                    continue
                header = frames.parse_header(head)
                if header.first_seq != self._next:
                    raise CorruptDataError(f"spool {self.path}: expected record {self._next},"
                                           f" found a frame starting at {header.first_seq}")
                out.append((header.first_seq, header.last_seq, self._body(f, head, header)))
                total += header.frame_len
                self._next = header.last_seq + 1
        except BaseException:
            close_frames(out)
            raise
        return out


    def _body(self, f: BinaryIO, head: bytes, header: frames.FrameHeader
              ) -> bytes | memoryview | FileRange:
        """The frame whose header ``f`` was just read: as bytes, a view of the buffer, or
        the range it holds in the segment; ``f`` is moved past it."""
        at = f.tell() - frames.HEADER_SIZE
        if header.frame_len >= READ_DIRECT_MIN:
            whole = os.fstat(f.fileno()).st_size >= at + header.frame_len
            if whole:
                f.seek(header.comp_len, os.SEEK_CUR)
                view = self._read_direct(str(f.name), at, header.frame_len)
                if view is not None:
                    return view
                return FileRange(os.dup(f.fileno()), at, header.frame_len)
        else:
            payload = f.read(header.comp_len)
            whole = len(payload) == header.comp_len
            if whole:
                return head + payload
        raise CorruptDataError(f"spool {self.path}: frame {header.first_seq} is truncated")


    def _read_direct(self, name: str, at: int, length: int) -> memoryview | None:
        """``length`` bytes at ``at`` of segment ``name``, read with O_DIRECT into the
        buffer (the aligned blocks around them); None where O_DIRECT is not possible."""
        if name != self._dname:
            self._close_direct()
            self._dname = name
            if self.direct:
                try:
                    self._dfd = os.open(name, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # (EINVAL: the file system does not take it)
                        raise
        if self._dfd < 0:
            return None
        start = at - at % directio.ALIGN
        span = directio.round_up(at + length) - start
        if self._view is None or self._used + span > len(self._view):
            if self._used:  # frames of this read() are in the buffer: one of its own
                dest = memoryview(directio.aligned_buffer(span))
            else:
                if self._view is not None:
                    self._view.release()
                self._buf = directio.aligned_buffer(max(span, READ_BUFFER_BYTES))
                self._view = memoryview(self._buf)
                dest = self._view[:span]
                self._used = span
        else:
            dest = self._view[self._used:self._used + span]
            self._used += span
        got = 0
        while got < span:  # (the end of the segment's last block may not be written yet)
            n = os.preadv(self._dfd, [dest[got:]], start + got)
            if n <= 0:
                break
            got += n
        if got < at + length - start:
            raise CorruptDataError(f"spool {self.path}: frame at byte {at} of {name} is "
                                   "truncated")
        return dest[at - start:at - start + length]


#: Frames at least this large are read with O_DIRECT by :meth:`SpoolReader.read` (or handed
#: out as file ranges where O_DIRECT is not possible).
READ_DIRECT_MIN = 256 << 10
#: The reader's buffer for them: about a batch of the link (link.READ_BYTES) and a frame.
READ_BUFFER_BYTES = 16 << 20


@dataclass
class FileRange:
    """``length`` bytes at ``offset`` of the open file ``fd`` (owned: :meth:`close` it)."""

    fd: int
    offset: int
    length: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def close_frames(frames_read: Sequence[tuple[int, int, bytes | memoryview | FileRange]]
                 ) -> None:
    """Close the descriptors of the file ranges in a :meth:`SpoolReader.read` answer."""
    for _first, _last, frame in frames_read:
        if isinstance(frame, FileRange):
            frame.close()
