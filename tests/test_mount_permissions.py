"""Real-mount tests of ownership and permissions for callers other than root.

The daemon runs as root and creates everything itself, so the mount must give new objects the
caller's owner and group (or a set-group-id directory's group), and the kernel's permission
checks (``default_permissions``) must refuse exactly what the backing filesystem would refuse.
The oracle is a plain directory next to the mount, prepared identically, on which the same user
runs the same operations: results, errno values and resulting owners/modes must be equal.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ProtectedMount
from treesnap import diff_trees, tree_snapshot

pytestmark = pytest.mark.mount

USER, OTHER, GROUP = "zfsrep-test", "zfsrep-test2", "zfsrep-tgrp"
OK = 0
# The child runs as an unprivileged user, who may not be able to reach the test interpreter
# (a venv under /root): use a system interpreter when there is one; the child needs only stdlib.
CHILD_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                     if os.access(p, os.X_OK)), sys.executable)

# Run in the child: execute each statement with D bound to the directory under test and
# report 0 or the errno it failed with.
_CHILD = r"""
import json, os, socket, sys
D = sys.argv[1]
out = []
for stmt in json.loads(sys.argv[2]):
    try:
        exec(stmt, {"os": os, "socket": socket, "D": D})
        out.append(0)
    except OSError as e:
        out.append(e.errno)
