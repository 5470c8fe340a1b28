"""Restore in place end to end: a real server, real protected mounts of a two-volume VPG, the
volumes put back to a tagged checkpoint through the mounts themselves, then rolled back
exactly or committed, each state checked against oracles taken from the backing
directories, and every later checkpoint checked against the directory it describes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import JournalServerProcess
from test_capture_workload import RandomWorkload
from test_operations import _status, _vpg_of_two, _wait_connected
from test_replication import VPG, assert_tree, replicated, resolve, tag
from treesnap import tree_snapshot

from zfsrep import wire
from zfsrep.errors import ZfsrepError

pytestmark = pytest.mark.mount

HIDDEN = ".zfsrep-restore"


def _checkpoint_equals(server: JournalServerProcess, cp: str, volume: str, oracle: dict,
                       dest: Path) -> None:
    server.cli("restore-file", VPG, cp, volume, "/", "--to", str(dest))
    assert_tree(oracle, dest, f"checkpoint {cp} of {volume}")


def _one_volume(server: JournalServerProcess, mount_factory):
    """A VPG (checkpoints every second) with one started mount."""
    server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s")
    m = replicated(mount_factory, server)
    m.start()
    return m


def _build(mounts: list, seed: int, steps: int) -> None:
    for i, m in enumerate(mounts):
        work = RandomWorkload(m.mnt, seed=seed + i)
        for _ in range(steps):
            work.step()


def test_restore_in_place_rolls_back_exactly_and_commits(journal_server, mount_factory,
                                                        tmp_path: Path) -> None:
    mounts = _vpg_of_two(journal_server, mount_factory, tmp_path / "recovery")
    for m in mounts:
        m.start()
    _build(mounts, 100, 60)
    for m in mounts:
        os.setxattr(m.mnt, "user.root", b"at the tag")
        (m.mnt / "comes-back").write_text("deleted after the tag\n")
    tag(journal_server, "good")
    at_tag = [tree_snapshot(m.source) for m in mounts]
    _build(mounts, 200, 60)  # the "damage" a restore undoes
    for m in mounts:
        (m.mnt / "damage").write_bytes(os.urandom(300_000))
        os.removexattr(m.mnt, "user.root")
        os.chmod(m.mnt, 0o750)
        (m.mnt / "comes-back").unlink()
        for _ in range(2):  # the kernel now keeps "no such name" (a negative entry)...
            with pytest.raises(FileNotFoundError):
                os.stat(m.mnt / "comes-back")
    before = [tree_snapshot(m.source) for m in mounts]
    assert before != at_tag

    r = journal_server.cli("restore", VPG, "good", "--json")
    op = json.loads(r.stdout)
    assert op["op"] == "restore" and op["phase"] == "before-commit"
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Restoring", "Before Commit")
    for m, oracle in zip(mounts, at_tag, strict=True):
        # ...which the restore, renaming behind the kernel, invalidated
        assert (m.mnt / "comes-back").read_text() == "deleted after the tag\n"
        assert_tree(oracle, m.mnt, f"{m.mnt} restored")
        assert HIDDEN not in os.listdir(m.mnt)
        assert not (m.mnt / HIDDEN).exists()
        with pytest.raises(PermissionError):
            (m.mnt / HIDDEN).mkdir()
        assert (m.source / HIDDEN / "old").is_dir()  # the pre-restore tree is kept

    # refused while the restore is before commit
    r = journal_server.cli("restore", VPG, "good", check=False)
    assert r.returncode == 4 and "in a restore of checkpoint" in r.stderr
    r = journal_server.cli("failover-test", VPG, "good", check=False)
    assert r.returncode == 4
    r = journal_server.cli("commit-move", VPG, check=False)
    assert r.returncode == 4

    # protection goes on: a checkpoint now is the restored state plus what was written since
    (mounts[0].mnt / "written-after-restore").write_text("kept only by a commit\n")
    tag(journal_server, "restored")
    for i, m in enumerate(mounts):
        _checkpoint_equals(journal_server, "restored", f"vol{i}", tree_snapshot(m.mnt),
                           tmp_path / f"cp-restored-{i}")

    r = journal_server.cli("rollback-restore", VPG, "--json")
    assert json.loads(r.stdout)["rolled_back"] == op["checkpoint"]["id"]
    for m, oracle in zip(mounts, before, strict=True):
        assert_tree(oracle, m.mnt, f"{m.mnt} rolled back")
        assert_tree(oracle, m.source, f"{m.source} rolled back")
        assert not (m.source / HIDDEN).exists()
    assert _status(journal_server)["operation"] is None
    tag(journal_server, "rolled-back")
    for i, oracle in enumerate(before):
        _checkpoint_equals(journal_server, "rolled-back", f"vol{i}", oracle,
                           tmp_path / f"cp-rolled-back-{i}")
    r = journal_server.cli("commit-restore", VPG, check=False)
    assert r.returncode == 4 and "no restore under way" in r.stderr

    # again, and commit: the restored state stays and is protected from then on
    journal_server.cli("restore", VPG, "good")
    (mounts[1].mnt / "after-second-restore").write_text("stays\n")
    journal_server.cli("commit-restore", VPG)
    for m in mounts:
        assert not (m.source / HIDDEN).exists()
    assert_tree(at_tag[0], mounts[0].mnt, "volume 0 after commit")
    _build(mounts, 300, 20)
    final = [tree_snapshot(m.source) for m in mounts]
    tag(journal_server, "committed")
    for i, oracle in enumerate(final):
        _checkpoint_equals(journal_server, "committed", f"vol{i}", oracle,
                           tmp_path / f"cp-committed-{i}")
    assert _status(journal_server)["status"] != "Restoring"
    for m in mounts:
        assert m.stop() == 0
        assert not m.log_problems()


def test_restore_in_place_refuses_open_files_and_wrong_states(journal_server, mount_factory,
                                                             tmp_path: Path) -> None:
    mounts = _vpg_of_two(journal_server, mount_factory, tmp_path / "recovery")
    for m in mounts:
        m.start()
        (m.mnt / "f").write_text("at the tag\n")
    tag(journal_server, "t")
    for cmd in ("commit-restore", "rollback-restore"):
        r = journal_server.cli(cmd, VPG, check=False)
        assert r.returncode == 4 and "no restore under way" in r.stderr
    r = journal_server.cli("restore", VPG, "nope", check=False)
    assert r.returncode == 3
    r = journal_server.cli("restore", "no-such-vpg", "t", check=False)
    assert r.returncode == 3

    (mounts[1].mnt / "f").write_text("changed\n")
    with open(mounts[1].mnt / "f", "a"):  # an application still has a file open
        r = journal_server.cli("restore", VPG, "t", check=False)
    assert r.returncode == 4 and "open on" in r.stderr, r.stderr
    assert _status(journal_server)["operation"] is None
    for m in mounts:  # nothing changed on either volume
        assert not (m.source / HIDDEN).exists()
    assert (mounts[1].mnt / "f").read_text() == "changed\n"
    (mounts[1].mnt / "f").write_text("changed again\n")  # and writes go on

    # a directory of that name that the mount did not make is never touched
    (mounts[0].mnt / HIDDEN).mkdir()
    r = journal_server.cli("restore", VPG, "t", check=False)
    assert r.returncode == 4 and "move it away" in r.stderr
    assert (mounts[0].mnt / HIDDEN).is_dir()
    assert (mounts[1].mnt / "f").read_text() == "changed again\n"
    for m in mounts:
        assert m.stop() == 0


def test_restore_in_place_survives_a_server_restart_and_a_mount_restart(
        journal_server, mount_factory, tmp_path: Path) -> None:
    mounts = _vpg_of_two(journal_server, mount_factory, tmp_path / "recovery")
    for m in mounts:
        m.start()
        (m.mnt / "f").write_text("at the tag\n")
    tag(journal_server, "t")
    for m in mounts:
        (m.mnt / "f").write_text("before the restore\n")
        (m.mnt / "g").write_text("made after the tag\n")
    before = [tree_snapshot(m.source) for m in mounts]
    journal_server.cli("restore", VPG, "t")

    journal_server.kill()
    journal_server.start()
    st = _status(journal_server)
    assert st["operation"]["op"] == "restore" and st["operation"]["phase"] == "before-commit"

    # a mount restarted before commit still hides the kept tree, and can roll back
    assert mounts[0].stop() == 0
    mounts[0].start()
    assert not (mounts[0].mnt / "g").exists()
    assert HIDDEN not in os.listdir(mounts[0].mnt)
    _wait_connected(journal_server)
    journal_server.cli("rollback-restore", VPG)
    for m, oracle in zip(mounts, before, strict=True):
        assert_tree(oracle, m.mnt, f"{m.mnt} rolled back after restarts")
    for m in mounts:
        assert m.stop() == 0


def test_the_view_request_answers_bad_requests_with_errors(journal_server, mount_factory,
                                                           tmp_path: Path) -> None:
    m = _one_volume(journal_server, mount_factory)
    (m.mnt / "d").mkdir()
    (m.mnt / "f").write_bytes(b"0123456789" * 1000)
    tag(journal_server, "t")
    seq = resolve(journal_server, "t")["seq"]
    addr = wire.parse_address(journal_server.address)

    def view(**args):
        return wire.call(addr, "view", {"vpg": VPG, "volume": "vol", "seq": seq, **args})

    root = view(what="node")
    names = dict((n, node) for n, node in view(what="readdir", ident=root[0], after=b"",
                                                 limit=10 ** 9))
    assert sorted(names) == [b"d", b"f"]
    f = names[b"f"][0]
    assert view(what="read", ident=f, offset=5, size=10) == b"5678901234"
    assert len(view(what="read", ident=f, offset=0, size=1 << 40)) == 10000
    for args, code in (({"vpg": "nope"}, 3), ({"volume": "nope"}, 3), ({"seq": 0}, 2),
                       ({"seq": 10 ** 9}, 2), ({"seq": "x"}, 2), ({"what": "bogus"}, 2),
                       ({"what": "read", "ident": names[b"d"][0], "offset": 0, "size": 1}, 2),
                       ({"what": "readlink", "ident": f}, 2),
                       ({"what": "node", "ident": 999999999}, 3),
                       ({"what": "read", "ident": -1, "offset": 0, "size": 1}, 2),
                       ({"what": "readdir", "ident": root[0], "after": "str"}, 2)):
        req = {"what": "node", **args}
        with pytest.raises(ZfsrepError) as e:
            view(**req)
        assert e.value.exit_code == code, (args, e.value)
    assert wire.call(addr, "ping")["uptime_s"] > 0  # the server serves on
    assert m.stop() == 0


def test_restore_in_place_of_a_large_sparse_file(journal_server, mount_factory,
                                                 tmp_path: Path) -> None:
    """A file larger than a read window, with a hole, restored in place exactly."""
    m = _one_volume(journal_server, mount_factory)
    data = os.urandom(9 << 20)
    with open(m.mnt / "big", "wb") as f:
        f.write(data)
        f.seek(20 << 20)
        f.write(data[:12345])
    (m.mnt / "small").write_bytes(b"x" * 100)
    tag(journal_server, "t")
    oracle = tree_snapshot(m.mnt)
    with open(m.mnt / "big", "r+b") as f:
        f.seek(4 << 20)
        f.write(b"damage" * 100000)
    (m.mnt / "small").unlink()
    journal_server.cli("restore", VPG, "t")
    assert_tree(oracle, m.mnt, "the restored volume")
    assert os.lstat(m.source / "big").st_blocks * 512 < 12 << 20  # the hole stayed one
    journal_server.cli("commit-restore", VPG)
    assert_tree(oracle, m.mnt, "the committed volume")
    assert m.stop() == 0


def test_a_directory_held_open_in_the_replaced_tree_goes_stale(journal_server, mount_factory,
                                                              tmp_path: Path) -> None:
    """A process whose working directory was in the pre-restore tree cannot change the
    restored one (nor put records of the old tree in the stream): ESTALE."""
    import errno

    m = _one_volume(journal_server, mount_factory)
    (m.mnt / "d").mkdir()
    (m.mnt / "d" / "f").write_text("at the tag\n")
    tag(journal_server, "t")
    (m.mnt / "d" / "f").write_text("later\n")
    held = os.open(m.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)  # as a shell's cwd
    try:
        journal_server.cli("restore", VPG, "t")
        with pytest.raises(OSError) as e:  # the old file (the kernel still knows its name):
            os.getxattr(f"/proc/self/fd/{held}/f", "user.none")  # not read by the fast path
        assert e.value.errno == errno.ESTALE
        for attempt in (lambda: os.mkdir("x", dir_fd=held),
                        lambda: os.open("g", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=held),
                        lambda: os.unlink("f", dir_fd=held),
                        # an absent name: the fast path forgot the old directories too
                        lambda: os.stat("absent", dir_fd=held)):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.ESTALE
    finally:
        os.close(held)
    assert (m.mnt / "d" / "f").read_text() == "at the tag\n"  # from the root: the new tree
    (m.mnt / "d" / "new").write_text("written after the restore\n")
    tag(journal_server, "after")
    dest = tmp_path / "after"
    journal_server.cli("restore-file", VPG, "after", "vol", "/", "--to", str(dest))
    assert_tree(tree_snapshot(m.mnt), dest, "the checkpoint after the restore")
    assert _status(journal_server)["volumes"][0]["error"] is None
    journal_server.cli("commit-restore", VPG)
    assert m.stop() == 0
