"""The mount negotiates FUSE_HANDLE_KILLPRIV_V2 and then kills privileges itself."""

from __future__ import annotations

import contextlib
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


def _fast_counts(protected) -> dict[str, int]:
    line = [ln for ln in protected.log.read_text().splitlines() if "fast path answered" in ln]
    return {k: int(v) for k, v in
            (reversed(c.split()) for c in line[-1].split("answered ")[1].split(", "))}


def test_lookups_of_absent_names_are_answered_in_c_as_the_backing_dir_would(
        protected) -> None:
    """Absent names are answered ENOENT by the fast path, in the root and in directories
    made, renamed and removed through the mount; everything else reaches Python, which
    keeps its errno (a name too long, a file used as a directory) and its objects."""
    mnt = protected.mnt
    for path in (mnt / "absent", mnt / "d" / "x"):
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    (mnt / "d").mkdir()
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "d" / "x")
    (mnt / "d" / "x").write_bytes(b"1")
    assert (mnt / "d" / "x").read_bytes() == b"1"  # cached as absent nowhere
    os.rename(mnt / "d", mnt / "e")
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "d" / "x")
    assert (mnt / "e" / "x").read_bytes() == b"1"
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "e" / "y")
    with pytest.raises(OSError) as long_name:
        os.stat(mnt / "e" / ("n" * 300))
    assert long_name.value.errno == errno.ENAMETOOLONG
    with pytest.raises(NotADirectoryError):
        os.stat(mnt / "e" / "x" / "y")
    os.unlink(mnt / "e" / "x")
    os.rmdir(mnt / "e")
    for path in (mnt / "e", mnt / "e" / "x"):
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    (mnt / "e").mkdir()  # the name comes back as a new directory
    (mnt / "e" / "z").write_bytes(b"2")
    os.sync()
    assert (protected.source / "e" / "z").read_bytes() == b"2"
    assert protected.stop() == 0
    assert _fast_counts(protected)["lookups"] >= 5


def test_absent_names_stay_absent_in_the_kernel_until_created(protected) -> None:
    """The fast path's "no such name" is a negative entry the kernel keeps (for the entry
    timeout): looking the name up again does not reach the daemon; creating it through the
    mount replaces it at once."""
    mnt = protected.mnt
    for _ in range(50):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "absent")
    (mnt / "absent").write_bytes(b"now")
    assert (mnt / "absent").read_bytes() == b"now"
    os.unlink(mnt / "absent")
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "absent")
    os.mkdir(mnt / "absent")
    assert (mnt / "absent").is_dir()
    assert protected.stop() == 0
    assert 1 <= _fast_counts(protected)["lookups"] <= 3


def _open_backing_files(pid: int, source: Path) -> list[str]:
    """The daemon's descriptors of files in ``source`` opened for I/O (not O_PATH)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = next(int(ln.split()[1], 8) for ln in
                         Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                         if ln.startswith("flags:"))
            if target.startswith(str(source) + "/") and not flags & os.O_PATH:
                out.append(target)
    return out


def test_releases_answered_in_c_close_the_backing_files_soon(protected) -> None:
    """RELEASE is answered by the fast path; the daemon closes the backing descriptors
    within RELEASE_CLOSE_S (and before it opens another file or counts open files), so an
    unlinked file's space comes back soon after its last close, as on the backing dir."""
    pid = protected.proc.pid
    names = [protected.mnt / f"f{i}" for i in range(50)]
    for p in names:
        p.write_bytes(b"x" * 100)
    with open(protected.mnt / "doomed", "wb") as doomed:
        doomed.write(b"y" * 4096)
        doomed.flush()
        os.unlink(protected.mnt / "doomed")
        assert any("doomed (deleted)" in t
                   for t in _open_backing_files(pid, protected.source))
    deadline = time.monotonic() + 10
    while _open_backing_files(pid, protected.source) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_backing_files(pid, protected.source) == []
    with open(names[7], "rb") as f:  # opening collects whatever is left, then goes on
        assert f.read() == b"x" * 100
        assert len(_open_backing_files(pid, protected.source)) == 1
    assert protected.stop() == 0
    assert _fast_counts(protected)["releases"] >= 50


def test_other_tasks_run_while_python_requests_follow_each_other(protected) -> None:
    """pyfuse3 takes requests that follow each other without trio's scheduler
    (mountd.fusehook: SessionHook._wait_less), but only so many in a row: while an
    application keeps the Python handlers busy without a pause, the capture stream's
    periodic flush (a trio task) still writes its records to the spool."""
    f = protected.mnt / "f"
    f.write_bytes(b"x")
    segments = protected.spool / "segments"

    def spooled() -> int:
        return sum(p.stat().st_size for p in segments.iterdir())

    before = spooled()
    deadline = time.monotonic() + 10
    mode = 0o600
    while spooled() == before and time.monotonic() < deadline:
        for _ in range(50):  # chmod: SETATTR of the mode, always answered in Python
            mode ^= 0o044
            os.chmod(f, mode)
    assert spooled() > before
