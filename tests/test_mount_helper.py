"""mount.zfsrep, the mount(8) helper: its options, and a real mount started the way mount(8)
starts it and stopped with umount(8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FUSERMOUNT, is_mounted, zfsrep
from zfsrep.mountd.helper import HelperError, main, parse_args, protect_argv


def test_options_become_protect_arguments() -> None:
    argv = protect_argv("/srv/d", "/srv/d", "rw,spool=/var/sp,vpg=prod,volume=d,"
                        "server=10.0.0.5:7450,memory_limit=32,spool-limit=512,allow_other,"
                        "log=/var/log/d.log")
    assert argv == ["protect", "/srv/d", "--source", "/srv/d", "--spool", "/var/sp",
                    "--vpg", "prod", "--volume", "d", "--server", "10.0.0.5:7450",
                    "--memory-limit", "32", "--spool-limit", "512", "--allow-other",
                    "--log", "/var/log/d.log"]


def test_generic_mount_options_are_accepted_and_ignored() -> None:
    argv = protect_argv("/a", "/b", "defaults,noauto,nofail,_netdev,nosuid,nodev,noatime,"
                        "x-systemd.automount,comment=backup,spool=/s")
    assert argv == ["protect", "/b", "--source", "/a", "--spool", "/s"]


@pytest.mark.parametrize("options, message", [
    ("spool=/s,ro", "cannot be read-only"),
    ("spool=/s,bogus", "unknown option 'bogus'"),
    ("spool=/s,allow_other=1", "unknown option"),
    ("noatime", r"spool=DIR \(or vpg=NAME\) is required"),
    ("spool=", "needs a value"),
    ("spool=/a,spool=/b", "given twice"),
])
def test_bad_options_are_refused(options: str, message: str) -> None:
    with pytest.raises(HelperError, match=message):
        protect_argv("/a", "/b", options)


def test_sloppy_ignores_unknown_options_but_not_ro() -> None:
    assert protect_argv("/a", "/b", "spool=/s,bogus", sloppy=True)[-2:] == ["--spool", "/s"]
    with pytest.raises(HelperError):
        protect_argv("/a", "/b", "spool=/s,ro", sloppy=True)


def test_mount_calling_convention() -> None:
    assert parse_args(["/a", "/b", "-o", "spool=/s", "-o", "rw"]) == (
        "/a", "/b", "spool=/s,rw", {"sloppy": False, "fake": False, "verbose": False})
    assert parse_args(["/a", "-sfnv", "/b", "-ospool=/s", "-t", "zfsrep"]) == (
        "/a", "/b", "spool=/s", {"sloppy": True, "fake": True, "verbose": True})
    for bad in (["/a"], ["/a", "/b", "/c"], ["/a", "/b", "-o"], ["/a", "/b", "-x"],
                ["/a", "/b", "-N", "1234"]):
        with pytest.raises(HelperError):
            parse_args(bad)


def test_exit_codes_follow_mount(capsys) -> None:
    assert main(["/a", "/b", "-o", "bogus"], run=lambda argv: 0) == 1
    assert "mount.zfsrep: unknown option" in capsys.readouterr().err
    assert main(["/a", "/b", "-f", "-o", "spool=/s"], run=lambda argv: 99) == 0  # fake
    assert "zfsrep protect /b --source /a --spool /s" in capsys.readouterr().err
    assert main(["/a", "/b", "-o", "spool=/s"], run=lambda argv: 0) == 0
    assert main(["/a", "/b", "-o", "spool=/s"], run=lambda argv: 2) == 1  # usage
    assert main(["/a", "/b", "-o", "spool=/s"], run=lambda argv: 3) == 32  # not found
    assert main(["/a", "/b", "-o", "spool=/s"], run=lambda argv: 6) == 32


@pytest.mark.mount
def test_a_mount_started_like_mount8_and_stopped_with_umount(tmp_path: Path) -> None:
    """The helper as mount(8) runs it returns once the mount serves; umount(8) stops the
    daemon, which flushes what it captured: the spool then rebuilds the directory."""
    source, mnt, spool = tmp_path / "src", tmp_path / "mnt", tmp_path / "spool"
    source.mkdir()
    mnt.mkdir()
    helper = [sys.executable, "-m", "zfsrep.mountd.helper"]
    try:
        r = subprocess.run([*helper, str(source), str(mnt), "-n", "-o",
                            f"rw,noatime,spool={spool},memory_limit=16"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        (mnt / "hello").write_bytes(b"protected through fstab\n")
        os.mkdir(mnt / "d")
        os.symlink("../hello", mnt / "d" / "link")
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while _daemon_of(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _daemon_of(mnt), "the daemon did not exit after umount"
    finally:
        if is_mounted(mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(mnt)], check=False)
    assert (source / "hello").read_bytes() == b"protected through fstab\n"
    rebuilt = tmp_path / "rebuilt"
    summary = json.loads(zfsrep("replay", str(spool), str(rebuilt), "--json").stdout)
    assert summary["records"] >= 3
    assert (rebuilt / "hello").read_bytes() == b"protected through fstab\n"
    assert os.readlink(rebuilt / "d" / "link") == "../hello"
    problems = [ln for ln in (spool / "mountd.log").read_text().splitlines()
                if " ERROR " in ln or "Traceback" in ln]
    assert not problems, problems

    # a second mount over a directory that is not there fails with mount's code 32
    r = subprocess.run([*helper, str(tmp_path / "missing"), str(mnt), "-o", f"spool={spool}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 32 and "does not exist" in r.stderr and not is_mounted(mnt)


def _daemon_of(mnt: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", f"protect {mnt} "], capture_output=True, text=True)
    return bool(out.stdout.strip())
