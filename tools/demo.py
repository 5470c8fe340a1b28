#!/usr/bin/env python3
"""The README's main job, end to end on the embedded default: a journal server on loopback
with a local store, a VPG, a protected directory replicating to it, changes, a tagged
checkpoint, the checkpoint list and status, a snapshot mount browsed, and a file restored.

Runs the real `zfsrep` commands (as an administrator would) in a work directory that it clears
first, so it can be run any number of times. Usage: tools/demo.py [WORKDIR]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

ZFSREP = [sys.executable, "-m", "zfsrep.cli"]


def run(*args: str) -> None:
    print(f"\n$ zfsrep {' '.join(args)}", flush=True)
    subprocess.run([*ZFSREP, *args], check=True)


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=True)
    for _ in range(600):  # the daemon flushes its capture, then the mount goes away
        if not is_mounted(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: {path} is still mounted")


def wait_for_daemon_exit(spool: Path) -> None:
    log = spool / "mountd.log"
    for _ in range(600):
        if log.exists() and "stopped:" in log.read_text():
            return
        time.sleep(0.05)
    raise SystemExit("demo: the mount daemon did not report its stop; see " + str(log))


def describe(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            else:
                content = ""
            xattrs = () if p.is_symlink() else tuple(sorted(os.listxattr(p)))
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size  # fs-specific
            out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid,
                                             size, st.st_mtime_ns, content, xattrs,
                                             st.st_nlink)
    return out


def stop_previous(work: Path) -> None:
    """Leave nothing of an earlier run: its mounts and its journal server."""
    for name in ("snapshot", "mnt"):
        if is_mounted(work / name):
            subprocess.run(["fusermount3", "-u", "-z", str(work / name)], check=False)
    pidfile = work / "server.pid"
    if pidfile.exists():
        stop_server(int(pidfile.read_text()))


def stop_server(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def capture(*args: str) -> str:
    print(f"\n$ zfsrep {' '.join(args)}", flush=True)
    out = subprocess.run([*ZFSREP, *args], check=True, capture_output=True, text=True).stdout
    print(out, end="", flush=True)
    return out


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work").resolve()
    source, mnt, spool, rebuilt, store, snap, restored = (
        work / n for n in ("source", "mnt", "spool", "rebuilt", "store", "snapshot",
                           "restored"))
    if work.exists():
        stop_previous(work)
        shutil.rmtree(work)
    for d in (source, mnt, snap, restored):
        d.mkdir(parents=True)
    (source / "existing.txt").write_text("this file was here before protection\n")
    os.environ.setdefault("ZFSREP_SERVER", "127.0.0.1:7450")
    print(f"demo work directory: {work}  (journal server {os.environ['ZFSREP_SERVER']})")
    out = capture("serve", "--store", str(store), "--listen", os.environ["ZFSREP_SERVER"])
    (work / "server.pid").write_text(out.split("(pid ")[1].split(",")[0])
    try:
        return demo(source, mnt, spool, rebuilt, snap, restored)
    finally:
        for m in (snap, mnt):
            if is_mounted(m):
                subprocess.run(["fusermount3", "-u", str(m)], check=False)
        wait_for_daemon_exit(spool)
        print("\n# the journal server stops with SIGTERM")
        stop_server(int((work / "server.pid").read_text()))


def demo(source: Path, mnt: Path, spool: Path, rebuilt: Path, snap: Path,
         restored: Path) -> int:
    run("vpg", "create", "demo", "--checkpoint-interval", "2s", "--history", "1m",
        "--rpo", "10s")
    run("protect", "--vpg", "demo", "--volume", "docs", "--source", str(source), "--spool",
        str(spool), str(mnt))

    print("\n# an application works in the protected mount")
    (mnt / "docs").mkdir()
    (mnt / "docs" / "report.txt").write_text("quarterly numbers\n" * 1000)
    with open(mnt / "docs" / "report.txt", "r+") as f:
        f.seek(18)
        f.write("CORRECTED")
    with open(mnt / "app.log", "a") as f:
        for i in range(100):
            f.write(f"event {i}\n")
    (mnt / "data.bin").write_bytes(os.urandom(3 << 20))
    os.link(mnt / "data.bin", mnt / "docs" / "data-hardlink.bin")
    os.symlink("docs/report.txt", mnt / "latest-report")
    os.setxattr(mnt / "docs" / "report.txt", "user.owner", b"finance")
    os.chmod(mnt / "app.log", 0o640)
    os.rename(mnt / "existing.txt", mnt / "docs" / "moved.txt")
    (mnt / "scratch.tmp").write_text("temporary")
    os.unlink(mnt / "scratch.tmp")
    print("  mkdir, writes, an in-place edit, appends, a hard link, a symlink, an xattr,")
    print("  chmod, a rename and an unlink")
    before = describe(source)
    good_report = (source / "docs" / "report.txt").read_bytes()
    run("tag", "demo", "before-cleanup")

    print("\n# then a mistake: the report is overwritten and the data file deleted")
    (mnt / "docs" / "report.txt").write_text("oops\n")
    os.unlink(mnt / "data.bin")
    time.sleep(2.5)  # an automatic checkpoint or two
    run("checkpoints", "--vpg", "demo")
    run("status", "demo")

    run("snapshot", "mount", "demo", "before-cleanup", str(snap))
    print(f"\n$ ls -l {snap} {snap}/docs")
    subprocess.run(["ls", "-l", str(snap), str(snap / "docs")], check=True)
    seen = describe(snap)
    run("snapshot", "umount", str(snap))
    if seen != before:
        for key in sorted(set(seen) | set(before)):
            if seen.get(key) != before.get(key):
                print(f"  DIFFERS: {key}: {before.get(key)} != {seen.get(key)}")
        print("\ndemo FAILED: the snapshot differs from the directory at the tag")
        return 1
    print(f"\nthe snapshot equals the directory at the tag: {len(seen)} entries")

    run("restore-file", "demo", "before-cleanup", "docs", "/docs/report.txt", "--to",
        str(restored))
    if (restored / "report.txt").read_bytes() != good_report:
        print("\ndemo FAILED: the restored report differs")
        return 1
    print(f"restored {restored / 'report.txt'}: the report as it was before the mistake")

    print(f"\n$ fusermount3 -u {mnt}    # stop protecting: the daemon ships what it captured")
    unmount(mnt)
    wait_for_daemon_exit(spool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
