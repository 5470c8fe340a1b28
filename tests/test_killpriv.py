"""The mount negotiates FUSE_HANDLE_KILLPRIV_V2 and then kills privileges itself."""

from __future__ import annotations

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
