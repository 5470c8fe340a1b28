"""Promotion: a live failover or move brings the volumes up before their data is copied, and
copies it in behind them (zfsrep.promote, zfsrep.mountd.promote).

The unit tests write a skeleton from a fake view and fill it; the end-to-end tests run a real
journal server, a real protected mount and the real promotion mount, with the background copy
slowed down (--promote-rate) so that the volume is seen and changed while it is promoted."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import sweep_promotions
from test_operations import _status, _wait_connected
from test_replication import VPG, assert_tree, replicated, tag
from test_snapshot_mount import REG, ROOT, FakeView, T, sample_view
from treesnap import tree_snapshot
from zfsrep.mountd.promote import Promoter

from zfsrep import promote
from zfsrep.restore import restore_tree
from zfsrep.syscalls import mount_at

MIB = 1 << 20


# ---- the skeleton and its marks, without a mount ---------------------------------------------
def test_skeleton_marks_files_and_fill_copies_them_keeping_times(tmp_path: Path) -> None:
    view = sample_view()
    tree = tmp_path / "tree"
    stats = restore_tree(view, b"/", tree, skeleton=True)
    assert (stats.marked, stats.marked_bytes) == (1, len(b"hello world"))
    f = tree / "file"
    before = os.stat(f)
    assert before.st_size == 11 and f.read_bytes() == bytes(11)  # the size, not the data
    assert os.stat(tree / "dir" / "hard").st_ino == before.st_ino
    assert os.getxattr(f, "user.colour") == b"blue"
    assert promote.marked(f) == 11
    assert promote.count_marked(tree) == (1, 11)

    assert promote.fill(view, str(f)) == 11
    assert f.read_bytes() == b"hello world"
    after = os.stat(f)
    assert after.st_mtime_ns == before.st_mtime_ns and after.st_mode == before.st_mode
    assert promote.marked(f) is None and promote.count_marked(tree) == (0, 0)


def test_a_walk_finds_every_marked_file_once_and_holds_few_descriptors(tmp_path: Path) -> None:
    root = tmp_path / "t"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(50):
            p = root / f"d{d}" / f"f{i}"
            p.write_bytes(b"x")
            if i % 2 == 0:
                fd = os.open(p, os.O_RDONLY)
                promote.mark(fd, 1000 + i)
                os.close(fd)
    (root / "d0" / "link").symlink_to("f0")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    walk = promote.Walk(fd)
    os.close(fd)
    seen = []
    while not walk.done:
        batch = walk.step(limit=7)
        assert len(batch) <= 7
        for pfd, ino, ident, size in batch:
            seen.append((ino, ident, size))
            os.close(pfd)
    assert len(seen) == 75 and len({s[0] for s in seen}) == 75
    assert {s[1] for s in seen} == {1000 + i for i in range(0, 50, 2)}


def test_a_file_map_says_which_chunks_hold_their_data() -> None:
    fm = promote.FileMap.decode((7).to_bytes(8, "little"), 10 * MIB + 5)
    assert (fm.ident, fm.limit, fm.shift) == (7, promote.NO_LIMIT, 20)
    size = 10 * MIB + 5
    assert fm.missing(0, size, size) == list(range(11))
    fm.set_filled([2, 3, 7])
    assert fm.missing(MIB, 5 * MIB, size) == [1, 4]
    assert list(fm.runs(MIB + 10, 4 * MIB + 1, size)) == [
        (MIB + 10, 2 * MIB, True), (2 * MIB, 4 * MIB, False), (4 * MIB, 4 * MIB + 1, True)]
    assert fm.unrecorded(2 * MIB, 2 * MIB + 1, size)  # filled, not yet durable
    fm.limit = 3 * MIB + 100  # past the limit the file itself is the data
    assert list(fm.runs(3 * MIB, 5 * MIB, size)) == [(3 * MIB, 5 * MIB, False)]
    assert fm.missing(0, size, size) == [0, 1]
    assert list(fm.runs(0, 5, 5)) == [(0, 5, True)]  # (a file truncated to 5 bytes)
    value = fm.encode(fm.filled)
    back = promote.FileMap.decode(value, 99)
    assert (back.ident, back.limit, back.shift) == (7, 3 * MIB + 100, 20)
    assert [k for k in range(11) if back.is_filled(k)] == [2, 3, 7]
    # the map stays small whatever the size: the chunks grow instead
    for size in (1, MIB, 16 << 30, 100 << 30, 1 << 40, (1 << 50) + 1):
        shift = promote.chunk_shift(size)
        assert shift >= 20 and -(-size >> shift) <= promote.MAX_CHUNKS, size
    with pytest.raises(ValueError):
        promote.FileMap.decode(b"\x01" * 12, 1)


def _big_skeleton(tmp_path: Path, size: int = 5 * MIB + 123):
    """A view with one file of ``size`` random bytes, its skeleton written in tmp_path."""
    view = FakeView()
    data = os.urandom(size)
    view.add(ROOT, b"big", 21, REG | 0o644, data=data, mtime_ns=T)
    tree = tmp_path / "tree"
    restore_tree(view, b"/", tree, skeleton=True)
    return view, tree, data


async def test_a_write_fills_only_the_chunks_it_touches_and_records_them_first(
        tmp_path: Path) -> None:
    view, tree, data = _big_skeleton(tmp_path)
    state = promote.StateFile(tmp_path / "promote.json")
    tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    promoter = Promoter(tree_fd, view, state)
    f = tree / "big"
    ino = os.stat(f).st_ino
    fd = os.open(f, os.O_RDWR)
    try:
        pf = promoter.lookup(ino, f"/proc/self/fd/{fd}")
        assert pf is not None and pf.fmap.ident == 21
        # reads come from the view where nothing is filled
        assert promoter.read(pf, fd, 3 * MIB - 10, 20) == data[3 * MIB - 10:3 * MIB + 10]
        # a write across chunks 2 and 3 fills those two, and records them, before it lands
        async with pf.lock:
            await promoter.before_write(pf, fd, 3 * MIB - 2, 4)
            os.pwrite(fd, b"WXYZ", 3 * MIB - 2)
        assert [k for k in range(6) if pf.fmap.is_filled(k)] == [2, 3]
        on_disk = promote.read_map(f)
        assert on_disk is not None and [k for k in range(6) if on_disk.is_filled(k)] == [2, 3]
        assert os.pread(fd, 10, 0) == bytes(10)  # chunk 0 is not filled in the file itself
        expect = bytearray(data)
        expect[3 * MIB - 2:3 * MIB + 2] = b"WXYZ"
        assert promoter.read(pf, fd, 0, len(data)) == bytes(expect)
        # a write past the end records where the view stops before the file grows
        size = len(data)
        async with pf.lock:
            await promoter.before_write(pf, fd, size + 10, 3)
            os.pwrite(fd, b"end", size + 10)
        assert promote.read_map(f).limit == size
        expect += bytes(10) + b"end"
        assert promoter.read(pf, fd, 0, 2 * size) == bytes(expect)
    finally:
        os.close(fd)
    # a daemon started again goes on from the map: the chunks written are never filled over
    promoter.close()
    again = Promoter(tree_fd, view, promote.StateFile(tmp_path / "promote.json"))
    await again.run()
    assert promote.marked(f) is None and f.read_bytes() == bytes(expect)
    assert os.stat(f).st_mtime_ns != T  # (the write changed it; the fills keep it)
    again.close()
    os.close(tree_fd)


async def test_truncation_and_o_trunc_keep_the_view_out_of_what_the_file_now_holds(
        tmp_path: Path) -> None:
    view, tree, data = _big_skeleton(tmp_path)
    tree_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    promoter = Promoter(tree_fd, view, promote.StateFile(tmp_path / "promote.json"))
    f = tree / "big"
    ino = os.stat(f).st_ino
    pf = promoter.lookup(ino, str(f))
    assert pf is not None
    # shrink (nothing recorded), then grow: the grown part is zeros, not the old data
    async with pf.lock:
        await promoter.before_resize(pf, os.fsencode(f), 2 * MIB + 7)
        os.truncate(f, 2 * MIB + 7)
        await promoter.before_resize(pf, os.fsencode(f), 4 * MIB)
        os.truncate(f, 4 * MIB)
    assert promote.read_map(f).limit == 2 * MIB + 7
    fd = os.open(f, os.O_RDONLY)
    try:
        assert promoter.read(pf, fd, 0, 8 * MIB) == data[:2 * MIB + 7] + bytes(2 * MIB - 7)
    finally:
        os.close(fd)
    await promoter.run()
    assert f.read_bytes() == data[:2 * MIB + 7] + bytes(2 * MIB - 7)
    promoter.close()
    # O_TRUNC: the file holds nothing of the view any more
    (tmp_path / "2").mkdir()
    view, tree2, _ = _big_skeleton(tmp_path / "2")
    tree_fd2 = os.open(tree2, os.O_RDONLY | os.O_DIRECTORY)
    p2 = Promoter(tree_fd2, view, promote.StateFile(tmp_path / "promote2.json"))
    f2 = tree2 / "big"
    pf2 = p2.lookup(os.stat(f2).st_ino, str(f2))
    fd = os.open(f2, os.O_WRONLY | os.O_TRUNC)
    try:
        await p2.emptied(os.stat(f2).st_ino, pf2, b"/proc/self/fd/%d" % fd)
    finally:
        os.close(fd)
    assert promote.marked(f2) is None and p2.lookup(os.stat(f2).st_ino, str(f2)) is None
    # a file created where a marked file's inode number was is never taken for it
    f3 = tree2 / "new"
    f3.write_bytes(b"new")
    p2.files[os.stat(f3).st_ino] = pf2
    p2.created(os.stat(f3).st_ino)
    assert p2.lookup(os.stat(f3).st_ino, str(f3)) is None
    p2.close()
    os.close(tree_fd)
    os.close(tree_fd2)


# ---- end to end ------------------------------------------------------------------------------
@pytest.fixture
def recovery():
    """A recovery directory every user can reach (tmp_path is not); swept afterwards."""
    path = Path(tempfile.mkdtemp(prefix="zfsrep-promote-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        sweep_promotions(str(path))
        shutil.rmtree(path, ignore_errors=True)


def _volume(journal_server, mount_factory, recovery: Path, files: int = 8, big: int = 0):
    """A VPG with one replicated volume: ``files`` files of 1 MiB in d/, a small file, a
    hard link, a symlink and an xattr (and, with ``big``, a file ``big`` of that size);
    tagged ``t``. Returns (mount, live path, oracle)."""
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--recovery-dir",
                       str(recovery))
    journal_server.expected_log += ["protection is stopped", "it protects nothing any more"]
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "d").mkdir()
    for i in range(files):
        (m.mnt / "d" / f"f{i}").write_bytes(os.urandom(MIB))
    (m.mnt / "small").write_text("small file\n")
    os.chmod(m.mnt / "small", 0o644)
    os.link(m.mnt / "small", m.mnt / "hard")
    (m.mnt / "sym").symlink_to("d/f0")
    os.setxattr(m.mnt / "d" / "f1", "user.note", b"kept")
    if big:
        with open(m.mnt / "big", "wb") as f:
            for _ in range(big // MIB):
                f.write(os.urandom(MIB))
    tag(journal_server, "t")
    return m, recovery / "live" / "vol", tree_snapshot(m.source)


def _work(live: Path) -> Path:
    return live.parent.parent / ".work" / "live" / live.name


def _state(live: Path) -> dict:
    return json.loads((_work(live) / "promote.json").read_text())


def _still_marked(live: Path) -> list[str]:
    """Files of d/ not yet promoted, read from the tree behind the mount."""
    tree = _work(live) / "tree" / "d"
    return sorted(p.name for p in tree.iterdir() if promote.marked(p) is not None)


def _promote_daemons() -> list[int]:
    r = subprocess.run(["pgrep", "-f", "zfsrep.mountd.promote"], capture_output=True,
                       text=True)
    return [int(x) for x in r.stdout.split()]


def _kill_daemon(live: Path) -> int:
    """kill -9 the promotion daemon of ``live`` and wait until it is gone; its pid."""
    pid = _state(live)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while promote.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def _assert_committed(journal_server, m, live: Path, oracle: dict,
                      changed: dict[str, bytes]) -> None:
    """After commit: the live path is a plain directory, the ``changed`` files hold what
    they should and everything else is as at the checkpoint, with no mark left; then the
    protected mount stops and the VPG is deleted."""
    assert mount_at(live) is None
    for rel, data in changed.items():
        assert (live / rel).read_bytes() == data, rel
    rest = {k: v for k, v in oracle.items() if k not in changed}
    assert {k: v for k, v in tree_snapshot(live).items() if k in rest} == rest
    _no_marks(live)
    assert m.stop() == 0
    journal_server.cli("vpg", "delete", VPG, "--force")


def _no_marks(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                assert promote.MARKER.decode() not in os.listxattr(p), p


@pytest.mark.mount
def test_failover_live_is_usable_at_once_and_promoted_behind(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, oracle = _volume(journal_server, mount_factory, recovery)
    original = {f"d/f{i}": (m.source / "d" / f"f{i}").read_bytes() for i in range(8)}
    r = journal_server.cli("failover-live", VPG, "t", "--promote-rate", "1", "--json")
    op = json.loads(r.stdout)
    assert op["promotion"] == "background" and op["phase"] == "before-commit"
    assert mount_at(live)[1] == "fuse.zfsrep"
    assert _state(live)["state"] == "promoting"
    pending = _still_marked(live)
    assert len(pending) >= 5, pending
    promo = _status(journal_server)["volumes"][0]["promotion"]
    assert promo["state"] == "promoting" and promo["files_left"] >= 5
    text = journal_server.cli("status", VPG).stdout
    assert f"failover-live before-commit: {live}" in text and "promotion promoting" in text

    # usable at once: every file reads as at the checkpoint, filled or not
    assert_tree(oracle, live, "the volume while it is promoted")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                        str(live / "small")], capture_output=True)
    assert r.returncode == 0 and r.stdout == b"small file\n"  # every user, as a directory
    # the promotion's mark is never shown, and cannot be touched
    f = live / "d" / pending[0]
    assert promote.MARKER.decode() not in os.listxattr(f)
    with pytest.raises(OSError) as e:
        os.getxattr(f, promote.MARKER)
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(f, promote.MARKER, b"x" * 8)
    assert e.value.errno == errno.EPERM

    # changes to files not yet promoted: what they touch is promoted first, then changed
    with open(live / "d" / pending[0], "ab") as fh:
        fh.write(b"appended")
    os.truncate(live / "d" / pending[1], 1000)
    os.rename(live / "d" / pending[2], live / "d" / "renamed")
    os.unlink(live / "d" / pending[3])
    with open(live / "d" / pending[4], "r+b") as fh:
        fh.seek(10)
        fh.write(b"XYZ")
    assert len(_still_marked(live)) >= 1  # (still promoting behind all this)

    journal_server.cli("commit", VPG)  # waits for the promotion
    assert mount_at(live) is None, "the live path is a plain directory after promotion"
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Recovered", "")
    expect = dict(original)
    expect[f"d/{pending[0]}"] = original[f"d/{pending[0]}"] + b"appended"
    expect[f"d/{pending[1]}"] = original[f"d/{pending[1]}"][:1000]
    expect["d/renamed"] = expect.pop(f"d/{pending[2]}")
    del expect[f"d/{pending[3]}"]
    b = bytearray(original[f"d/{pending[4]}"])
    b[10:13] = b"XYZ"
    expect[f"d/{pending[4]}"] = bytes(b)
    got = {f"d/{p.name}": p.read_bytes() for p in (live / "d").iterdir()}
    assert got == expect
    assert (live / "small").read_text() == "small file\n"
    assert os.stat(live / "small").st_ino == os.stat(live / "hard").st_ino
    assert os.readlink(live / "sym") == "d/f0"
    assert os.getxattr(live / "d" / "f1", "user.note") == b"kept"
    untouched = {k: v for k, v in oracle.items()  # (d itself changed: rename, unlink)
                 if k != "d" and (not k.startswith("d/") or k[2:] not in pending[:5])}
    now = {k: v for k, v in tree_snapshot(live).items() if k in untouched}
    assert now == untouched
    _no_marks(live)
    assert not _work(live).exists()
    deadline = time.monotonic() + 10
    while _promote_daemons() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _promote_daemons(), "the promotion daemon exits once nothing uses its mount"
    assert m.stop() == 0
    journal_server.cli("vpg", "delete", VPG, "--force")


@pytest.mark.mount
def test_a_promotion_killed_half_way_is_taken_up_again_by_commit(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, oracle = _volume(journal_server, mount_factory, recovery)
    journal_server.cli("failover-live", VPG, "t", "--promote-rate", "1")
    pending = _still_marked(live)
    assert len(pending) >= 4
    with open(live / "d" / pending[0], "ab") as fh:  # promoted on demand, then changed
        fh.write(b"appended before the kill")
        fh.flush()
        os.fsync(fh.fileno())
    _kill_daemon(live)
    # the daemon is gone: its mount answers ENOTCONN until commit takes the promotion up
    r = journal_server.cli("commit", VPG)
    assert "going on with it" in r.stderr
    want = (m.source / "d" / pending[0]).read_bytes() + b"appended before the kill"
    _assert_committed(journal_server, m, live, oracle, {f"d/{pending[0]}": want})


@pytest.mark.mount
def test_a_write_into_a_large_file_waits_only_for_the_chunks_it_touches(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, oracle = _volume(journal_server, mount_factory, recovery, files=2, big=48 * MIB)
    original = (m.source / "big").read_bytes()
    journal_server.cli("failover-live", VPG, "t", "--promote-rate", "0.5")
    with open(live / "big", "r+b") as fh:
        fh.seek(45 * MIB + 5)
        fh.write(b"changed")
        fh.flush()
        os.fsync(fh.fileno())
    with open(live / "big", "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        mm[40 * MIB + 100:40 * MIB + 106] = b"mapped"  # (written back through the mount)
        mm.flush()
    fmap = promote.read_map(_work(live) / "tree" / "big")
    assert fmap is not None, "the file is promoted by chunks, not before the write"
    assert fmap.is_durable(45) and not fmap.is_filled(46)  # (recorded before the write)
    assert fmap.is_durable(40)
    want = bytearray(original)
    want[45 * MIB + 5:45 * MIB + 12] = b"changed"
    want[40 * MIB + 100:40 * MIB + 106] = b"mapped"
    assert (live / "big").read_bytes() == want  # filled chunks and the view, as one file
    r = journal_server.cli("resume", VPG)
    assert "nothing to resume" in r.stdout
    pid = _kill_daemon(live)  # a crash half-way: the next daemon goes on from the map
    assert _status(journal_server)["volumes"][0]["promotion"]["state"] == "stopped"
    assert "zfsrep resume brings it back up" in journal_server.cli("status", VPG).stdout
    r = journal_server.cli("resume", VPG, "--promote-rate", "1024", "--json")  # served
    assert json.loads(r.stdout)["resumed"] == ["vol"]  # again, without a commit
    assert _state(live)["rate"] == 1024 * MIB
    assert mount_at(live)[1] == "fuse.zfsrep" and _state(live)["pid"] != pid
    assert (live / "big").read_bytes() == want
    journal_server.cli("commit", VPG)
    _assert_committed(journal_server, m, live, oracle, {"big": bytes(want)})


@pytest.mark.mount
def test_resume_brings_a_moved_volume_back_up_before_commit_move(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, _ = _volume(journal_server, mount_factory, recovery, files=4)
    m.expected_log.append("the move of VPG")
    _wait_connected(journal_server)
    journal_server.cli("move", VPG, "--promote-rate", "1")
    oracle = tree_snapshot(m.source)  # (the move's final checkpoint equals the directory)
    _kill_daemon(live)  # as after a restart of the recovery host
    r = json.loads(journal_server.cli("resume", VPG, "--json").stdout)
    assert r["resumed"] == ["vol"] and r["op"] == "move"
    assert mount_at(live)[1] == "fuse.zfsrep"
    assert _state(live)["rate"] == MIB  # (started again with the move's --promote-rate)
    assert_tree(oracle, live, "the moved volume, served again before commit-move")
    journal_server.cli("commit-move", VPG)
    m.proc.wait(timeout=30)  # the protected mount retired itself
    assert mount_at(live) is None
    assert_tree(oracle, live, "the committed move")
    _no_marks(live)


@pytest.mark.mount
def test_a_restarted_server_serves_the_live_volume_again_by_itself(
        journal_server, mount_factory, recovery: Path) -> None:
    """As after a restart of the recovery host (the promotion daemon and the server both
    gone): the server, started again, brings the live volume back up without a `resume`,
    at ordinary CPU priority although the server runs under SCHED_IDLE, and at the rate
    the failover was started with."""
    m, live, oracle = _volume(journal_server, mount_factory, recovery)
    journal_server.cli("failover-live", VPG, "t", "--promote-rate", "0.5")
    pid = _kill_daemon(live)
    journal_server.kill()
    if mount_at(live) is not None:  # (a reboot leaves no mount behind)
        subprocess.run(["fusermount3", "-u", "-z", str(live)], capture_output=True)
    journal_server.expected_log += ["served again at the live path"]
    journal_server.start()
    deadline = time.monotonic() + 60
    while not (mount_at(live) and mount_at(live)[1] == "fuse.zfsrep"):
        assert time.monotonic() < deadline, "the live volume was not served again"
        time.sleep(0.1)
    state = _state(live)
    assert state["pid"] != pid and state["rate"] == MIB // 2
    assert os.sched_getscheduler(state["pid"]) == os.SCHED_OTHER
    assert "served again at the live path" in journal_server.log.read_text()
    r = journal_server.cli("resume", VPG)
    assert "nothing to resume" in r.stdout
    journal_server.cli("commit", VPG)
    _assert_committed(journal_server, m, live, oracle, {})


@pytest.mark.mount
def test_rollback_during_promotion_stops_it_and_protection_resumes(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, _ = _volume(journal_server, mount_factory, recovery)
    journal_server.cli("failover-live", VPG, "t", "--promote-rate", "0.5")
    assert mount_at(live) is not None and _still_marked(live)
    journal_server.cli("rollback", VPG)
    assert mount_at(live) is None and not live.exists() and not _work(live).exists()
    assert not _promote_daemons()
    _wait_connected(journal_server)
    tag(journal_server, "after")
    # and a full copy, the old way, still works
    r = journal_server.cli("failover-live", VPG, "after", "--full-copy", "--json")
    assert json.loads(r.stdout)["promotion"] == "full copy"
    assert mount_at(live) is None and (live / "small").read_text() == "small file\n"
    journal_server.cli("rollback", VPG)
    assert m.stop() == 0


def test_a_stop_between_exchange_and_cleanup_is_finished_on_restart(tmp_path: Path) -> None:
    from zfsrep.mountd.promote import PromoteOptions, _switched_already

    live, work = tmp_path / "live", tmp_path / "work"
    (work / "tree").mkdir(parents=True)  # the old, empty mount point, exchanged into work/
    live.mkdir()
    (live / "data").write_text("the promoted tree\n")
    opts = PromoteOptions(volume_dir=tmp_path, seq=1, work=work, mountpoint=live, label="x")
    assert _switched_already(opts) and not (work / "tree").exists()
    (work / "tree").mkdir()
    (work / "tree" / "f").write_text("a tree not yet exchanged\n")
    assert not _switched_already(opts) and (work / "tree" / "f").exists()


@pytest.mark.mount
def test_a_failed_promotion_is_tried_again_by_commit_once_the_cause_is_gone(
        journal_server, mount_factory, recovery: Path) -> None:
    m, live, oracle = _volume(journal_server, mount_factory, recovery)
    journal_server.cli("failover-live", VPG, "t", "--promote-rate", "4")
    pending = _still_marked(live)
    assert pending
    stuck = _work(live) / "tree" / "d" / pending[-1]
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # its fill cannot open it
    try:
        deadline = time.monotonic() + 60
        while _state(live)["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        state = _state(live)
        assert state["state"] == "failed" and "cannot fill" in state["error"]
        promo = _status(journal_server)["volumes"][0]["promotion"]
        assert promo["state"] == "failed" and promo["error"]
        assert (live / "d" / pending[-1]).read_bytes() == (m.source / "d" / pending[-1]
                                                           ).read_bytes()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    r = journal_server.cli("commit", VPG)
    assert "starting it again" in r.stderr
    assert mount_at(live) is None
    assert {k: v for k, v in tree_snapshot(live).items()} == oracle
    _no_marks(live)
    assert m.stop() == 0
    journal_server.cli("vpg", "delete", VPG, "--force")