print(json.dumps(out))
"""


def _ensure_accounts() -> None:
    """Create the test users and group once (idempotent; they are left for later runs)."""
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    for name in (USER, OTHER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", name], check=True)
    if USER not in grp.getgrnam(GROUP).gr_mem:
        subprocess.run(["usermod", "-a", "-G", GROUP, USER], check=True)


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, name: str) -> Account:
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))

    def run(self, directory: Path, *stmts: str) -> list[int]:
        """Run statements as this user (umask 022) against ``directory``; their errnos."""
        proc = subprocess.run([CHILD_PYTHON, "-I", "-c", _CHILD, str(directory), json.dumps(stmts)],
                              user=self.uid, group=self.gid, extra_groups=list(self.groups),
                              umask=0o022, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def accounts() -> dict[str, Account]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create users and switch to them")
    _ensure_accounts()
    return {"user": Account.of(USER), "other": Account.of(OTHER),
            "group": grp.getgrnam(GROUP).gr_gid}


@dataclass
class Site:
    """A protected mount usable by all users, and a plain directory prepared the same way."""

    mount: ProtectedMount
    plain: Path

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.mount.mnt, self.plain

    def prepare(self, fn: Callable[[Path], None]) -> None:
        """Do the same setup (as root) through the mount and in the plain directory."""
        for root in self.roots:
            fn(root)

    def both(self, account: Account, *stmts: str) -> list[int]:
        """Run as ``account`` on the mount and on the plain dir; the results must agree."""
        on_mount = account.run(self.mount.mnt, *stmts)
        on_plain = account.run(self.plain, *stmts)
        assert on_mount == on_plain, list(zip(stmts, on_mount, on_plain, strict=True))
        return on_mount

    def owner_mode(self, rel: str) -> tuple[tuple[int, int, int], ...]:
        """(uid, gid, mode) of ``rel`` in the mount, the backing dir and the plain dir."""
        out = []
        for root in (self.mount.mnt, self.mount.source, self.plain):
            st = os.lstat(root / rel)
            out.append((st.st_uid, st.st_gid, st.st_mode))
        return tuple(out)

    def check_mount_and_replay(self) -> None:
        m = self.mount
        diffs = diff_trees(tree_snapshot(m.mnt), tree_snapshot(m.source))
        assert not diffs, "mount and backing directory differ:\n" + "\n".join(diffs)
        subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True, timeout=30)
        assert m.proc.wait(timeout=60) == 0  # proc is kept: the teardown collects it again
        m.replay_equals_source(m.mnt.parent / "replayed")


@pytest.fixture
def site(accounts):
    """A mount with --allow-other under a world-traversable /var/tmp directory."""
    base = Path(tempfile.mkdtemp(prefix="zfsrep-tests-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        plain = base / "plain"
        plain.mkdir(mode=0o755)
        mount = ProtectedMount(base, extra=("--allow-other",))
        mount.start()
        try:
            yield Site(mount, plain)
        finally:
            code = mount.stop()
        assert code == 0, f"mount daemon exited {code}:\n{mount.log.read_text()}"
        problems = mount.log_problems()
        assert not problems, "unexpected warnings or errors in the daemon log:\n" + "\n".join(
            problems)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def mkdir_owned(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    os.mkdir(path)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # after chown: chown may clear set-id bits


def file_owned(path: Path, mode: int, uid: int = 0, gid: int = 0, data: bytes = b"") -> None:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


# ---- ownership of new objects ----------------------------------------------------------------
def test_new_objects_belong_to_the_caller(site, accounts):
    user = accounts["user"]
    site.prepare(lambda r: mkdir_owned(r / "pub", 0o777))
    assert site.both(user,
                     "os.close(os.open(D + '/pub/f', os.O_CREAT | os.O_WRONLY, 0o666))",
                     "os.mkdir(D + '/pub/d')",
                     "os.symlink('f', D + '/pub/l')",
                     "os.mkfifo(D + '/pub/p')",
                     "os.link(D + '/pub/f', D + '/pub/f2')") == [OK] * 5
    for rel in ("pub/f", "pub/d", "pub/l", "pub/p", "pub/f2"):
        on_mount, on_backing, on_plain = site.owner_mode(rel)
        assert on_mount == on_backing == on_plain, rel
        assert on_backing[:2] == (user.uid, user.gid), rel
    site.check_mount_and_replay()


def test_socket_bound_by_user_belongs_to_user(site, accounts):
    user = accounts["user"]
    site.prepare(lambda r: mkdir_owned(r / "pub", 0o777))
    assert site.both(user, "socket.socket(socket.AF_UNIX).bind(D + '/pub/s')") == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("pub/s")
    assert on_mount == on_backing == on_plain
    assert on_backing[:2] == (user.uid, user.gid) and stat.S_ISSOCK(on_backing[2])


def test_setgid_directory_gives_its_group_and_bit(site, accounts):
    other, group = accounts["other"], accounts["group"]
    site.prepare(lambda r: mkdir_owned(r / "sg", 0o2777, 0, group))
    assert site.both(other,
                     "os.close(os.open(D + '/sg/f', os.O_CREAT | os.O_WRONLY, 0o644))",
                     "os.mkdir(D + '/sg/sub')",
                     "os.mkdir(D + '/sg/sub/deeper')",
                     "os.symlink('f', D + '/sg/l')",
                     "os.mkfifo(D + '/sg/p')") == [OK] * 5
    for rel in ("sg/f", "sg/sub", "sg/sub/deeper", "sg/l", "sg/p"):
        on_mount, on_backing, on_plain = site.owner_mode(rel)
        assert on_mount == on_backing == on_plain, rel
        assert on_backing[:2] == (other.uid, group), rel
    assert os.stat(site.mount.source / "sg/sub/deeper").st_mode & stat.S_ISGID
    site.check_mount_and_replay()


def test_non_member_new_file_in_setgid_dir_loses_setgid(site, accounts):
    other, group = accounts["other"], accounts["group"]
    site.prepare(lambda r: mkdir_owned(r / "sg", 0o2777, 0, group))
    assert site.both(other, "os.close(os.open(D + '/sg/f', os.O_CREAT | os.O_WRONLY, 0o2755))"
                     ) == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("sg/f")
    assert on_mount == on_backing == on_plain
    assert on_backing == (other.uid, group, stat.S_IFREG | 0o755)


def test_member_new_file_in_setgid_dir_of_primary_group_keeps_setgid(site, accounts):
    user = accounts["user"]
    site.prepare(lambda r: mkdir_owned(r / "sg", 0o2777, 0, user.gid))
    assert site.both(user, "os.close(os.open(D + '/sg/f', os.O_CREAT | os.O_WRONLY, 0o2755))"
                     ) == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("sg/f")
    assert on_mount == on_backing == on_plain
    assert on_backing == (user.uid, user.gid, stat.S_IFREG | 0o2755)


def test_member_new_file_in_setgid_dir_of_supplementary_group_keeps_setgid(site, accounts):
    user, group = accounts["user"], accounts["group"]
    site.prepare(lambda r: mkdir_owned(r / "sg", 0o2777, 0, group))
    assert site.both(user, "os.close(os.open(D + '/sg/f', os.O_CREAT | os.O_WRONLY, 0o2755))"
                     ) == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("sg/f")
    assert on_plain == (user.uid, group, stat.S_IFREG | 0o2755)
    assert on_backing == on_plain
    assert on_mount == on_backing


def test_root_creating_in_setgid_directory_gets_its_group(site, accounts):
    group = accounts["group"]
    site.prepare(lambda r: mkdir_owned(r / "sg", 0o2775, 0, group))
    site.prepare(lambda r: (r / "sg" / "f").write_bytes(b"x"))
    site.prepare(lambda r: (r / "sg" / "d").mkdir())
    for rel in ("sg/f", "sg/d"):
        on_mount, on_backing, on_plain = site.owner_mode(rel)
        assert on_mount == on_backing == on_plain, rel
        assert on_backing[:2] == (0, group)


# ---- permission checks -----------------------------------------------------------------------
def test_permission_denied_cases_match_plain(site, accounts):
    user, other = accounts["user"], accounts["other"]

    def setup(r: Path) -> None:
        mkdir_owned(r / "rootdir", 0o755)
        mkdir_owned(r / "pub", 0o777)
        file_owned(r / "pub" / "ro-mine", 0o444, user.uid, user.gid, b"x")
        file_owned(r / "pub" / "ro-other", 0o444, other.uid, other.gid, b"x")
        file_owned(r / "pub" / "secret", 0o600, other.uid, other.gid, b"x")
        mkdir_owned(r / "private", 0o700, other.uid, other.gid)
        mkdir_owned(r / "tmp", 0o1777)
        file_owned(r / "tmp" / "others", 0o666, other.uid, other.gid, b"x")
        mkdir_owned(r / "tmp" / "othersdir", 0o777, other.uid, other.gid)

    site.prepare(setup)
    results = site.both(
        user,
        "open(D + '/pub/ro-mine', 'ab')",
        "open(D + '/pub/ro-other', 'wb')",
        "os.truncate(D + '/pub/ro-other', 0)",
        "open(D + '/pub/secret', 'rb')",
        "open(D + '/rootdir/new', 'wb')",
        "os.mkdir(D + '/rootdir/new')",
        "os.listdir(D + '/private')",
        "os.stat(D + '/private/x')",
        "os.unlink(D + '/tmp/others')",
        "os.rename(D + '/tmp/others', D + '/tmp/mine')",
        "os.rmdir(D + '/tmp/othersdir')",
        "os.link(D + '/pub/secret', D + '/pub/hardlink')",
        "open(D + '/tmp/others', 'ab').write(b'ok')",  # writable by all: allowed
    )
    assert results[:12] == [13, 13, 13, 13, 13, 13, 13, 13, 1, 1, 1, 1]
    assert results[12] == OK
    assert (site.mount.source / "tmp" / "others").read_bytes() == b"xok"


def test_chmod_chown_and_utime_rules_match_plain(site, accounts):
    user, other, group = accounts["user"], accounts["other"], accounts["group"]

    def setup(r: Path) -> None:
        mkdir_owned(r / "pub", 0o777)
        file_owned(r / "pub" / "mine", 0o644, user.uid, user.gid)
        file_owned(r / "pub" / "theirs", 0o666, other.uid, other.gid)

    site.prepare(setup)
    results = site.both(
        user,
        "os.chmod(D + '/pub/theirs', 0o777)",
        f"os.chown(D + '/pub/mine', {other.uid}, -1)",
        "os.chown(D + '/pub/mine', -1, 0)",
        f"os.chown(D + '/pub/mine', -1, {group})",
        "os.chmod(D + '/pub/mine', 0o2755)",
        "os.utime(D + '/pub/theirs', ns=(1, 1))",
        "os.utime(D + '/pub/theirs')",  # "now" needs only write permission
        f"os.chown(D + '/pub/mine', {user.uid}, {user.gid})",
        "os.chmod(D + '/pub/mine', 0o2755)",  # chown cleared set-group-id; set it again
    )
    assert results == [1, 1, 1, OK, OK, 1, OK, OK, OK]
    on_mount, on_backing, on_plain = site.owner_mode("pub/mine")
    assert on_mount == on_backing == on_plain
    assert on_backing == (user.uid, user.gid, stat.S_IFREG | 0o2755)
    site.check_mount_and_replay()


def test_chmod_setgid_for_foreign_group_is_dropped(site, accounts):
    user = accounts["user"]
    site.prepare(lambda r: mkdir_owned(r / "pub", 0o777))
    site.prepare(lambda r: file_owned(r / "pub" / "f", 0o644, user.uid, 0))
    assert site.both(user, "os.chmod(D + '/pub/f', 0o2755)") == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("pub/f")
    assert on_mount == on_backing == on_plain
    assert on_backing[2] == stat.S_IFREG | 0o755


# ---- set-id bits -----------------------------------------------------------------------------
def test_write_by_non_owner_clears_setuid(site, accounts):
    user, other = accounts["user"], accounts["other"]

    def setup(r: Path) -> None:
        mkdir_owned(r / "pub", 0o777)
        file_owned(r / "pub" / "suid", 0o4777, other.uid, other.gid, b"data")
        file_owned(r / "pub" / "sgid", 0o2777, other.uid, other.gid, b"data")
        file_owned(r / "pub" / "trunc", 0o4777, other.uid, other.gid, b"data")

    site.prepare(setup)
    assert site.both(user,
                     "open(D + '/pub/suid', 'r+b').write(b'X')",
                     "open(D + '/pub/sgid', 'r+b').write(b'X')",
                     "os.truncate(D + '/pub/trunc', 1)") == [OK] * 3
    for rel, mode in (("pub/suid", 0o777), ("pub/sgid", 0o777), ("pub/trunc", 0o777)):
        on_mount, on_backing, on_plain = site.owner_mode(rel)
        assert on_plain[2] == stat.S_IFREG | mode, rel  # what the kernel does on a plain dir
        assert on_backing == on_plain, rel
        assert on_mount == on_backing, rel
    assert (site.mount.source / "pub/suid").read_bytes() == b"Xata"
    site.check_mount_and_replay()


def test_open_trunc_by_non_owner_clears_setuid(site, accounts):
    user, other = accounts["user"], accounts["other"]
    site.prepare(lambda r: mkdir_owned(r / "pub", 0o777))
    site.prepare(lambda r: file_owned(r / "pub" / "f", 0o4777, other.uid, other.gid, b"data"))
    assert site.both(user, "open(D + '/pub/f', 'wb').close()") == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("pub/f")
    assert on_plain[2] == stat.S_IFREG | 0o777
    assert on_backing == on_plain
    assert on_mount == on_backing


def test_direct_io_write_by_non_owner_clears_setuid(site, accounts):
    user, other = accounts["user"], accounts["other"]
    site.prepare(lambda r: mkdir_owned(r / "pub", 0o777))
    site.prepare(lambda r: file_owned(r / "pub" / "f", 0o4777, other.uid, other.gid,
                                      b"d" * 4096))
    assert site.both(user,
                     "fd = os.open(D + '/pub/f', os.O_WRONLY | os.O_DIRECT)\n"
                     "buf = __import__('mmap').mmap(-1, 4096)\n"
                     "os.pwrite(fd, buf, 0)\n"
                     "os.close(fd)") == [OK]
    on_mount, on_backing, on_plain = site.owner_mode("pub/f")
    assert on_plain[2] == stat.S_IFREG | 0o777
    assert on_backing == on_plain
    assert on_mount == on_backing
    assert (site.mount.source / "pub/f").read_bytes() == bytes(4096)


def test_chown_by_root_clears_setuid(site, accounts):
    user, group = accounts["user"], accounts["group"]

    def setup(r: Path) -> None:
        file_owned(r / "suid", 0o4755)
        file_owned(r / "sgid", 0o2755)
        os.chown(r / "suid", user.uid, -1)
        os.chown(r / "sgid", -1, group)

    site.prepare(setup)
    for rel in ("suid", "sgid"):
        on_mount, on_backing, on_plain = site.owner_mode(rel)
        assert on_plain[2] == stat.S_IFREG | 0o755, rel
        assert on_mount == on_backing == on_plain, rel
    site.check_mount_and_replay()
