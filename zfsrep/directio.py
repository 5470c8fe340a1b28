"""Appending frames to a file with O_DIRECT: the spool's segments and the journal's.

O_DIRECT writes go from an aligned buffer to the disk in whole blocks, without the page cache:
no copy into it, no page to allocate, account as dirty, write back and reclaim. On the virtual
machines we measure on that is most of what a buffered append costs (about a CPU-second per
GiB), and the journal server's buffered appends, on the same disk as a protected mount,
cost the mount's application 10-25% of its write rate (docs/journal-format.md).

Frames have any length, so an append starts with the file's last partial block: the frame
is put into an aligned buffer after those bytes, padded with zeros to a whole block and
written in one call at the block's offset. The next append rewrites that block with the
same bytes plus its own, so a crash in the middle of it leaves the earlier frames' bytes as
they were whatever the device tears. A file written this way ends with 0 to
``ALIGN - 1`` zero bytes after its last frame (:func:`zfsrep.frames.padding_to_end` reads
them as its end).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Callable

from zfsrep import frames

log = logging.getLogger(__name__)

#: The block size of O_DIRECT appends (a multiple of every logical block size we meet).
ALIGN = frames.SEGMENT_PAD


def try_direct(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT; False where the file system does not take it (tmpfs)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def leave_direct(fd: int) -> None:
    """Clear O_DIRECT on ``fd``: the file system took the flag but refused an aligned write
    (EINVAL; a device with larger blocks, a file system that checks more). The caller
    writes the same block again through the page cache and appends there from then on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


#: Transparent huge pages are this large (x86-64, arm64 with 4 KiB pages).
HUGE_PAGE = 2 << 20


def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory for O_DIRECT transfers, private to this process, of at least
    ``size`` bytes: from 2 MiB on in whole 2 MiB and backed by transparent huge pages where
    the system gives them (``madvise``; best effort).

    A 4 MiB transfer from 4 KiB pages is 1,024 scattered pages: the block layer splits it
    into requests of at most ``max_segments`` pages each (5 to 8 requests on the virtual
    disks we measure on), and each request costs an interrupt and, with the mq-deadline
    scheduler, a dispatch on a high-priority kernel worker that preempts whatever runs on
    that CPU, the mount's request thread included. From huge pages the same transfer is a
    few contiguous segments: one or two requests (bench/README.md, sixteenth session).
    Not inherited by child processes (MADV_DONTFORK), so a fork during a transfer cannot
    make the parent's pages copy-on-write under the device."""
    huge = size >= HUGE_PAGE
    unit = HUGE_PAGE if huge else mmap.PAGESIZE
    buf = mmap.mmap(-1, -(-size // unit) * unit, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (mmap.MADV_DONTFORK, *([mmap.MADV_HUGEPAGE] if huge else [])):
        with contextlib.suppress(OSError):  # (a kernel without THP: ordinary pages)
            buf.madvise(advice)
    return buf


class DirectAppender:
    """The append state of one O_DIRECT file: its last partial block (``tail``) and the
    aligned buffer appends are staged in.

    An append is :meth:`slot` (fill the view it returns with the frame's bytes), then
    :meth:`block` (write those aligned bytes at ``end - lead``, where ``end`` is the
    file's length before the append), then :meth:`done`. A failed write leaves the state as
    it was before the append: the caller cuts the file back to its length and the next
    append rewrites the same block.
    """

    def __init__(self) -> None:
        self.tail = b""
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._pending: tuple[int, int, int] | None = None  # lead, end, need

    def reset(self, tail: bytes = b"") -> None:
        """A new file (``tail`` empty), or one reopened at a length ending in ``tail``."""
        assert len(tail) < ALIGN
        self.tail = tail
        self._pending = None

    def slot(self, size: int) -> memoryview:
        """Where the next ``size`` bytes go (after the tail, zero padding behind them)."""
        lead = len(self.tail)
        end = lead + size
        need = round_up(end)
        stage = self._staging(need)
        stage[:lead] = self.tail
        stage[end:need] = bytes(need - end)
        self._pending = (lead, end, need)
        return stage[lead:end]

    def block(self) -> tuple[memoryview, int]:
        """The aligned bytes to write, and how many of them come before the slot (so they
        go at the file's length minus that)."""
        assert self._pending is not None and self._view is not None
        lead, _end, need = self._pending
        return self._view[:need], lead

    def write(self, fd: int, write_at: Callable[[memoryview, int], object], end: int,
              what: str) -> bool:
        """Write the block (:meth:`block`) with ``write_at(block, offset)`` at ``end`` (the
        file's length before the append) minus its lead, then :meth:`done`. A write the
        file system refuses (EINVAL) is made again through the page cache, with a WARNING
        naming ``what``: returns False then, and ``fd`` is no longer O_DIRECT."""
        block, lead = self.block()
        direct = True
        try:
            write_at(block, end - lead)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.warning("%s: the file system refused an O_DIRECT write (%s); writing "
                        "through the page cache from now on", what, e.strerror or e)
            leave_direct(fd)
            write_at(block, end - lead)
            direct = False
        self.done()
        return direct

    def done(self) -> None:
        """The block was written: its last partial block is the new tail."""
        assert self._pending is not None and self._view is not None
        _lead, end, _need = self._pending
        keep = end % ALIGN
        self.tail = bytes(self._view[end - keep:end])
        self._pending = None

    def _staging(self, need: int) -> memoryview:
        """An aligned buffer (:func:`aligned_buffer`) of at least ``need`` bytes and at
        least 1 MiB (frames that grow a little at a time do not each allocate anew), kept
        for the next appends: about one frame of memory."""
        if self._view is None or len(self._view) < need:
            self.close()
            self._map = aligned_buffer(max(need, 1 << 20))
            self._view = memoryview(self._map)
        return self._view

    def close(self) -> None:
        """Free the buffer (the next append allocates one again)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
