"""The journal server's durable journal of one volume: segment files of frames, group commit.

Layout (see docs/journal-format.md)::

    JOURNAL/<first seq, 20 digits>.zfr    frames back to back, in sequence order

The last segment is the *open* one: frames are appended to it and made durable by
:meth:`VolumeJournal.sync` (one fsync for everything appended since the last one: group
commit). Appends use O_DIRECT where the file system takes it (zfsrep.directio), so the open
segment may end with up to 4095 zero bytes after its last frame; elsewhere (tmpfs, or
``ZFSREP_JOURNAL_DIRECT=0``) they go through the page cache. When it reaches
``segment_bytes`` it is fsynced whole and a new segment, named after the next sequence
number, is started. Earlier segments are therefore always complete and
durable; opening a journal reads (and checksums) only the last segment, cutting a torn or
corrupt tail with a WARNING. The open segment always exists, even empty, so that its name says
where the stream continues however much has been trimmed.

Every file operation that changes the journal goes through a :class:`JournalFS` (the fault
injection seam of CONVENTIONS 17); :class:`FaultInjectingFS` makes a labelled operation fail or
stops a write half-way, as a crash would.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from zfsrep import directio, frames
from zfsrep.errors import CorruptDataError, FrameError, NotFoundError, OSFailure, StateError

log = logging.getLogger(__name__)

SUFFIX = ".zfr"
SEGMENT_BYTES = 64 << 20
ROTATE_TRIMMED_BYTES = 1 << 20
_NAME_DIGITS = 20
#: False: segments are always written through the page cache (ZFSREP_JOURNAL_DIRECT=0).
DIRECT = os.environ.get("ZFSREP_JOURNAL_DIRECT", "1") != "0"

Buffer = bytes | bytearray | memoryview


# --------------------------------------------------------------------------------------------
# The file-operation seam


class JournalFS(Protocol):
    """The file operations that change a journal or a checkpoint log (reads are not routed).

    Each method is one labelled operation: ``open``, ``write``, ``fsync``, ``fsync_dir``,
    ``truncate``, ``unlink``, ``replace``, ``dup``, ``close``.
    """

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int: ...
    def write(self, fd: int, data: Buffer) -> int: ...
    def pwrite(self, fd: int, data: Buffer, offset: int) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def fsync_dir(self, path: Path) -> None: ...
    def truncate(self, fd: int, length: int) -> None: ...
    def unlink(self, path: Path) -> None: ...
    def replace(self, src: Path, dst: Path) -> None: ...
    def dup(self, fd: int) -> int: ...
    def close(self, fd: int) -> None: ...


class OSJournalFS:
    """The real implementation: thin wrappers over :mod:`os`."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def write(self, fd: int, data: Buffer) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def close(self, fd: int) -> None:
        os.close(fd)


REAL_FS = OSJournalFS()


class SimulatedCrash(Exception):
    """Raised by :class:`FaultInjectingFS` where a real process would have died (kill -9).

    The object that was writing must be abandoned, not closed; reopen from the files."""


