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
    assert int(line[-1].split(", ")[-1].split()[0]) > 0  # getxattrs answered in C
