"""Recovery operations end to end: a failover test over a real server, real protected mounts
and real overlay mounts of snapshot views."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import JournalServerProcess
from test_replication import VPG, assert_tree, checkpoints, replicated, tag
from treesnap import tree_snapshot

pytestmark = pytest.mark.mount


def _status(server: JournalServerProcess) -> dict:
    return json.loads(server.cli("status", VPG, "--json").stdout)[0]


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _vpg_of_two(server: JournalServerProcess, mount_factory, recovery: Path) -> list:
    """A VPG (checkpoints every second, recovery dir given) and two mounts, not started."""
    server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--recovery-dir",
               str(recovery))
    return [replicated(mount_factory, server, name=f"m{v}", volume=f"vol{v}") for v in (0, 1)]


def test_failover_test_brings_every_volume_up_writable_and_leaves_production_alone(
        journal_server, mount_factory, tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    mounts = _vpg_of_two(journal_server, mount_factory, recovery)
    for i, m in enumerate(mounts):
        m.start()
        (m.mnt / "dir").mkdir()
        (m.mnt / "dir" / "f").write_text(f"volume {i} at the tag\n")
        os.symlink("dir/f", m.mnt / "link")
    tag(journal_server, "before")
    oracles = [tree_snapshot(m.source) for m in mounts]
    for m in mounts:
        (m.mnt / "dir" / "f").write_text("after the tag\n")

    r = journal_server.cli("failover-test", VPG, "before", "--json")
    op = json.loads(r.stdout)
    assert op["op"] == "failover-test" and op["phase"] == "running"
    tests = [recovery / "test" / f"vol{v}" for v in (0, 1)]
    try:
        for oracle, path in zip(oracles, tests, strict=True):
            assert _mounted(path)
            assert_tree(oracle, path, f"test copy {path.name}")
        st = _status(journal_server)
        assert st["operation"]["op"] == "failover-test"
        assert st["operation"]["phase"] == "running"
        assert st["recovery_dir"] == str(recovery)
        assert {v["name"]: v["test_path"] for v in st["volumes"]} == {
            "vol0": str(tests[0]), "vol1": str(tests[1])}
        assert all(v["state"] == "failover-test running" for v in st["volumes"])

        # the copies are writable; production and its replication go on untouched
        (tests[0] / "dir" / "f").write_text("written by the test\n")
        (tests[0] / "new").write_text("new in the test\n")
        os.unlink(tests[1] / "link")
        assert (mounts[0].mnt / "dir" / "f").read_text() == "after the tag\n"
        assert not (mounts[0].mnt / "new").exists()
        assert (mounts[1].mnt / "link").is_symlink()
        (mounts[0].mnt / "during").write_text("written during the test\n")
        during = tag(journal_server, "during")
        assert during["kind"] == "tagged"

        # a second test, a delete or a recovery-dir change are refused while this one runs
        r = journal_server.cli("failover-test", VPG, "latest", check=False)
        assert r.returncode == 4 and "in a failover-test of checkpoint" in r.stderr
        r = journal_server.cli("vpg", "delete", VPG, "--force", check=False)
        assert r.returncode == 4 and "failover-test" in r.stderr
        r = journal_server.cli("vpg", "set", VPG, "--recovery-dir", str(tmp_path / "x"),
                               check=False)
        assert r.returncode == 4
    finally:
        r = journal_server.cli("stop-test", VPG, "--result", "pass", "--note", "app started",
                               "--json", check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["result"] == "pass" and res["tested"] == op["checkpoint"]["id"]
    for path in tests:
        assert not _mounted(path) and not path.exists()
    assert not any(p for p in (recovery / ".work").rglob("upper") if any(p.iterdir()))
    cps = checkpoints(journal_server)
    test_cps = [cp for cp in cps if cp["kind"] == "test"]
    assert len(test_cps) == 1 and test_cps[0]["result"] == "pass"
    assert "app started" in test_cps[0]["note"]
    assert _status(journal_server)["operation"] is None
    r = journal_server.cli("stop-test", VPG, check=False)
    assert r.returncode == 4 and "no failover-test under way" in r.stderr

    # a new test of the same checkpoint starts clean: the old test writes are gone
    journal_server.cli("failover-test", VPG, "before")
    try:
        assert (tests[0] / "dir" / "f").read_text() == "volume 0 at the tag\n"
        assert not (tests[0] / "new").exists()
    finally:
        journal_server.cli("stop-test", VPG, "--result", "fail")
    for m in mounts:
        assert m.stop() == 0


def test_failover_test_refusals_name_the_problem(journal_server, mount_factory,
                                                 tmp_path: Path) -> None:
    r = journal_server.cli("failover-test", "nope", "latest", check=False)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    journal_server.cli("vpg", "create", VPG, "--recovery-dir", str(tmp_path / "rec"))
    r = journal_server.cli("failover-test", VPG, "latest", check=False)
    assert r.returncode == 3  # no checkpoint yet
    r = journal_server.cli("vpg", "create", "rel", "--recovery-dir", "relative/dir",
                           check=False)
    assert r.returncode == 0  # made absolute by the CLI, from where it runs
    r = journal_server.cli("stop-test", VPG, "--result", "maybe", check=False)
    assert r.returncode == 2


def test_failover_test_starts_in_about_the_same_time_for_small_and_large_volumes(
        journal_server, mount_factory, tmp_path: Path) -> None:
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s",
                       "--recovery-dir", str(tmp_path / "rec"))
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "small").write_bytes(os.urandom(1 << 20))
    tag(journal_server, "small")
    with open(m.mnt / "big", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    tag(journal_server, "big")
    times = {}
    for name in ("small", "big"):
        t0 = time.monotonic()
        journal_server.cli("failover-test", VPG, name)
        times[name] = time.monotonic() - t0
        try:
            got = subprocess.run(["cmp", str(m.source / "small"),
                                  str(tmp_path / "rec" / "test" / "vol" / "small")])
            assert got.returncode == 0
        finally:
            journal_server.cli("stop-test", VPG)
    assert times["big"] < max(3 * times["small"], times["small"] + 2.0), times
    assert m.stop() == 0


def _wait_connected(server: JournalServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(v["connection"] == "connected" for v in _status(server)["volumes"]):
            return
        time.sleep(0.2)
    raise AssertionError("the volumes did not reconnect")


def test_failover_live_rollback_and_commit(journal_server, mount_factory,
                                          tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s",
                       "--recovery-dir", str(recovery))
    journal_server.expected_log += ["protection is stopped", "it protects nothing any more"]
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "a").write_text("at the tag\n")
    os.mkfifo(m.mnt / "fifo")
    tag(journal_server, "t")
    oracle = tree_snapshot(m.source)
    (m.mnt / "a").write_text("after the tag\n")
    live = recovery / "live" / "vol"

    r = journal_server.cli("failover-live", VPG, "t", "--json")
    op = json.loads(r.stdout)
    assert op["phase"] == "before-commit" and Path(op["volumes"]["vol"]["path"]) == live
    assert_tree(oracle, live, "the failed-over volume")
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Failing Over", "Before Commit")
    r = journal_server.cli("tag", VPG, "refused", check=False)
    assert r.returncode == 4 and "protection is stopped" in r.stderr
    (m.mnt / "during").write_text("written while failed over\n")  # production still runs
    for refused in (("failover-test", VPG, "t"), ("failover-live", VPG, "t")):
        r = journal_server.cli(*refused, check=False)
        assert r.returncode == 4 and "failover-live" in r.stderr, refused

    journal_server.cli("rollback", VPG)
    assert not live.exists()
    _wait_connected(journal_server)
    after = tag(journal_server, "after")  # nothing captured meanwhile was lost
    assert after["kind"] == "tagged"
    r = journal_server.cli("restore-file", VPG, "after", "vol", "/", "--to",
                           str(tmp_path / "after"))
    assert_tree(tree_snapshot(m.source), tmp_path / "after", "the stream after rollback")
    assert (tmp_path / "after" / "during").read_text() == "written while failed over\n"

    journal_server.cli("failover-live", VPG, "after")
    journal_server.cli("commit", VPG)
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Recovered", "")
    assert (live / "during").exists()
    for args in (("rollback", VPG), ("commit", VPG), ("failover-test", VPG, "after")):
        r = journal_server.cli(*args, check=False)
        assert r.returncode == 4 and "committed" in r.stderr, args
    r = journal_server.cli("tag", VPG, "x", check=False)
    assert r.returncode == 4 and "Recovered" in r.stderr
    assert m.stop() == 0
    journal_server.cli("vpg", "delete", VPG, "--force")  # a recovered VPG can go


def test_live_failover_refusals(journal_server, tmp_path: Path) -> None:
    journal_server.cli("vpg", "create", VPG, "--recovery-dir", str(tmp_path / "rec"))
    for args in (("commit", VPG), ("rollback", VPG)):
        r = journal_server.cli(*args, check=False)
        assert r.returncode == 4 and "no failover-live under way" in r.stderr
    r = journal_server.cli("resume", VPG, check=False)
    assert r.returncode == 4 and "no failover-live or move under way" in r.stderr
    r = journal_server.cli("failover-live", "nope", "latest", check=False)
    assert r.returncode == 3


def test_a_server_killed_mid_operation_resumes_it_after_restart(
        journal_server, mount_factory, tmp_path: Path) -> None:
    """The operation is persisted: after kill -9 and a restart, status shows it and its
    stop or rollback command finishes it (a failover test, then a live failover)."""
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s",
                       "--recovery-dir", str(tmp_path / "rec"))
    journal_server.expected_log += ["cutting invalid tail", "protection is stopped"]
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "f").write_text("data\n")
    tag(journal_server, "t")
    journal_server.cli("failover-test", VPG, "t")
    test_copy = tmp_path / "rec" / "test" / "vol"
    journal_server.kill()
    journal_server.start()
    assert (test_copy / "f").read_text() == "data\n"  # the copy never depended on the server
    st = _status(journal_server)
    assert st["operation"]["op"] == "failover-test" and st["operation"]["phase"] == "running"
    r = journal_server.cli("failover-live", VPG, "t", check=False)
    assert r.returncode == 4 and "failover-test of checkpoint" in r.stderr
    journal_server.cli("stop-test", VPG, "--result", "pass")
    assert not _mounted(test_copy)

    _wait_connected(journal_server)
    journal_server.cli("failover-live", VPG, "t")
    journal_server.kill()
    journal_server.start()
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Failing Over", "Before Commit")
    journal_server.cli("rollback", VPG)
    _wait_connected(journal_server)
    tag(journal_server, "after")
    assert m.stop() == 0


def test_move_holds_writes_and_rollback_and_commit_lose_nothing(
        journal_server, mount_factory, tmp_path: Path) -> None:
    import threading

    recovery = tmp_path / "recovery"
    mounts = _vpg_of_two(journal_server, mount_factory, recovery)
    for i, m in enumerate(mounts):
        m.expected_log.append("the move of VPG")
        m.start()
        (m.mnt / "d").mkdir()
        (m.mnt / "d" / "f").write_text(f"volume {i}\n")
        (m.mnt / "w").mkdir()  # (a held create locks its directory against lookups)
    _wait_connected(journal_server)

    op = json.loads(journal_server.cli("move", VPG, "--json").stdout)
    assert op["op"] == "move" and op["phase"] == "before-commit"
    for v, m in enumerate(mounts):  # the final checkpoint equals the directories exactly
        assert_tree(tree_snapshot(m.source), recovery / "live" / f"vol{v}", f"moved vol{v}")
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Moving", "MoveBeforeCommit")

    done = threading.Event()

    def writer() -> None:  # held: the directory must not change during the move
        (mounts[0].mnt / "w" / "held").write_text("written during the move\n")
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not done.wait(1.5), "a write went through a quiesced mount"
    assert not (mounts[0].source / "w" / "held").exists()
    assert (mounts[0].mnt / "d" / "f").read_text() == "volume 0\n"  # reads go on

    journal_server.cli("rollback-move", VPG)
    assert done.wait(10), "the held write did not proceed after rollback-move"
    t.join()
    assert not (recovery / "live" / "vol0").exists()
    tag(journal_server, "after-rollback")
    journal_server.cli("restore-file", VPG, "after-rollback", "vol0", "/w/held", "--to",
                       str(tmp_path / "held"))
    assert (tmp_path / "held").read_text() == "written during the move\n"

    journal_server.cli("move", VPG, "latest")
    oracles = [tree_snapshot(m.source) for m in mounts]
    res = json.loads(journal_server.cli("commit-move", VPG, "--json").stdout)
    assert res["moved"] == VPG
    for m in mounts:
        m.proc.wait(timeout=30)  # the mounts retired by themselves
        assert m.proc.returncode == 0
        assert not os.path.ismount(m.mnt)
        assert list(m.source.iterdir()) == []  # the protected data is gone...
    for v, oracle in enumerate(oracles):  # ...and lives at the recovery site
        assert_tree(oracle, recovery / "live" / f"vol{v}", f"committed move of vol{v}")
    assert VPG not in [v["name"] for v in json.loads(
        journal_server.cli("vpg", "list", "--json").stdout)]


def test_commit_move_with_a_protected_host_gone_needs_force_and_leaves_it_alone(
        journal_server, mount_factory, tmp_path: Path) -> None:
    """A protected host lost after the move brought the volumes up: commit-move is refused
    (exit 4, naming the volume and --force); with --force the connected mount is retired,
    the lost one's directory is left as it was, and the moved copies are the live ones."""
    recovery = tmp_path / "recovery"
    mounts = _vpg_of_two(journal_server, mount_factory, recovery)
    for i, m in enumerate(mounts):
        m.expected_log.append("the move of VPG")
        m.start()
        (m.mnt / "f").write_text(f"volume {i}\n")
    _wait_connected(journal_server)
    journal_server.cli("move", VPG)
    oracles = [tree_snapshot(m.source) for m in mounts]
    assert mounts[1].stop() == 0  # its host goes away for good
    deadline = time.monotonic() + 10
    while any(v["name"] == "vol1" and v["connection"] == "connected"
              for v in _status(journal_server)["volumes"]):
        assert time.monotonic() < deadline, "the stopped mount still shows as connected"
        time.sleep(0.1)
    r = journal_server.cli("commit-move", VPG, check=False)
    assert r.returncode == 4 and "vol1 is not connected" in r.stderr and "--force" in r.stderr
    assert (mounts[0].source / "f").exists()  # a refused commit changed nothing
    journal_server.expected_log.append("without retiring volume vol1")
    res = json.loads(journal_server.cli("commit-move", VPG, "--force", "--json").stdout)
    assert res["moved"] == VPG and res["left"] == ["vol1"]
    mounts[0].proc.wait(timeout=30)  # the connected mount retired itself
    assert list(mounts[0].source.iterdir()) == []
    assert_tree(oracles[1], mounts[1].source, "the lost host's directory, untouched")
    for v, oracle in enumerate(oracles):
        assert_tree(oracle, recovery / "live" / f"vol{v}", f"committed move of vol{v}")
    assert VPG not in [v["name"] for v in json.loads(
        journal_server.cli("vpg", "list", "--json").stdout)]


