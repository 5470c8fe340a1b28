"""The only importer of ``zfsrep._fusehook`` (native/fusehook.c), the protected mount's session
hook: it negotiates FUSE_HANDLE_KILLPRIV_V2 (no xattr round trip per write) and answers READ
and WRITE requests on registered files in C, queueing each write's data for the capture stream
(see the C file for the measurements and the why).

The compiled module must be loaded with RTLD_GLOBAL before pyfuse3 is imported, so that
pyfuse3's call of ``fuse_session_new`` binds to the module's wrapper; ``zfsrep.mountd``
imports this module first for that reason. Without the module (or when the session cannot be
hooked) everything runs through pyfuse3 as before, only slower.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from zfsrep.records import Op

log = logging.getLogger(__name__)

_flags = sys.getdlopenflags()
try:
    sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
    from zfsrep import _fusehook  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only when the extension was not built
    _fusehook = None
finally:
    sys.setdlopenflags(_flags)

_TAKE = 256
_REC_SIZE = _fusehook.ffi.sizeof("zf_rec") if _fusehook is not None else 0


class TakenRecords:
    """Records taken from the fast path's queue (``count`` of them, ``data_bytes`` of write
    data), still as the C structs they were queued as. The write data stays in the C
    buffers it arrived in until :meth:`records` is called, exactly once (on an encoder
    thread, or to drop them): from then on each buffer is freed when the last view of it
    goes."""

    __slots__ = ("_raw", "count", "data_bytes")

    def __init__(self, raw: bytes, count: int, data_bytes: int) -> None:
        self._raw = raw
        self.count = count
        self.data_bytes = data_bytes

    def records(self) -> list[tuple[int, tuple]]:
        """The records, oldest first, as (op, args) of zfsrep.records: WRITE (ident,
        offset, data, mtime_ns), SETATTR (ident, mode, uid, gid, mtime_ns) or FALLOCATE
        (ident, mode, offset, length, mtime_ns)."""
        lib, ffi = _fusehook.lib, _fusehook.ffi
        raw, self._raw = self._raw, b""
        recs = ffi.from_buffer("zf_rec[]", raw)
        out: list[tuple[int, tuple]] = []
        for i in range(len(raw) // _REC_SIZE):
            r = recs[i]
            if r.kind == lib.ZF_WRITE:
                # No copy: a view of the C buffer (the data may start after the request
                # header it arrived with), freed when the last reference goes.
                head = r.data - r.owner
                owner = ffi.gc(r.owner, lib.zf_free)
                data = memoryview(ffi.buffer(owner, head + r.len))[head:]
                out.append((Op.WRITE, (r.ident, r.offset, data, r.mtime_ns)))
            elif r.kind == lib.ZF_SETATTR:
                out.append((Op.SETATTR, (r.ident, r.mode, r.uid, r.gid, r.mtime_ns)))
            else:
                out.append((Op.FALLOCATE, (r.ident, r.mode, r.offset, r.len, r.mtime_ns)))
        return out

#: After a request pyfuse3 waits up to LINGER_US for the next one without going through
#: trio's scheduler, for at most NO_YIELD_REQUESTS requests or NO_YIELD_NS in a row (see
#: SessionHook._wait_less).
LINGER_US = 200
NO_YIELD_REQUESTS = 64
NO_YIELD_NS = 2_000_000


class SessionHook:
    """The hook of this process's one pyfuse3 session (after ``pyfuse3.init``)."""

    def __init__(self) -> None:
        self.active = False
        self.capture = False
        self._recs = _fusehook.ffi.new("zf_rec[]", _TAKE) if _fusehook is not None else None
        self._taken = _fusehook.ffi.new("uint64_t[1]") if _fusehook is not None else None
        self._fhs = _fusehook.ffi.new("uint64_t[]", _TAKE) if _fusehook is not None else None
        self._run: object = None
        self._dirty: object = None

    def install(self, eventfd: int, *, fast: bool, capture: bool, limit: int) -> bool:
        if _fusehook is None:
            log.info("zfsrep._fusehook is not available: all requests go through pyfuse3")
            return False
        rc = _fusehook.lib.zf_install(eventfd, int(fast), limit)
        if rc != 0:
            log.info("cannot hook the FUSE session (%d): all requests go through pyfuse3", rc)
            return False
        self.active = fast
        self.capture = capture
        if fast:
            self._wait_less()
        return True

    @staticmethod
    def _wait_less() -> None:
        """Let pyfuse3 take the next request without a trip through trio's scheduler.

        Before every request pyfuse3 awaits ``_wait_fuse_readable``: a trio lock and
        ``wait_readable``, two passes of trio's scheduler and two epoll calls. When a Python
        handler has just answered, the application's next request (often one the C fast
        path answers) usually follows within tens of microseconds. The replacement first
        waits up to LINGER_US for it in C (the GIL released), as the fast path itself does
        between its requests, and returns at once when it comes; only for at most
        NO_YIELD_REQUESTS requests or NO_YIELD_NS in a row, after which it waits the way
        pyfuse3 does (its own function, which also counts the tasks waiting to read: pyfuse3
        starts a worker task when none waits and ends one when more than one does, and each
        worker keeps a request buffer of 1 MiB; without that count it ran 99 of them), so the
        other tasks (capture, link, control) still run. The session's descriptor is
        non-blocking (zf_install): a reader woken for a request another one took reads
        nothing and tries again.

        pyfuse3's session loop looks the function up by name in its module at every call,
        so replacing the module attribute is enough; without it (another pyfuse3) nothing
        changes."""
        import pyfuse3

        if not hasattr(pyfuse3, "_wait_fuse_readable"):
            return
        lib = _fusehook.lib
        # (pyfuse3's own, also when a second session in this process installs the hook)
        wait_like_pyfuse3 = getattr(pyfuse3, "_zfsrep_replaced", pyfuse3._wait_fuse_readable)
        pyfuse3._zfsrep_replaced = wait_like_pyfuse3
        streak = 0
        since = 0

        async def wait_fuse_readable() -> bool:
            nonlocal streak, since
            if lib.zf_exited():
                return False
            if (streak < NO_YIELD_REQUESTS and time.monotonic_ns() - since < NO_YIELD_NS
                    and lib.zf_wait_request(LINGER_US)):
                streak += 1
                return True
            if not await wait_like_pyfuse3():
                return False
            streak = 0
            since = time.monotonic_ns()
            return True

        pyfuse3._wait_fuse_readable = wait_fuse_readable

    @staticmethod
    def killpriv_v2() -> bool:
        return _fusehook is not None and bool(_fusehook.lib.zf_killpriv_v2())

    def register(self, fh: int, ident: int, uid: int) -> None:
        """Let the fast path serve READ/WRITE on ``fh`` (a backing descriptor)."""
        if self.active:
            _fusehook.lib.zf_register(fh, ident, uid, int(self.capture))

    def unregister(self, fh: int) -> None:
        if self.active:
            _fusehook.lib.zf_unregister(fh)

    def register_node(self, node: int, path_fd: int, is_dir: bool = False) -> None:
        """Let the fast path use ``node`` through its O_PATH descriptor: read the xattrs of
        a regular file, answer lookups of absent names in a directory."""
        if self.active:
            lib = _fusehook.lib
            lib.zf_register_node(node, path_fd, lib.ZF_NODE_DIR if is_dir else lib.ZF_NODE_FILE)

    def unregister_node(self, node: int) -> None:
        if self.active:
            _fusehook.lib.zf_unregister_node(node)

    def unregister_nodes(self, keep: int) -> None:
        """Forget every node but ``keep`` (a restore in place replaced the tree: requests
        about objects of the old one go to Python, which answers ESTALE)."""
        if self.active:
            _fusehook.lib.zf_unregister_nodes(keep)

    def take_released(self) -> list[int]:
        """The handles whose RELEASE the fast path answered, still to be closed."""
        if not self.active:
            return []
        out: list[int] = []
        while True:
            n = _fusehook.lib.zf_take_released(self._fhs, _TAKE)
            out.extend(self._fhs[0:n])
            if n < _TAKE:
                return out

    # ---- the capture stream's view (zfsrep.capture.ExternalWrites) -----------------------
    def pending(self) -> bool:
        return self.active and _fusehook.lib.zf_pending() > 0

    def take_chunk(self, max_bytes: int) -> TakenRecords | None:
        """The queued records, oldest first, up to about ``max_bytes`` of write data (at
        least one record), as they are in C: this is the event loop's whole share of the
        work per record (a copy of 64 bytes). :meth:`TakenRecords.records` turns them into
        records on an encoder thread. None when nothing is queued."""
        if _fusehook is None:
            return None
        lib, ffi, recs = _fusehook.lib, _fusehook.ffi, self._recs
        parts: list[bytes] = []
        count = data_bytes = 0
        taken = self._taken
        while count == 0 or data_bytes < max_bytes:
            n = lib.zf_take_upto(recs, _TAKE, max_bytes - data_bytes, taken)
            if n == 0:
                break
            parts.append(ffi.buffer(recs, n * _REC_SIZE)[:])
            count += n
            data_bytes += taken[0]
            if n < _TAKE and data_bytes < max_bytes:
                break  # the queue is empty
        if not count:
            return None
        return TakenRecords(b"".join(parts) if len(parts) > 1 else parts[0], count,
                            data_bytes)

    def set_frozen(self, frozen: bool) -> None:
        """Checkpoint barrier: while frozen, mutating requests go to Python (which holds
        their answers, zfsrep.barrier)."""
        if self.active:
            _fusehook.lib.zf_set_frozen(int(frozen))

    def add_held(self, delta: int) -> None:
        """Captured bytes held by the capture stream grew (or shrank) by ``delta``; called
        from any thread."""
        if self.active:
            _fusehook.lib.zf_add_held(delta)

    def set_run_counter(self, counter: memoryview | None) -> None:
        """Count the records the fast path queues in ``counter`` (a native uint64 in the
        spool's run-state mapping, :class:`zfsrep.spool.RunState`), or stop counting (None:
        before the mapping goes)."""
        if _fusehook is None:
            return
        if counter is None:
            _fusehook.lib.zf_set_run_counter(_fusehook.ffi.NULL)
            self._run = None
            return
        self._run = _fusehook.ffi.from_buffer("uint64_t[]", counter)  # (kept alive here)
        _fusehook.lib.zf_set_run_counter(self._run)

    def set_dirty_table(self, table: memoryview | None) -> bool:
        """Mark the files the fast path changes in ``table`` (the run state's, see
        :class:`zfsrep.spool.RunState`), or stop (None). False if there is no native hook:
        nothing can be marked then."""
        if _fusehook is None:
            return False
        if table is None:
            _fusehook.lib.zf_set_dirty_table(_fusehook.ffi.NULL)
            self._dirty = None
            return True
        self._dirty = _fusehook.ffi.from_buffer("uint64_t[]", table)  # (kept alive here)
        _fusehook.lib.zf_set_dirty_table(self._dirty)
        return True

    @staticmethod
    def wake_on_record(on: bool) -> None:
        """Signal the drain at the first record queued (the capture stream is idle), or
        once a frame's worth is queued."""
        if _fusehook is not None:
            _fusehook.lib.zf_set_wake_on_record(int(on))

    @staticmethod
    def mark_dirty(ident: int, seq: int) -> bool:
        """Mark file ``ident`` as changed by record ``seq``; False if the table is full."""
        return _fusehook is not None and _fusehook.lib.zf_mark_dirty(ident, 0, seq) == 0

    def shutdown(self) -> None:
        """Answer queued FSYNCs and stop the fast path; call before the session closes."""
        if self.active:
            _fusehook.lib.zf_shutdown()
            self.active = False

    @staticmethod
    def counts() -> dict[str, int]:
        """Requests answered by the fast path, by kind."""
        kinds = ("reads", "writes", "fsyncs", "setattrs", "getxattrs", "fallocates",
                 "lookups", "releases")
        if _fusehook is None:
            return dict.fromkeys(kinds, 0)
        c = _fusehook.lib.zf_counts()
        return {kind: getattr(c, kind) for kind in kinds}

    @staticmethod
    def buffer_counts() -> tuple[int, int]:
        """Request buffers the fast path allocated, and took from its pool instead."""
        if _fusehook is None:
            return 0, 0
        c = _fusehook.lib.zf_counts()
        return c.buffers_new, c.buffers_reused