class FaultInjectingFS(OSJournalFS):
    """The real file operations, except for the faults a test arms.

    ``fail(label, err)`` makes the ``after + 1``-th following call of that label (on a path
    containing ``path_part``, if given) raise ``OSError(err)``; ``crash_in_write(keep)`` makes
    a following write put only ``keep`` bytes in the file and raise :class:`SimulatedCrash`.
    ``calls`` records ``(label, file name)`` of every operation; ``release()`` closes the
    descriptors an abandoned writer left open.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._faults: list[list] = []  # [label, path_part, countdown, action]
        self._names: dict[int, str] = {}

    def fail(self, label: str, err: int = errno.EIO, *, after: int = 0,
             path_part: str | None = None) -> None:
        def action() -> None:
            raise OSError(err, f"{os.strerror(err)} (injected)")
        self._faults.append([label, path_part, after, action])

    def crash_in_write(self, keep: int, *, after: int = 0) -> None:
        self._faults.append(["write", None, after, keep])

    def _fault(self, label: str, name: str) -> object:
        self.calls.append((label, name))
        for fault in self._faults:
            if fault[0] != label or (fault[1] is not None and fault[1] not in name):
                continue
            if fault[2] > 0:
                fault[2] -= 1
                continue
            self._faults.remove(fault)
            return fault[3]
        return None

    def _run(self, label: str, name: str) -> None:
        action = self._fault(label, name)
        if callable(action):
            action()

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._run("open", Path(path).name)
        fd = super().open(path, flags, mode)
        self._names[fd] = Path(path).name
        return fd

    def write(self, fd: int, data: Buffer) -> int:
        action = self._fault("write", self._names.get(fd, "?"))
        if isinstance(action, int):
            os.write(fd, memoryview(data)[:action])
            raise SimulatedCrash(f"crashed after writing {action} of {len(data)} bytes")
        if callable(action):
            action()
        return super().write(fd, data)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        """Labelled ``write`` too. A crash in it writes its first ``keep`` bytes through the
        page cache (an O_DIRECT descriptor takes only whole blocks): a torn write."""
        action = self._fault("write", self._names.get(fd, "?"))
        if isinstance(action, int):
            directio.leave_direct(fd)
            os.pwrite(fd, memoryview(data)[:action], offset)
            raise SimulatedCrash(f"crashed after writing {action} of {len(data)} bytes")
        if callable(action):
            action()
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._run("fsync", self._names.get(fd, "?"))
        super().fsync(fd)

    def fsync_dir(self, path: Path) -> None:
        self._run("fsync_dir", Path(path).name)
        super().fsync_dir(path)

    def truncate(self, fd: int, length: int) -> None:
        self._run("truncate", self._names.get(fd, "?"))
        super().truncate(fd, length)

    def unlink(self, path: Path) -> None:
        self._run("unlink", Path(path).name)
        super().unlink(path)

    def replace(self, src: Path, dst: Path) -> None:
        self._run("replace", Path(dst).name)
        super().replace(src, dst)

    def dup(self, fd: int) -> int:
        self._run("dup", self._names.get(fd, "?"))
        new = super().dup(fd)
        self._names[new] = self._names.get(fd, "?")
        return new

    def close(self, fd: int) -> None:
        self._run("close", self._names.get(fd, "?"))
        self._names.pop(fd, None)
        super().close(fd)

    def release(self) -> None:
        """Close every descriptor still open through this object (after a simulated crash)."""
        for fd in list(self._names):
            self._names.pop(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


def write_all(fs: JournalFS, fd: int, data: Buffer) -> None:
    """Write every byte of ``data`` (a short write continues)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = fs.write(fd, view)
        view = view[n:]


def pwrite_all(fs: JournalFS, fd: int, data: Buffer, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (a short write continues)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = fs.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


# --------------------------------------------------------------------------------------------
# Segments


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{_NAME_DIGITS}d}{SUFFIX}"


def _segment_firsts(path: Path) -> list[int]:
    firsts = []
    for p in path.iterdir():
        stem = p.name[: -len(SUFFIX)]
        if p.name.endswith(SUFFIX) and len(stem) == _NAME_DIGITS and stem.isdigit():
            firsts.append(int(stem))
    return sorted(firsts)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at EOF)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _scan_segment(path: Path, expected_first: int) -> tuple[int, int, str | None]:
    """Check every frame of a segment (header, checksum, sequence).

    Returns ``(offset after the last valid frame, its last seq or expected_first - 1, why the
    rest is invalid or None)``.
    """
    good = 0
    expected = expected_first
    with open(path, "rb") as f:
        while True:
            head = _read_exact(f, frames.HEADER_SIZE)
            if not head or frames.padding_to_end(f, head):  # (an O_DIRECT segment's end)
                return good, expected - 1, None
            try:
                header = frames.parse_header(head)
            except FrameError as e:
                return good, expected - 1, str(e)
            if header.first_seq != expected:
                return good, expected - 1, (
                    f"sequence gap: expected record {expected}, frame starts at "
                    f"{header.first_seq}")
            payload = _read_exact(f, header.comp_len)
            if len(payload) < header.comp_len:
                return good, expected - 1, (
                    f"frame payload: truncated, {len(payload)} of {header.comp_len} bytes")
            if frames.payload_checksum(payload) != header.checksum:
                return good, expected - 1, "frame payload: checksum mismatch"
            good += header.frame_len
            expected = header.last_seq + 1