def test_move_refusals(journal_server, mount_factory, tmp_path: Path) -> None:
    journal_server.cli("vpg", "create", VPG, "--recovery-dir", str(tmp_path / "rec"))
    r = journal_server.cli("move", VPG, check=False)
    assert r.returncode == 4 and "every volume connected" in r.stderr
    r = journal_server.cli("move", VPG, "7", check=False)
    assert r.returncode == 2
    for args in (("commit-move", VPG), ("rollback-move", VPG)):
        r = journal_server.cli(*args, check=False)
        assert r.returncode == 4 and "no move under way" in r.stderr


def test_a_server_killed_mid_move_keeps_the_mount_held_until_rollback(
        journal_server, mount_factory, tmp_path: Path) -> None:
    import threading

    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s",
                       "--recovery-dir", str(tmp_path / "rec"))
    journal_server.expected_log += ["cutting invalid tail"]
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "w").mkdir()
    _wait_connected(journal_server)
    journal_server.cli("move", VPG)
    journal_server.kill()
    done = threading.Event()

    def writer() -> None:
        (m.mnt / "w" / "f").write_text("held across the restart\n")
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not done.wait(1.0), "the mount let a write through while the server was down"
    journal_server.start()
    _wait_connected(journal_server)  # the welcome tells it to keep holding
    st = _status(journal_server)
    assert (st["status"], st["substatus"]) == ("Moving", "MoveBeforeCommit")
    assert not done.wait(1.0)
    journal_server.cli("rollback-move", VPG)
    assert done.wait(10)
    t.join()
    assert (m.source / "w" / "f").read_text() == "held across the restart\n"
    assert m.stop() == 0


