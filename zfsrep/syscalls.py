"""The few Linux system calls the standard library does not offer, through ctypes.

renameat2 (RENAME_NOREPLACE / RENAME_EXCHANGE), syncfs and sync_file_range, and
fchownat/utimensat with AT_EMPTY_PATH so that an O_PATH descriptor of a symbolic link can be
changed without following it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

# The interpreter is linked against libc: its own symbol table has these calls (ctypes.util
# would cost every command 10 ms of imports and an ldconfig run to find the same library).
_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def _check(ret: int, what: str, name: bytes | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int) -> None:
    _check(_libc.renameat2(src_dir_fd, src, dst_dir_fd, dst, flags), "renameat2", src)


def lchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH descriptor refers to, without following a symlink."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def lutimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times of the object an O_PATH descriptor refers to (None leaves a time unchanged)."""
    ts = (_Timespec * 2)()
    for i, value in enumerate((atime_ns, mtime_ns)):
        if value is None:
            ts[i].tv_sec, ts[i].tv_nsec = 0, UTIME_OMIT
        else:
            ts[i].tv_sec, ts[i].tv_nsec = divmod(value, 1_000_000_000)
    _check(_libc.utimensat(fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode bits (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def syncfs(path: str | os.PathLike[str]) -> None:
    """Write everything cached for the filesystem holding ``path`` to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(_libc.syncfs(fd), "syncfs")
    finally:
        os.close(fd)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk now, without waiting (sync_file_range)."""
    _check(_libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE), "sync_file_range")


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def pwritev_all(fd: int, offset: int, parts: list[memoryview]) -> None:
    """pwritev at ``offset`` until every byte of ``parts`` is written (a short write
    continues where it stopped; the file's own position does not move)."""
    parts = [p for p in parts if p.nbytes]
    while parts:
        written = os.pwritev(fd, parts[:IOV_MAX], offset)
        offset += written
        while parts and written >= parts[0].nbytes:
            written -= parts[0].nbytes
            parts = parts[1:]
        if parts and written:
            parts = [parts[0][written:], *parts[1:]]


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread (only it) the niceness ``nice``: for background work whose
    wakeups should not preempt the application or a request path. Best effort."""
    import threading

    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def use_idle_cpu() -> bool:
    """Run the calling thread, and every thread or process it starts from now on, under
    SCHED_IDLE: it gets the CPU only when no ordinary thread of the host wants it (and
    preempts none), so it never slows an application on the same host. False where the
    system refuses."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return True


def use_ordinary_cpu() -> None:
    """Put the calling thread back under ordinary time-sharing, whatever it inherited (a
    daemon that serves applications, started by a journal server under SCHED_IDLE). Best
    effort."""
    with contextlib.suppress(OSError, AttributeError):
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def name_thread(name: str) -> None:
    """Name the calling thread for ``top -H``, ``ps -L`` and /proc (at most 15 bytes)."""
    _libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def set_threads_idle(idle: bool, *, skip: int = 0) -> None:
    """Put every thread of this process but ``skip`` (a native thread id) under SCHED_IDLE
    (``idle``) or back to ordinary time-sharing. Best effort: a thread that ends meanwhile,
    or a switch the system refuses, is passed over."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        if tid != skip:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))


class IdleCPU:
    """``with IdleCPU():`` runs the body under SCHED_IDLE (see :func:`use_idle_cpu`) and then
    puts the calling thread's policy back: for work in a pooled worker thread (trio's), which
    would otherwise keep the policy for whatever it runs next."""

    def __enter__(self) -> None:
        try:
            self._policy: int | None = os.sched_getscheduler(0)
            self._param = os.sched_getparam(0)
        except OSError:
            self._policy = None
            return
        if self._policy != os.SCHED_IDLE:
            use_idle_cpu()

    def __exit__(self, *exc: object) -> None:
        if self._policy is not None:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, self._policy, self._param)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_large_buffers(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Ask glibc to serve large allocations (the 1 MiB write buffers and 4 MiB frames a daemon
    allocates and frees all the time) from its heap and to keep freed memory, instead of a
    fresh mmap per buffer that the kernel must fault in and zero (measured: about 7% of the
    mount's CPU). False where glibc's mallopt is not available."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def mount_at(path: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """``(major:minor, file system type, mount source)`` of the newest mount whose mount
    point is ``path`` (absolute, without symlinks), from /proc/self/mountinfo (the octal
    escapes of space, tab, newline and backslash undone); None if nothing is mounted there.
    Read from the table, not by stat or realpath, which would ask a mount that may be this
    very process."""
    import re

    target = os.fsencode(path)
    unescape = re.compile(rb"\\([0-7]{3})")
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:  # (later lines are mounts on top of earlier ones)
            left, _, right = line.partition(b" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) > 1 and unescape.sub(
                    lambda m: bytes([int(m[1], 8)]), fields[4]) == target:
                found = (fields[2].decode(), os.fsdecode(tail[0]), os.fsdecode(tail[1]))
    return found


def try_lock(path: str | os.PathLike[str]) -> tuple[int | None, str]:
    """Open ``path`` (created if missing) and take an exclusive flock(2) without waiting:
    ``(descriptor, "")``, our pid then written in the file, the lock held until the
    descriptor is closed; or ``(None, holder)`` with the pid the holder wrote. A file
    removed and made anew after we opened it (its holder removes it when done) is opened
    again."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return None, os.pread(fd, 32, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd, ""
        os.close(fd)


_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


# The same calls without giving up the GIL between them (for umount_and_exchange).
_libc_held = ctypes.PyDLL(None, use_errno=True)
_libc_held.renameat2.argtypes = _libc.renameat2.argtypes


def umount_and_exchange(mountpoint: bytes, other: bytes) -> None:
    """Detach the mount at ``mountpoint`` (umount2 MNT_DETACH) and at once exchange that
    path with ``other`` (renameat2 RENAME_EXCHANGE). Between the two, new lookups of
    ``mountpoint`` see the empty directory the mount was on: both calls are made holding the
    GIL, so no other thread of this process (such as a FUSE daemon's event loop, busy with
    those lookups) runs between them and the gap is that of two system calls. If the
    exchange fails the mount stays detached: OSError."""
    _check(_libc_held.umount2(mountpoint, 2), "umount2", mountpoint)
    _check(_libc_held.renameat2(AT_FDCWD, mountpoint, AT_FDCWD, other, 2), "renameat2",
           mountpoint)


def umount(path: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2): ``flags`` 2 (MNT_DETACH) detaches the mount at once; it goes away when the
    last process using it leaves."""
    _check(_libc.umount2(os.fsencode(path), flags), "umount2", os.fsencode(path))