# --------------------------------------------------------------------------------------------
# The journal


class VolumeJournal:
    """The durable journal of one volume's record stream.

    Thread-safe: appends, syncs and reads may come from different threads. ``sync`` fsyncs
    without holding the lock, so appends continue while a group commit is on its way to disk.
    """

    def __init__(self, path: Path, *, fs: JournalFS | None = None,
                 segment_bytes: int = SEGMENT_BYTES, first_seq: int = 1,
                 direct: bool = DIRECT) -> None:
        """Open (or create) the journal in directory ``path``.

        ``first_seq`` is where a *new* journal's stream starts; an existing journal continues
        where its files say. ``direct``: append with O_DIRECT where the file system takes it.
        """
        if first_seq < 1:
            raise ValueError("first_seq must be at least 1")
        self.path = Path(path)
        self._fs: JournalFS = REAL_FS if fs is None else fs
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._firsts: list[int] = []  # first seq of every segment; the last one is open
        self._size = 0  # bytes in the open segment
        self._durable_size = 0  # of which this many are on stable storage
        self._dir_dirty = False  # a segment was created and the directory not yet fsynced
        self._written_seq = 0
        self._durable_seq = 0
        self._broken: str | None = None  # why appends are refused until reopened
        self._rotate_next = False  # the indexer has reached the open segment: close it
        self.direct = direct
        self._direct = False  # the open segment is written with O_DIRECT
        self._appender = directio.DirectAppender()
        self._open(first_seq)

    # -- opening

    def _open(self, first_seq: int) -> None:
        fs = self._fs
        try:
            if not self.path.is_dir():
                self.path.mkdir(parents=True)
                fs.fsync_dir(self.path.parent)
            firsts = _segment_firsts(self.path)
            if not firsts:
                fd = fs.open(self._seg_path(first_seq), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    fs.fsync_dir(self.path)
                except BaseException:
                    fs.close(fd)
                    raise
                self._firsts = [first_seq]
                self._fd = fd
                self._durable_seq = self._written_seq = first_seq - 1
                self._start_appending(fd, b"")
                return
            last_first = firsts[-1]
            last_path = self._seg_path(last_first)
            good, last_seq, problem = _scan_segment(last_path, last_first)
            fd = fs.open(last_path, os.O_WRONLY)
            try:
                if problem is not None:
                    size = last_path.stat().st_size
                    log.warning("journal %s: cutting invalid tail of %s at byte %d "
                                "(%d bytes cut): %s", self.path, last_path.name, good,
                                size - good, problem)
                    fs.truncate(fd, good)
                    fs.fsync(fd)
                with open(last_path, "rb") as f:  # the last partial block, for O_DIRECT
                    f.seek(good - good % directio.ALIGN)
                    tail = _read_exact(f, good % directio.ALIGN)
            except BaseException:
                fs.close(fd)
                raise
        except OSError as e:
            raise OSFailure(f"journal {self.path}: cannot open: {describe(e)}") from None
        self._firsts = firsts
        self._fd = fd
        self._size = self._durable_size = good
        self._durable_seq = self._written_seq = last_seq
        self._start_appending(fd, tail)

    def _cut_padding(self, fd: int) -> None:
        """Cut the zero bytes O_DIRECT appends leave after the last frame of a segment that
        is closed: only the open segment of a running journal (or one that crashed) ends
        with padding."""
        if self._size % directio.ALIGN and self._broken is None and \
                os.fstat(fd).st_size > self._size:
            self._fs.truncate(fd, self._size)

    def _start_appending(self, fd: int, tail: bytes) -> None:
        """Appends to ``fd`` (at ``_size``, which ends in the bytes ``tail``) from now on."""
        self._direct = self.direct and directio.try_direct(fd)
        self._appender.reset(tail)

    def _seg_path(self, first_seq: int) -> Path:
        return self.path / segment_name(first_seq)

    # -- state

    @property
    def durable_seq(self) -> int:
        """Last sequence number on stable storage (0: none yet)."""
        return self._durable_seq

    @property
    def written_seq(self) -> int:
        """Last sequence number written, perhaps not yet fsynced."""
        return self._written_seq

    @property
    def first_seq(self) -> int:
        """First sequence number the journal still holds (``durable_seq + 1`` when empty)."""
        return self._firsts[0]

    @property
    def broken(self) -> str | None:
        """Why the journal refuses appends (an fsync or write failed), or None."""
        return self._broken

    # -- writing

    def append(self, frame: Buffer) -> bool:
        """Write one frame (not yet durable: see :meth:`sync`).

        Returns False for a duplicate (a resend of frames already written), True when written.
        A frame that does not start at ``written_seq + 1`` is refused with CorruptDataError,
        as is a malformed one; nothing is written then.
        """
        header = frames.parse_header(frame)
        if len(frame) != header.frame_len:
            raise FrameError(f"frame: {len(frame)} bytes, header says {header.frame_len}")
        if frames.payload_checksum(memoryview(frame)[frames.HEADER_SIZE:]) != header.checksum:
            raise FrameError("frame payload: checksum mismatch")  # checked outside the lock
        with self._lock:
            self._check_usable()
            expected = self._written_seq + 1
            if header.last_seq < expected:
                return False
            if header.first_seq != expected:
                if header.first_seq < expected:
                    what = f"overlaps the records written up to {expected - 1}"
                else:
                    what = f"leaves a gap: records {expected}..{header.first_seq - 1} missing"
                raise CorruptDataError(
                    f"journal {self.path}: frame {header.first_seq}..{header.last_seq} {what}")
            if self._size and (self._size + len(frame) > self._segment_bytes
                               or self._rotate_next):
                self._rotate_next = False
                self._rotate(header.first_seq)
            self._write(frame)
            self._written_seq = header.last_seq
            return True

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise OSFailure(f"journal {self.path} refuses writes until reopened: {self._broken}")
        if self._fd is None:
            raise StateError(f"journal {self.path} is closed")

    def _write(self, frame: Buffer) -> None:
        assert self._fd is not None
        try:
            if self._direct:
                slot = self._appender.slot(len(frame))
                slot[:] = memoryview(frame).cast("B")
                fd, fs = self._fd, self._fs
                if not self._appender.write(
                        fd, lambda block, at: pwrite_all(fs, fd, block, at), self._size,
                        f"journal {self.path}"):
                    self._direct = self.direct = False
            else:
                pwrite_all(self._fs, self._fd, frame, self._size)
        except OSError as e:
            # Take the partial frame back out so the next append follows the last whole one.
            try:
                self._fs.truncate(self._fd, self._size)
            except OSError as e2:
                self._broken = f"write failed ({describe(e)}) and so did undoing it " \
                               f"({describe(e2)})"
            raise OSFailure(f"journal {self.path}: write failed: {describe(e)}") from None
        self._size += len(frame)

    def _rotate(self, first_seq: int) -> None:
        """Make the full open segment durable and start a new one named ``first_seq``."""
        assert self._fd is not None
        fs = self._fs
        try:
            self._cut_padding(self._fd)
            fs.fsync(self._fd)
            if self._dir_dirty:
                fs.fsync_dir(self.path)
        except OSError as e:
            self._fail_sync(e)
        old, self._fd = self._fd, None
        self._durable_seq = self._written_seq
        self._dir_dirty = False
        try:
            fs.close(old)
            self._fd = fs.open(self._seg_path(first_seq), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except OSError as e:
            self._broken = f"cannot start segment {segment_name(first_seq)}: {describe(e)}"
            raise OSFailure(f"journal {self.path}: {self._broken}") from None
        self._start_appending(self._fd, b"")
        self._firsts.append(first_seq)
        self._size = self._durable_size = 0
        self._dir_dirty = True

    def sync(self) -> int:
        """Make everything appended so far durable; returns the new ``durable_seq``.

        One call covers every frame appended before it (group commit). On failure raises
        OSFailure and refuses every later append until the journal is reopened: after a failed
        fsync, Linux may have dropped the dirty pages, so nothing written since the last good
        sync can be trusted (the journal cuts it off, best effort).
        """
        fs = self._fs
        with self._lock:
            self._check_usable()
            if self._written_seq == self._durable_seq and not self._dir_dirty:
                return self._durable_seq
            target, size, dir_dirty = self._written_seq, self._size, self._dir_dirty
            segment = self._firsts[-1]
            assert self._fd is not None
            try:
                fd = fs.dup(self._fd)  # a rotation may close self._fd while we fsync
            except OSError as e:
                raise OSFailure(f"journal {self.path}: sync failed: {describe(e)}") from None
        try:
            try:
                fs.fsync(fd)
                if dir_dirty:
                    fs.fsync_dir(self.path)
            finally:
                fs.close(fd)
        except OSError as e:
            with self._lock:
                self._fail_sync(e)
        with self._lock:
            self._durable_seq = max(self._durable_seq, target)
            if self._firsts[-1] == segment:  # no rotation meanwhile (it syncs by itself)
                self._durable_size = max(self._durable_size, size)
                if dir_dirty:
                    self._dir_dirty = False
            return self._durable_seq

    def _fail_sync(self, e: OSError) -> None:
        """Record an fsync failure (lock held) and raise OSFailure."""
        self._broken = f"fsync failed ({describe(e)})"
        if self._fd is not None:
            try:  # what was not made durable is not to be trusted: cut it (best effort)
                self._fs.truncate(self._fd, self._durable_size)
                self._size = self._durable_size
                self._written_seq = self._durable_seq
            except OSError:
                pass
        log.error("journal %s: %s; refusing writes until reopened", self.path, self._broken)
        raise OSFailure(f"journal {self.path}: {self._broken}") from None

    def close(self) -> None:
        """Release the open segment (without syncing: call :meth:`sync` first)."""
        with self._lock:
            self._appender.close()
            if self._fd is not None:
                fd, self._fd = self._fd, None
                try:
                    self._cut_padding(fd)
                    self._fs.close(fd)
                except OSError as e:
                    raise OSFailure(f"journal {self.path}: close failed: {describe(e)}") from None

    def __enter__(self) -> VolumeJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- trimming

    def trim(self, upto_seq: int) -> int:
        """Delete the segments all of whose records are <= ``upto_seq`` (never the open one).

        Returns how many segments were deleted.
        """
        with self._lock:
            removed = 0
            if (upto_seq >= self._written_seq == self._durable_seq and self._broken is None
                    and self._size >= ROTATE_TRIMMED_BYTES):
                # everything is trimmable: start an empty open segment now so the full
                # one can go too (its name keeps the position across a restart)
                self._rotate(self._written_seq + 1)
            try:
                while len(self._firsts) > 1 and self._firsts[1] - 1 <= upto_seq:
                    self._fs.unlink(self._seg_path(self._firsts[0]))
                    self._firsts.pop(0)
                    removed += 1
                if removed:
                    self._fs.fsync_dir(self.path)
            except OSError as e:
                raise OSFailure(f"journal {self.path}: trim failed: {describe(e)}") from None
            if self._firsts[-1] - 1 <= upto_seq and self._size >= ROTATE_TRIMMED_BYTES:
                # the reader has reached the open segment: start a new one at the next frame,
                # so this one can go at the next trim instead of holding up to a whole
                # segment of data that is already indexed
                self._rotate_next = True
            return removed

    # -- reading

    def _snapshot(self) -> tuple[list[int], int, int]:
        with self._lock:
            return list(self._firsts), self._durable_seq, self._durable_size

    def read_raw_from(self, seq: int) -> Iterator[tuple[frames.FrameHeader, bytes]]:
        """Durable frames holding records >= ``seq``, as ``(header, frame bytes)``.

        The first frame may start before ``seq``. Checksums and the sequence are verified
        (CorruptDataError otherwise). Records before :attr:`first_seq` were trimmed:
        NotFoundError. Frames appended after the call started are not included.
        """
        yield from self._iter(seq, lambda h, head, payload: head + payload)

    def read_from(self, seq: int) -> Iterator[tuple[frames.FrameHeader, list[list]]]:
        """Durable frames holding records >= ``seq``, decoded: ``(header, records)``.

        The first frame may start before ``seq`` (its records are all returned).
        """
        yield from self._iter(seq, lambda h, head, payload: frames.decode_payload(h, payload))

    def _iter(self, seq: int, make: Callable[[frames.FrameHeader, bytes, bytes], object]
              ) -> Iterator:
        firsts, durable, durable_size = self._snapshot()
        if seq < firsts[0]:
            raise NotFoundError(f"journal {self.path}: record {seq} is not in the journal, "
                                f"which starts at {firsts[0]} (trimmed or never held)")
        if seq > durable:
            return
        start = bisect.bisect_right(firsts, seq) - 1
        for i in range(start, len(firsts)):
            path = self._seg_path(firsts[i])
            is_last = i == len(firsts) - 1
            limit = durable_size if is_last else None
            end = durable if is_last else firsts[i + 1] - 1
            yield from self._iter_segment(path, firsts[i], end, limit, seq, make)

    def _iter_segment(self, path: Path, first: int, end: int, limit: int | None, seq: int,
                      make: Callable[[frames.FrameHeader, bytes, bytes], object]) -> Iterator:
        expected = first
        offset = 0
        with open(path, "rb") as f:
            while expected <= end and (limit is None or offset < limit):
                head = _read_exact(f, frames.HEADER_SIZE)
                try:
                    if not head:
                        raise CorruptDataError(f"records {expected}..{end} are missing")
                    header = frames.parse_header(head)
                    if header.first_seq != expected:
                        raise CorruptDataError(f"frame starts at {header.first_seq}, "
                                               f"expected {expected}")
                    if header.last_seq < seq:
                        f.seek(header.comp_len, os.SEEK_CUR)
                    else:
                        payload = _read_exact(f, header.comp_len)
                        if len(payload) < header.comp_len:
                            raise FrameError(f"frame payload: truncated, {len(payload)} of "
                                             f"{header.comp_len} bytes")
                        if frames.payload_checksum(payload) != header.checksum:
                            raise FrameError("frame payload: checksum mismatch")
                        item = make(header, head, payload)
                except CorruptDataError as e:
                    raise CorruptDataError(f"journal segment {path} at byte {offset}: {e}"
                                           ) from None
                if header.last_seq >= seq:
                    yield header, item
                offset += header.frame_len
                expected = header.last_seq + 1

    # -- figures

    def stats(self) -> dict[str, int]:
        """``bytes`` on disk, ``segments``, ``first_seq``/``last_seq`` (durable) held, and
        ``written_seq``."""
        firsts, durable, _size = self._snapshot()
        total = 0
        for first in firsts:
            with contextlib.suppress(FileNotFoundError):  # trimmed meanwhile
                total += self._seg_path(first).stat().st_size
        return {"bytes": total, "segments": len(firsts), "first_seq": firsts[0],
                "last_seq": durable, "written_seq": self._written_seq}