def test_a_mount_restarted_mid_move_and_written_to_makes_the_move_need_a_rollback(
        journal_server, mount_factory, tmp_path: Path) -> None:
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s",
                       "--recovery-dir", str(tmp_path / "rec"))
    m = replicated(mount_factory, journal_server)
    m.expected_log += ["cannot reach the journal server", "replication link"]
    m.start()
    (m.mnt / "before").write_text("before the move\n")
    _wait_connected(journal_server)
    journal_server.cli("move", VPG)
    assert m.stop() == 0  # the protected host restarts ...
    journal_server.kill()  # ... while the recovery site is unreachable
    m.start()
    (m.mnt / "after").write_text("written before the mount could reconnect\n")
    journal_server.start()
    _wait_connected(journal_server)
    st = _status(journal_server)
    assert st["status"] == "Moving" and "needs rollback" in st["substatus"], st
    r = journal_server.cli("commit-move", VPG, check=False)
    assert r.returncode == 4 and "needs a rollback" in r.stderr
    assert m.mnt.exists() and (m.source / "after").exists()  # nothing was removed
    journal_server.cli("rollback-move", VPG)
    assert not (tmp_path / "rec" / "live" / "vol").exists()
    tag(journal_server, "after-rollback")  # nothing was lost
    dest = tmp_path / "back"
    journal_server.cli("restore-file", VPG, "after-rollback", "vol", "/", "--to", str(dest))
    assert_tree(tree_snapshot(m.source), dest, "the stream after the rolled-back move")
    assert m.stop() == 0


