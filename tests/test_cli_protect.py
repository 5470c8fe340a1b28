"""`zfsrep protect` as an administrator runs it: background daemon, clean stops, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FUSERMOUNT, ProtectedMount, is_mounted, zfsrep

pytestmark = pytest.mark.mount


def _daemon_pid(mnt: Path) -> int:
    out = subprocess.run(["pgrep", "-f", f"zfsrep.cli protect {mnt} "], capture_output=True,
                         text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.05)


def test_background_protect_returns_when_ready_and_unmount_flushes(tmp_path: Path) -> None:
    src, mnt, spool = tmp_path / "src", tmp_path / "mnt", tmp_path / "spool"
    src.mkdir()
    mnt.mkdir()
    try:
        out = zfsrep("protect", "--source", str(src), "--spool", str(spool), str(mnt))
        assert "protecting" in out.stdout
        assert is_mounted(mnt)
        pid = _daemon_pid(mnt)
        (mnt / "f").write_bytes(b"data" * 1000)
        subprocess.run([FUSERMOUNT, "-u", str(mnt)], check=True)
        _wait_gone(pid)
        assert "stopped:" in (spool / "mountd.log").read_text()
        zfsrep("replay", str(spool), str(tmp_path / "out"))
        assert (tmp_path / "out" / "f").read_bytes() == b"data" * 1000
    finally:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(mnt)])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_flushes_and_exits_zero(mount_factory, tmp_path: Path, sig) -> None:
    m: ProtectedMount = mount_factory(f"sig{int(sig)}")
    m.start()
    (m.mnt / "f").write_bytes(os.urandom(1 << 20))
    m.proc.send_signal(sig)
    assert m.proc.wait(timeout=30) == 0
    assert not is_mounted(m.mnt)
    m.returncode, m.proc = 0, None
    m.replay_equals_source(tmp_path / f"out{int(sig)}")


def test_missing_source_is_exit_3_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    proc = zfsrep("protect", "--source", str(tmp_path / "nope"), "--spool",
                  str(tmp_path / "spool"), str(tmp_path / "mnt"), check=False)
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_already_mounted_is_exit_4(protected) -> None:
    proc = zfsrep("protect", "--source", str(protected.source), "--spool",
                  str(protected.spool), str(protected.mnt), check=False)
    assert proc.returncode == 4, proc.stderr
    assert "already a mount point" in proc.stderr


def test_one_directory_one_mount_one_spool(protected, tmp_path: Path) -> None:
    """A second mount of a protected directory (at another mount point, over the directory
    itself, or of the mount) or a second daemon on its spool is refused, exit 4, and nothing
    is mounted: each would capture only the changes made through it."""
    second = tmp_path / "second"
    second.mkdir()
    attempts = [
        (["--source", str(protected.source), "--spool", str(tmp_path / "s2"), str(second)],
         "is protected by another mount daemon"),
        (["--source", str(protected.source), "--spool", str(tmp_path / "s3"),
          str(protected.source)], "is protected by another mount daemon"),
        (["--source", str(tmp_path / "elsewhere"), "--spool", str(protected.spool),
          str(second)], "is in use by another mount daemon"),
        (["--source", str(protected.mnt), "--spool", str(tmp_path / "s4"), str(second)],
         "is a zfsrep mount"),
    ]
    (tmp_path / "elsewhere").mkdir()
    for args, message in attempts:
        proc = zfsrep("protect", *args, check=False)
        assert proc.returncode == 4 and message in proc.stderr, (args, proc.stderr)
        assert not is_mounted(second)
    assert not is_mounted(protected.source)
    (protected.mnt / "still").write_text("the first mount serves on\n")
    assert (protected.source / "still").exists()


def test_spool_of_another_directory_is_refused(mount_factory, tmp_path: Path) -> None:
    m = mount_factory("first")
    m.start()
    assert m.stop() == 0
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "mnt2").mkdir()
    proc = zfsrep("protect", "--source", str(other), "--spool", str(m.spool),
                  str(tmp_path / "mnt2"), check=False)
    assert proc.returncode == 4, proc.stderr
    assert "belongs to" in proc.stderr
    assert not is_mounted(tmp_path / "mnt2")


def test_spool_inside_source_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    proc = zfsrep("protect", "--source", str(tmp_path / "src"), "--spool",
                  str(tmp_path / "src" / "spool"), str(tmp_path / "mnt"), check=False)
    assert proc.returncode == 2
    assert "inside the protected source" in proc.stderr


def test_no_capture_is_a_plain_passthrough(mount_factory) -> None:
    """--no-capture (the benchmarks' baseline): the mount serves, nothing is spooled."""
    m = mount_factory("plain", capture=False)
    m.start()
    (m.mnt / "f").write_bytes(b"x" * 100000)
    os.truncate(m.mnt / "f", 10)
    assert (m.source / "f").read_bytes() == b"x" * 10
    assert m.stop() == 0
    assert not m.spool.exists()


def test_help_explains_protect() -> None:
    out = subprocess.run([sys.executable, "-m", "zfsrep.cli", "protect", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "fusermount3 -u" in out and "--spool" in out


def test_full_spool_stops_capture_but_never_the_application(mount_factory, tmp_path) -> None:
    """A spool that cannot be written ends capture, not the mount (DESIGN invariant 5), and
    marks the spool so that nothing replays or continues it as if it were whole."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        m = mount_factory("full")
        m.spool = small / "spool"
        m.expected_log = ["capture stopped after record", "could not mark the spool"]
        m.start()
        with open(m.mnt / "big", "wb") as f:
            for _ in range(24):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        (m.mnt / "after").write_text("still served")
        assert (m.mnt / "after").read_text() == "still served"
        assert os.path.getsize(m.source / "big") == 24 << 20
        assert m.stop() == 0
        assert "capture stopped after record" in m.log.read_text()
        proc = zfsrep("replay", str(m.spool), str(tmp_path / "out"), check=False)
        assert proc.returncode == 4 and "incomplete" in proc.stderr
        assert not (tmp_path / "out").exists()
        proc = zfsrep("protect", "--source", str(m.source), "--spool", str(m.spool),
                      str(m.mnt), "--foreground", check=False)
        assert proc.returncode == 4 and "incomplete" in proc.stderr
        assert not is_mounted(m.mnt)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_mounting_over_the_source_directory_itself(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "before").write_text("was here")
    spool = tmp_path / "spool"
    try:
        zfsrep("protect", "--source", str(data), "--spool", str(spool), str(data))
        assert is_mounted(data)
        assert (data / "before").read_text() == "was here"
        (data / "after").write_text("through the mount")
        subprocess.run([FUSERMOUNT, "-u", str(data)], check=True)
        deadline = time.monotonic() + 30
        while "stopped:" not in (spool / "mountd.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        if is_mounted(data):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(data)])
    assert (data / "after").read_text() == "through the mount"  # now the plain directory
    zfsrep("replay", str(spool), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["after", "before"]
