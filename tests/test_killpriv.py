"""The mount negotiates FUSE_HANDLE_KILLPRIV_V2 and then kills privileges itself."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

# struct vfs_cap_data, revision 2, effective bit set, CAP_NET_RAW (13) permitted
CAP_BLOB = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def test_kernel_accepts_killpriv_v2(protected) -> None:
    deadline = time.monotonic() + 10
    while "FUSE_HANDLE_KILLPRIV_V2" not in protected.log.read_text():
        assert time.monotonic() < deadline, protected.log.read_text()
        time.sleep(0.1)
    assert "kernel accepted FUSE_HANDLE_KILLPRIV_V2" in protected.log.read_text()


def _write_and_check_caps(path: Path) -> bool:
    path.write_bytes(b"x" * 100)
    os.setxattr(path, "security.capability", CAP_BLOB)
    assert os.getxattr(path, "security.capability") == CAP_BLOB
    with open(path, "r+b") as f:
        f.write(b"y")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.getxattr(path, "security.capability")
    except OSError:
        return False
    return True


def test_write_removes_file_capabilities_as_on_the_backing_fs(protected, tmp_path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = _write_and_check_caps(plain / "f")
    assert _write_and_check_caps(protected.mnt / "f") == expected
    assert (b"security.capability" in [os.fsencode(n) for n in
                                       os.listxattr(protected.source / "f")]) == expected
    assert protected.stop() == 0
    protected.replay_equals_source(tmp_path / "replayed")


def test_truncate_by_root_keeps_setuid_like_the_backing_fs(protected, tmp_path) -> None:
    for base in (tmp_path, protected.mnt):
        p = base / "suid"
        p.write_bytes(b"#!/bin/sh\n")
        os.chmod(p, 0o4755)
        os.truncate(p, 3)
    assert os.stat(tmp_path / "suid").st_mode == os.stat(protected.mnt / "suid").st_mode
    assert os.stat(protected.source / "suid").st_mode == os.stat(tmp_path / "suid").st_mode


def test_xattrs_read_by_the_fast_path_match_the_backing_file(protected) -> None:
    f = protected.mnt / "x"
    f.write_bytes(b"data")
    big = os.urandom(3000)  # larger than os.getxattr's first buffer: ERANGE, then retry
    os.setxattr(f, "user.big", big)
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.big") == big == os.getxattr(protected.source / "x", "user.big")
    assert os.getxattr(f, "user.empty") == b""
    with pytest.raises(OSError) as missing:
        os.getxattr(f, "user.none")
    assert missing.value.errno == errno.ENODATA
    assert sorted(os.listxattr(f)) == ["user.big", "user.empty"]
    assert protected.stop() == 0
    line = [ln for ln in protected.log.read_text().splitlines() if "fast path answered" in ln]
    counts = dict(reversed(c.split()) for c in line[-1].split("answered ")[1].split(", "))
    assert int(counts["getxattrs"]) > 0  # answered in C


def test_fallocate_through_the_mount_is_captured_and_replayed(protected, tmp_path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    f = protected.mnt / "sparse"
    f.write_bytes(os.urandom(64 << 10))
    with open(f, "r+b") as fh:
        for mode, off, length in ((0, 0, 1 << 20), (0x01 | 0x02, 4096, 8192), (0x10, 0, 4096)):
            rc = libc.fallocate(fh.fileno(), mode, ctypes.c_int64(off), ctypes.c_int64(length))
            assert rc == 0, os.strerror(ctypes.get_errno())
    assert protected.stop() == 0
    protected.replay_equals_source(tmp_path / "replayed")
    replayed = (tmp_path / "replayed" / "sparse").read_bytes()
    assert replayed == (protected.source / "sparse").read_bytes()
    assert len(replayed) == 1 << 20 and replayed[4096:12288] == bytes(8192)
