#!/usr/bin/env python3
"""The README's main job, end to end: protect a directory, change it through the mount, show
the captured stream, rebuild the directory from the stream and compare.

Runs the real `zfsrep` commands (as an administrator would) in a work directory that it clears
first, so it can be run any number of times. Usage: tools/demo.py [WORKDIR]
"""

from __future__ import annotations

import hashlib
import os
import shutil
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
            out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid,
                                             st.st_size, st.st_mtime_ns, content, xattrs,
                                             st.st_nlink)
    return out


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work").resolve()
    source, mnt, spool, rebuilt = (work / n for n in ("source", "mnt", "spool", "rebuilt"))
    if work.exists():
        unmount(mnt)
        shutil.rmtree(work)
    for d in (source, mnt):
        d.mkdir(parents=True)
    (source / "existing.txt").write_text("this file was here before protection\n")

    print(f"demo work directory: {work}")
    run("protect", "--source", str(source), "--spool", str(spool), str(mnt))

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

    print(f"\n$ fusermount3 -u {mnt}    # stop: the daemon flushes what it captured")
    unmount(mnt)
    wait_for_daemon_exit(spool)

    run("spool", "show", str(spool), "--records", "12")
    run("replay", str(spool), str(rebuilt))

    a, b = describe(source), describe(rebuilt)
    if a != b:
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                print(f"  DIFFERS: {key}: {a.get(key)} != {b.get(key)}")
        print("\ndemo FAILED: the rebuilt directory differs from the protected one")
        return 1
    print(f"\nrebuilt directory equals the protected one: {len(a)} entries, contents, modes, "
          "owners, mtimes, links and xattrs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
