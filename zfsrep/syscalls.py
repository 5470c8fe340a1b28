"""The few Linux system calls the standard library does not offer, through ctypes.

renameat2 (RENAME_NOREPLACE / RENAME_EXCHANGE), and fchownat/utimensat with AT_EMPTY_PATH so that
an O_PATH descriptor of a symbolic link can be changed without following it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

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