def _unmount_and_wait(path: Path, timeout: float = 30.0) -> None:
    """Unmount a protected mount started by the CLI, and wait for its daemon to exit."""
    if _mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["pgrep", "-f", f"--source {path} "], capture_output=True)
        if r.returncode != 0 and not _mounted(path):
            return
        time.sleep(0.1)
    raise AssertionError(f"the daemon of {path} did not exit")


def test_commit_reverse_protect_protects_the_recovered_directories(
        journal_server, mount_factory, tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    mounts = _vpg_of_two(journal_server, mount_factory, recovery)
    journal_server.expected_log += ["protection is stopped", "it protects nothing any more"]
    for i, m in enumerate(mounts):
        m.start()
        (m.mnt / "data").write_bytes(os.urandom(200_000 + i))
    tag(journal_server, "t")
    journal_server.cli("failover-live", VPG, "t")
    lives = [recovery / "live" / f"vol{v}" for v in (0, 1)]
    for m in mounts:
        assert m.stop() == 0  # the protected site is lost

    r = journal_server.cli("commit", VPG, "--reverse-vpg", "x", check=False)
    assert r.returncode == 2 and "--reverse-protect" in r.stderr
    journal_server.cli("vpg", "create", "taken")
    r = journal_server.cli("commit", VPG, "--reverse-protect", "--reverse-vpg", "taken",
                           check=False)
    assert r.returncode == 4 and "already exists" in r.stderr
    assert _status(journal_server)["substatus"] == "Before Commit"  # nothing was committed

    spools = tmp_path / "reverse-spools"
    try:
        r = journal_server.cli("commit", VPG, "--reverse-protect", "--reverse-spool-dir",
                               str(spools), "--json")
        op = json.loads(r.stdout)
        assert op["reverse"] == {"vpg": f"{VPG}-reverse", "server": journal_server.address,
                                 "volumes": ["vol0", "vol1"]}
        assert _status(journal_server)["status"] == "Recovered"
        for live in lives:
            assert _mounted(live)
        # the recovered directories are in use, and protected back
        (lives[0] / "after-failover").write_text("written at the recovery site\n")
        rev = f"{VPG}-reverse"
        deadline = time.monotonic() + 60
        while True:
            r = journal_server.cli("tag", rev, "back", "--json", check=False)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.3)
        for v, live in enumerate(lives):
            dest = tmp_path / f"back{v}"
            journal_server.cli("restore-file", rev, "back", f"vol{v}", "/", "--to", str(dest))
            assert_tree(tree_snapshot(live), dest, f"reverse-protected vol{v}")
        st = json.loads(journal_server.cli("status", rev, "--json").stdout)[0]
        assert all(v["connection"] == "connected" for v in st["volumes"])
    finally:
        for live in lives:
            _unmount_and_wait(live)
