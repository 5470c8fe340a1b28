"""End to end: real journal server process, real protected mounts replicating over loopback,
tagged and automatic checkpoints, snapshot mounts and restore-file checked against oracles
taken from the backing directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import JournalServerProcess, is_mounted, zfsrep
from test_capture_workload import RandomWorkload
from treesnap import diff_trees, tree_snapshot

from zfsrep import protocol
from zfsrep.view import open_view

pytestmark = pytest.mark.mount

VPG = "v"
VOL = "vol"


@pytest.fixture
def vpg(journal_server: JournalServerProcess) -> str:
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--history", "1m")
    return VPG


def replicated(mount_factory, server: JournalServerProcess, name: str = "m",
               volume: str = VOL, extra: tuple[str, ...] = ()):
    m = mount_factory(name, extra=("--vpg", VPG, "--volume", volume, "--server",
                                   server.address, *extra))
    m.expected_log.append("replication link")
    return m


def tag(server: JournalServerProcess, name: str, timeout: float = 30.0) -> dict:
    """Tag, retrying while the mount is (re)connecting."""
    deadline = time.monotonic() + timeout
    while True:
        r = server.cli("tag", VPG, name, "--json", check=False)
        if r.returncode == 0:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"tag {name}: {r.stderr}")
        time.sleep(0.3)


def checkpoints(server: JournalServerProcess, *args: str) -> list[dict]:
    return json.loads(server.cli("checkpoints", "--vpg", VPG, "--json", *args).stdout)


def resolve(server: JournalServerProcess, cp: object) -> dict:
    return protocol.call(protocol.parse_address(server.address), "resolve",
                         {"vpg": VPG, "checkpoint": str(cp), "volume": VOL})


@contextlib.contextmanager
def snapshot_mount(server: JournalServerProcess, cp: object, mnt: Path):
    mnt.mkdir(exist_ok=True)
    server.cli("snapshot", "mount", VPG, str(cp), str(mnt), "--log", str(mnt) + ".log")
    try:
        yield mnt
    finally:
        if is_mounted(mnt):
            zfsrep("snapshot", "umount", str(mnt), check=False)
        if is_mounted(mnt):
            os.system(f"fusermount3 -u -z {mnt}")


def assert_tree(oracle: dict, actual: Path, what: str) -> None:
    diffs = diff_trees(oracle, tree_snapshot(actual))
    assert not diffs, f"{what} differs from its oracle:\n" + "\n".join(diffs)


def test_tagged_snapshots_and_restore_equal_their_oracles(journal_server, vpg, mount_factory,
                                                         tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    work = RandomWorkload(m.mnt, seed=11)
    oracles: dict[str, dict] = {}
    for round_no in range(4):
        for _ in range(30):
            work.step()
        tag(journal_server, f"t{round_no}")
        oracles[f"t{round_no}"] = tree_snapshot(m.source)
    for name, oracle in oracles.items():
        with snapshot_mount(journal_server, name, tmp_path / f"snap-{name}") as snap:
            assert_tree(oracle, snap, f"snapshot {name}")
    dest = tmp_path / "restored"
    journal_server.cli("restore-file", VPG, "t3", VOL, "/", "--to", str(dest))
    assert_tree(oracles["t3"], dest, "restore-file of the whole volume")
    assert m.stop() == 0
    assert not m.log_problems()


def test_snapshot_mounts_are_read_only_and_several_can_be_open(journal_server, vpg,
                                                               mount_factory,
                                                               tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "f").write_text("one")
    tag(journal_server, "one")
    (m.mnt / "f").write_text("two")
    tag(journal_server, "two")
    with snapshot_mount(journal_server, "one", tmp_path / "s1") as s1, \
            snapshot_mount(journal_server, "two", tmp_path / "s2") as s2, \
            snapshot_mount(journal_server, "latest", tmp_path / "s3") as s3:
        assert (s1 / "f").read_text() == "one"
        assert (s2 / "f").read_text() == "two"
        assert (s3 / "f").read_text() == "two"
        with pytest.raises(OSError) as e:
            (s1 / "f").write_text("x")
        assert e.value.errno == 30  # EROFS
        with pytest.raises(OSError) as e:
            (s1 / "new").write_text("x")
        assert e.value.errno == 30
    assert m.stop() == 0


def _stepper(root: Path, stop: threading.Event, steps: list[int], limit: int = 100000) -> None:
    """Step i: write steps/i and fsync it, then append "i" to log and fsync that."""
    (root / "steps").mkdir(exist_ok=True)
    log_fd = os.open(root / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in range(1, limit):
            if stop.is_set():
                return
            fd = os.open(root / "steps" / f"{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, f"step {i}\n".encode() * 50)
            os.fsync(fd)
            os.close(fd)
            os.write(log_fd, f"{i}\n".encode())
            os.fsync(log_fd)
            steps.append(i)
            time.sleep(0.002)
    finally:
        os.close(log_fd)


def _check_prefix(view, cp_id: int) -> int:
    """Every checkpoint holds steps 1..k with nothing missing, and the log lines 1..k or
    1..k-1; returns k."""
    root = view.root
    steps_dir = view.lookup(root, b"steps")
    names = [] if steps_dir is None else [n for n, _node in view.readdir(steps_dir.ident)]
    got = sorted(int(n) for n in names)
    k = len(got)
    assert got == list(range(1, k + 1)), f"checkpoint {cp_id}: steps are not a prefix"
    log_node = view.lookup(root, b"log")
    lines = [] if log_node is None else view.read(log_node.ident, 0, log_node.size).split()
    numbers = [int(x) for x in lines]
    assert numbers == list(range(1, len(numbers) + 1)), f"checkpoint {cp_id}: log is torn"
    assert len(numbers) in (k, k - 1) or k == 0, f"checkpoint {cp_id}: log {len(numbers)} " \
                                                 f"vs steps {k}"
    return k


def test_every_automatic_checkpoint_is_a_prefix_closed_cut(journal_server, vpg, mount_factory
                                                           ) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    stop, steps = threading.Event(), []
    writer = threading.Thread(target=_stepper, args=(m.mnt, stop, steps))
    writer.start()
    try:
        time.sleep(6)
    finally:
        stop.set()
        writer.join()
    assert len(steps) > 100
    autos = [cp for cp in checkpoints(journal_server) if cp["kind"] == "auto"]
    assert len(autos) >= 4
    seen = []
    for cp in autos:
        where = resolve(journal_server, cp["id"])
        view = open_view(Path(where["volume_dir"]), where["seq"])
        try:
            seen.append(_check_prefix(view, cp["id"]))
        finally:
            view.close()
    assert seen == sorted(seen)
    assert seen[-1] > 0
    assert m.stop() == 0


def test_server_killed_mid_workload_loses_no_acknowledged_checkpoint(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    journal_server.expected_log += ["cutting invalid tail"]
    m = replicated(mount_factory, journal_server)
    m.start()
    work = RandomWorkload(m.mnt, seed=5)
    for _ in range(40):
        work.step()
    first = tag(journal_server, "before")
    oracle_before = tree_snapshot(m.source)
    listed_before = {cp["id"] for cp in checkpoints(journal_server)}

    stop, steps = threading.Event(), []
    writer = threading.Thread(target=_stepper, args=(m.mnt / "d", stop, steps))
    (m.mnt / "d").mkdir()
    writer.start()
    try:
        time.sleep(1.5)
        journal_server.kill()
        time.sleep(1.0)
        journal_server.start()
        time.sleep(1.5)
    finally:
        stop.set()
        writer.join()
    after = tag(journal_server, "after")
    oracle_after = tree_snapshot(m.source)
    listed_after = {cp["id"] for cp in checkpoints(journal_server)}
    assert listed_before <= listed_after, "an acknowledged checkpoint was lost"
    assert after["id"] > first["id"]
    for name, oracle in (("before", oracle_before), ("after", oracle_after)):
        dest = tmp_path / f"restore-{name}"
        journal_server.cli("restore-file", VPG, name, VOL, "/", "--to", str(dest))
        assert_tree(oracle, dest, f"checkpoint {name}")
    for cp in checkpoints(journal_server):
        if cp["kind"] == "auto":
            where = resolve(journal_server, cp["id"])
            view = open_view(Path(where["volume_dir"]), where["seq"])
            try:
                dir_node = view.lookup(view.root, b"d")
                if dir_node is not None:
                    steps_dir = view.lookup(dir_node.ident, b"steps")
                    names = [] if steps_dir is None else [
                        int(n) for n, _ in view.readdir(steps_dir.ident)]
                    assert sorted(names) == list(range(1, len(names) + 1))
            finally:
                view.close()
    assert m.stop() == 0


def test_writes_go_on_while_the_server_is_down_and_drain_after(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    assert journal_server.stop() == 0
    m = replicated(mount_factory, journal_server)
    m.start()  # the server is down: the mount comes up anyway
    data = os.urandom(1 << 20)
    for i in range(24):
        (m.mnt / f"f{i}").write_bytes(data[i:] + data[:i])
    os.sync()
    spool_bytes = sum(p.stat().st_size for p in (m.spool / "segments").iterdir())
    assert spool_bytes > 20 << 20
    m.restart()  # a new process holds no frames in memory: they go out from the spool's
    journal_server.start()  # files (sendfile for the large ones)
    tag(journal_server, "after-outage")
    oracle = tree_snapshot(m.source)
    dest = tmp_path / "restored"
    journal_server.cli("restore-file", VPG, "after-outage", VOL, "/", "--to", str(dest))
    assert_tree(oracle, dest, "restore after the outage")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # acknowledged segments leave the spool
        st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
        vol = st["volumes"][0]
        if vol["lag_records"] == 0 and (vol["spool_bytes"] or 0) < spool_bytes // 2:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"spool did not drain: {vol}")
    assert m.stop() == 0


def test_initial_sync_ships_existing_content_before_any_checkpoint(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    (m.source / "sub").mkdir()
    for i in range(40):
        (m.source / "sub" / f"file{i}").write_bytes(os.urandom(256 << 10))
    os.link(m.source / "sub" / "file0", m.source / "hard")
    os.symlink("sub/file1", m.source / "sym")
    os.setxattr(m.source / "sub" / "file2", "user.k", b"v")
    oracle = tree_snapshot(m.source)
    m.start()
    deadline = time.monotonic() + 60
    while not checkpoints(journal_server):
        assert time.monotonic() < deadline, "no checkpoint after the initial sync"
        time.sleep(0.3)
    first = checkpoints(journal_server)[0]
    dest = tmp_path / "first"
    journal_server.cli("restore-file", VPG, str(first["id"]), VOL, "/", "--to", str(dest))
    assert_tree(oracle, dest, "the first checkpoint after the initial sync")
    st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
    assert st["volumes"][0]["initial_sync"] == "done"
    assert m.stop() == 0


def test_status_reports_sla_rpo_history_and_volume_lag(journal_server, vpg, mount_factory
                                                       ) -> None:
    st = json.loads(journal_server.cli("status", "--json").stdout)
    assert st[0]["status"] == "Error" and st[0]["substatus"] == "VPG has no volumes"
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "x").write_bytes(b"x" * 10000)
    tag(journal_server, "one")
    time.sleep(1.5)
    st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
    assert st["status"] in ("Meeting SLA", "History Not Meeting SLA"), st
    assert 0 <= st["rpo_s"] <= 10
    assert st["journal_bytes"] > 0 and st["checkpoints"] >= 1
    vol = st["volumes"][0]
    assert vol["connection"] == "connected" and vol["initial_sync"] == "done"
    for key in ("lag_records", "lag_bytes", "spool_bytes", "durable_seq"):
        assert isinstance(vol[key], int), key
    text = journal_server.cli("status").stdout
    assert f"VPG {VPG}:" in text and "volume vol: connected" in text
    assert m.stop() == 0
    time.sleep(0.3)
    st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
    assert (st["status"], st["substatus"]) == ("Error", "Site disconnection")


def test_restore_file_stays_inside_dest_and_refuses_to_overwrite(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    os.symlink("/etc", m.mnt / "abs")
    os.symlink("../../../../../../../tmp", m.mnt / "rel")
    (m.mnt / "dir").mkdir()
    (m.mnt / "dir" / "passwd").write_text("not the real one")
    tag(journal_server, "hostile")
    dest = tmp_path / "dest"
    dest.mkdir()
    journal_server.cli("restore-file", VPG, "hostile", VOL, "/", "--to", str(dest))
    assert os.readlink(dest / "abs") == "/etc" and os.readlink(dest / "rel").endswith("tmp")
    assert (dest / "dir" / "passwd").read_text() == "not the real one"
    r = journal_server.cli("restore-file", VPG, "hostile", VOL, "/dir", "--to", str(dest),
                           check=False)
    assert r.returncode == 7, r.stderr
    r = journal_server.cli("restore-file", VPG, "hostile", VOL, "/abs/passwd", "--to",
                           str(tmp_path / "d2"), check=False)
    assert r.returncode in (3, 7), r.stderr
    assert not (tmp_path / "d2").exists() or not any((tmp_path / "d2").iterdir())
    # a symlink planted in DEST is not followed with --force either
    outside = tmp_path / "outside"
    outside.mkdir()
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    os.symlink(outside, dest2 / "dir")
    journal_server.cli("restore-file", VPG, "hostile", VOL, "/", "--to", str(dest2), "--force",
                       check=False)
    assert not any(outside.iterdir())
    assert m.stop() == 0


def test_a_tag_waits_for_a_mount_that_is_reconnecting(journal_server, vpg, mount_factory
                                                      ) -> None:
    """Right after the server restarts, its mounts are still reconnecting: a tag given then
    waits for them (up to CONNECT_WAIT) instead of failing; a volume that stays away fails
    it after that wait, with its name."""
    m = replicated(mount_factory, journal_server)
    m.start()
    tag(journal_server, "up")
    (m.mnt / "f").write_text("before the restart\n")
    journal_server.kill()
    journal_server.start()
    t0 = time.monotonic()
    r = journal_server.cli("tag", VPG, "right-after", "--json")  # no retries
    assert json.loads(r.stdout)["tag"] == "right-after"
    assert time.monotonic() - t0 < 10
    dest = journal_server.store.parent / "right-after"
    journal_server.cli("restore-file", VPG, "right-after", VOL, "/f", "--to", str(dest))
    assert dest.read_text() == "before the restart\n"
    assert m.stop() == 0
    t0 = time.monotonic()
    r = journal_server.cli("tag", VPG, "gone", check=False)
    assert r.returncode == 4 and f"volume {VOL} is not connected" in r.stderr
    assert time.monotonic() - t0 >= 9


def test_cli_errors_have_distinct_exit_codes(journal_server, vpg, tmp_path: Path) -> None:
    cli = journal_server.cli
    assert cli("vpg", "create", VPG, check=False).returncode == 4
    assert cli("vpg", "create", "bad/name", check=False).returncode == 2
    assert cli("vpg", "create", "x", "--history", "40d", check=False).returncode == 2
    assert cli("tag", "nosuch", "t", check=False).returncode == 3
    assert cli("tag", VPG, "t", check=False).returncode == 4  # no volumes
    assert cli("checkpoints", "--selector", "vpg=v;bogus=1", check=False).returncode == 2
    assert cli("checkpoints", "--min-age", "5x", check=False).returncode == 2
    assert cli("snapshot", "mount", VPG, "nosuch", str(tmp_path), check=False).returncode == 3
    r = zfsrep("vpg", "list", "--server", f"127.0.0.1:{free_closed_port()}", check=False)
    assert r.returncode == 8 and "cannot reach the journal server" in r.stderr
    assert "Traceback" not in r.stderr
    listed = json.loads(cli("vpg", "list", "--json").stdout)
    assert [v["name"] for v in listed] == [VPG]
    cli("vpg", "delete", VPG)
    assert cli("vpg", "delete", VPG, check=False).returncode == 3
    assert json.loads(cli("vpg", "list", "--json").stdout) == []


def _policies(pid: int) -> dict[str, set[int]]:
    """The scheduling policies of a process's threads: the pacer's, and all others'."""
    out: dict[str, set[int]] = {"pacer": set(), "others": set()}
    for t in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
            out["pacer" if comm == "zfsrep-pacer" else "others"].add(os.sched_getscheduler(int(t)))
    return out


def _wait_policies(pid: int, want: dict[str, set[int]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := _policies(pid)) != want:
        assert time.monotonic() < deadline, f"server threads {got}, expected {want}"
        time.sleep(0.1)


def test_the_server_takes_idle_cpu_until_a_vpg_falls_behind_its_rpo_target(
        journal_server, mount_factory, tmp_path: Path) -> None:
    """--cpu-priority background (the default): every thread of the journal server but its
    pacer runs under SCHED_IDLE while the VPGs are within their RPO targets. A VPG whose
    RPO goes half way from its checkpoint interval to its target (here: a mount that stops
    answering, so no checkpoint is made) brings them, and the links' sending, back to normal
    priority until it has caught up."""
    idle, other = os.SCHED_IDLE, os.SCHED_OTHER
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--rpo", "3s")
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "f").write_bytes(b"x" * 100_000)
    tag(journal_server, "first")
    assert journal_server.proc is not None and m.proc is not None
    pid = journal_server.proc.pid
    _wait_policies(pid, {"pacer": {other}, "others": {idle}})
    st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
    assert st["replication_priority"] == "background"
    assert "replication at background CPU priority" in journal_server.cli("status").stdout
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        _wait_policies(pid, {"pacer": {other}, "others": {other}})
        st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
        assert st["replication_priority"] == "normal"
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    _wait_policies(pid, {"pacer": {other}, "others": {idle}})
    tag(journal_server, "after")
    assert m.stop() == 0
    text = m.log.read_text()
    assert text.index("replication at normal CPU priority") < text.index(
        "replication at background CPU priority")


def test_serve_cpu_priority_normal_runs_the_server_ordinarily(tmp_path: Path) -> None:
    """--cpu-priority normal (here through the daemon's own start, which passes it on)."""
    from conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    r = zfsrep("serve", "--store", str(tmp_path / "store"), "--listen", address,
               "--cpu-priority", "normal")
    pid = int(r.stdout.split("(pid ")[1].split(",")[0])
    try:
        zfsrep("vpg", "list", "--server", address)
        assert _policies(pid) == {"pacer": set(), "others": {os.SCHED_OTHER}}
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    bad = zfsrep("serve", "--store", str(tmp_path / "s3"), "--cpu-priority", "high",
                 check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def free_closed_port() -> int:
    from conftest import free_port

    return free_port()


def test_malformed_peers_get_errors_and_others_are_still_served(journal_server, vpg) -> None:
    import socket
    import struct

    host, port = protocol.parse_address(journal_server.address)
    journal_server.expected_log += ["connection from"]
    # garbage, an oversized length, a bad hello, a truncated message
    for payload in (b"GET / HTTP/1.0\r\n\r\n", struct.pack(">I", 1 << 31),
                    protocol.pack({"t": "hello", "proto": "other/9"}),
                    struct.pack(">I", 100) + b"\x81"):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            with contextlib.suppress(OSError):
                s.recv(4096)
    # a volume whose frame fails its checksum: an error reply, nothing journaled
    from zfsrep import frames
    frame = bytearray(frames.encode_frame([[1, 0, 9, 1, b"n", b"v"]]))
    frame[-1] ^= 0xFF

    async def bad_volume() -> dict:
        conn, welcome = await protocol.connect((host, port), {
            "role": "volume", "vpg": VPG, "volume": "evil", "root_ident": 5,
            "source": "/x", "host": "h", "spool_id": "s", "last_seq": 0, "synced_seq": 0})
        async with conn:
            await conn.send({"t": "data", "frame": bytes(frame)})
            return await conn.receive()

    import trio
    reply = trio.run(bad_volume)
    assert reply["t"] == "error" and reply["code"] == 5, reply
    st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
    evil = [v for v in st["volumes"] if v["name"] == "evil"][0]
    assert evil["durable_seq"] == 0
    assert json.loads(journal_server.cli("vpg", "list", "--json").stdout)[0]["name"] == VPG


def test_mount_restart_continues_the_stream_and_delete_needs_force(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "a").write_text("first session")
    tag(journal_server, "s1")
    m.restart()
    (m.mnt / "b").write_text("second session")
    tag(journal_server, "s2")
    oracle = tree_snapshot(m.source)
    dest = tmp_path / "r"
    journal_server.cli("restore-file", VPG, "s2", VOL, "/", "--to", str(dest))
    assert_tree(oracle, dest, "after a mount restart")
    r = journal_server.cli("vpg", "delete", VPG, check=False)
    assert r.returncode == 4 and "connected" in r.stderr
    assert m.stop() == 0
    time.sleep(0.3)
    journal_server.cli("vpg", "delete", VPG)
    assert not (journal_server.store / "vpgs" / VPG).exists()


def test_a_removed_volume_keeps_its_checkpoints_and_frees_its_name(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    """vpg remove-volume: for a protected directory given up (or whose spool is lost): new
    checkpoints go on without it, older ones still restore it, across a server restart, and
    the name can protect a directory again."""
    cli = journal_server.cli
    a = replicated(mount_factory, journal_server, "a", volume="va")
    b = replicated(mount_factory, journal_server, "b", volume="vb")
    a.start()
    b.start()
    (a.mnt / "x").write_text("a1\n")
    (b.mnt / "y").write_text("b1\n")
    t1 = tag(journal_server, "t1")
    oracle_b = tree_snapshot(b.source)
    r = cli("vpg", "remove-volume", VPG, "vb", check=False)
    assert r.returncode == 4 and "connected: stop its mount first" in r.stderr
    assert cli("vpg", "remove-volume", VPG, "nosuch", check=False).returncode == 3
    assert b.stop() == 0
    out = json.loads(cli("vpg", "remove-volume", VPG, "vb", "--json").stdout)
    assert out["volume"] == "vb" and out["last_checkpoint"] >= t1["id"]
    t2 = tag(journal_server, "t2")  # the VPG goes on with the volume it has
    assert set(t2["positions"]) == {"va"}
    cli("restore-file", VPG, "t1", "vb", "/", "--to", str(tmp_path / "b-at-t1"))
    assert_tree(oracle_b, tmp_path / "b-at-t1", "a removed volume at an older checkpoint")
    r = cli("restore-file", VPG, "t2", "vb", "/", "--to", str(tmp_path / "nope"), check=False)
    assert r.returncode == 3
    listed = json.loads(cli("vpg", "list", "--json").stdout)[0]
    assert listed["volumes"] == ["va"]
    assert [v["name"] for v in listed["removed_volumes"]] == ["vb"]

    c = replicated(mount_factory, journal_server, "c", volume="vb")  # the name is free again
    c.start()
    (c.mnt / "z").write_text("another directory\n")
    tag(journal_server, "t3")
    oracle_c = tree_snapshot(c.source)
    assert journal_server.stop() == 0
    journal_server.start()
    tag(journal_server, "t4")
    for name, oracle in (("t1", oracle_b), ("t4", oracle_c)):
        dest = tmp_path / f"vb-at-{name}"
        cli("restore-file", VPG, name, "vb", "/", "--to", str(dest))
        assert_tree(oracle, dest, f"volume vb at {name}")
    # a failover test at t1 brings up the removed volume, not the new one of its name
    op = json.loads(cli("failover-test", VPG, "t1", "--json").stdout)
    try:
        assert_tree(oracle_b, Path(op["volumes"]["vb"]["path"]), "removed vb in a test")
    finally:
        cli("stop-test", VPG)
    # a volume no checkpoint holds (a VPG that has taken none yet) is simply deleted
    cli("vpg", "create", "quiet", "--checkpoint-interval", "1h")
    q = mount_factory("q", extra=("--vpg", "quiet", "--volume", "vq", "--server",
                                  journal_server.address))
    q.expected_log.append("replication link")
    q.start()
    (q.mnt / "f").write_text("never in a checkpoint\n")
    assert q.stop() == 0
    r = cli("vpg", "remove-volume", "quiet", "vq")
    assert "no checkpoint held it: its data is deleted" in r.stdout
    assert not (journal_server.store / "vpgs" / "quiet" / "volumes" / "vq").exists()
    assert not (journal_server.store / "vpgs" / "quiet" / "removed").exists()
    assert c.stop() == 0  # the name's second volume goes too: both stay findable
    cli("vpg", "remove-volume", VPG, "vb")
    for name, oracle in (("t1", oracle_b), ("t4", oracle_c)):
        dest = tmp_path / f"vb-again-at-{name}"
        cli("restore-file", VPG, name, "vb", "/", "--to", str(dest))
        assert_tree(oracle, dest, f"removed volume vb at {name}")
    assert a.stop() == 0


def test_after_a_lossy_crash_the_volume_is_taken_out_and_protected_again(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    """The way back the refusal names: remove-volume, then protect under the same name with
    a new spool; the new stream equals the directory, the old checkpoints stay."""
    import struct

    from zfsrep.spool import RUN_STATE

    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "a").write_text("before the crash\n")
    tag(journal_server, "before")
    oracle_before = tree_snapshot(m.source)
    assert m.stop() == 0
    state = m.spool / RUN_STATE  # what a kill -9 between a create's answer and the spool
    raw = bytearray(state.read_bytes())  # leaves: its record (not a file's data) is lost
    struct.pack_into("=QQQ", raw, 16, 0, 3, 0)
    struct.pack_into("=Q", raw, 80, 10 ** 6)
    state.write_bytes(bytes(raw))
    (m.source / "b").write_text("written in the crash window\n")  # (the backing has it)
    with pytest.raises(AssertionError, match="mount daemon exited 4") as info:
        m.start()
    assert f"zfsrep vpg remove-volume {VPG} {VOL}" in str(info.value)
    journal_server.cli("vpg", "remove-volume", VPG, VOL)
    m.spool = m.spool.with_name("spool2")
    m.start()
    after = tag(journal_server, "after")
    assert set(after["positions"]) == {VOL}
    for name, oracle in (("before", oracle_before), ("after", tree_snapshot(m.source))):
        dest = tmp_path / name
        journal_server.cli("restore-file", VPG, name, VOL, "/", "--to", str(dest))
        assert_tree(oracle, dest, f"checkpoint {name}")
    assert (tmp_path / "after" / "b").exists()
    assert m.stop() == 0


def test_a_mount_killed_after_fsync_resyncs_and_replicates_the_directory(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    """kill -9 right after an application's fsync, three times: each restart goes on (records
    again the files whose records were lost, if any), and a checkpoint tagged after it
    restores to exactly the directory."""
    m = replicated(mount_factory, journal_server)
    journal_server.expected_log.append("connection closed inside a message")  # (the kills)
    for attempt in range(3):
        m.start()
        with open(m.mnt / "f", "r+b" if attempt else "wb") as f:
            for i in range(24):
                f.seek(((attempt * 7 + i * 13) % 40) << 20)
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        os.chmod(m.mnt / "f", 0o600 + attempt)
        m.kill()
    m.start()
    m.expected_log += ["without a clean shutdown", "stopped without writing everything"]
    tag(journal_server, "after")
    oracle = tree_snapshot(m.source)
    dest = tmp_path / "after"
    journal_server.cli("restore-file", VPG, "after", VOL, "/", "--to", str(dest))
    assert_tree(oracle, dest, "checkpoint after")
    assert m.stop() == 0


def test_spool_limit_stops_capture_not_the_application(journal_server, vpg, mount_factory
                                                        ) -> None:
    assert journal_server.stop() == 0
    m = replicated(mount_factory, journal_server, extra=("--spool-limit", "8"))
    m.expected_log.append("capture stopped")
    m.start()
    for i in range(16):  # 16 MiB of incompressible data through an 8 MiB spool
        (m.mnt / f"f{i}").write_bytes(os.urandom(1 << 20))
    assert (m.source / "f15").stat().st_size == 1 << 20  # the application was not stopped
    journal_server.start()
    deadline = time.monotonic() + 30
    while True:
        st = json.loads(journal_server.cli("status", VPG, "--json").stdout)[0]
        if st["status"] == "Not Meeting SLA" and "Capture stopped" in st["substatus"]:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    assert m.stop() == 0


def test_snapshot_foreground_and_checkpoint_selectors(journal_server, vpg, mount_factory,
                                                      tmp_path: Path) -> None:
    import sys

    m = replicated(mount_factory, journal_server)
    m.start()
    (m.mnt / "f").write_text("hello")
    tag(journal_server, "fg")
    everything = checkpoints(journal_server)
    ids = [cp["id"] for cp in everything]  # automatic ones keep coming: compare prefixes
    assert [cp["id"] for cp in checkpoints(journal_server, "--max-age", "1h")][:len(ids)] == ids
    assert checkpoints(journal_server, "--min-age", "1h") == []
    sel = json.loads(journal_server.cli("checkpoints", "--selector",
                                        f"vpg={VPG};minAge=0s;maxAge=3d", "--json").stdout)
    assert [cp["id"] for cp in sel][:len(ids)] == ids
    assert [cp["tag"] for cp in everything if cp["kind"] == "tagged"] == ["fg"]
    mnt = tmp_path / "fg"
    mnt.mkdir()
    env = dict(os.environ, ZFSREP_SERVER=journal_server.address)
    proc = subprocess.Popen([sys.executable, "-m", "zfsrep.cli", "snapshot", "mount", VPG,
                             "fg", str(mnt), "--foreground"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (mnt / "f").read_text() == "hello"
        zfsrep("snapshot", "umount", str(mnt))
        assert proc.wait(timeout=30) == 0
    finally:
        if is_mounted(mnt):
            os.system(f"fusermount3 -u -z {mnt}")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    r = zfsrep("snapshot", "umount", str(m.mnt), check=False)
    assert r.returncode == 4  # not a snapshot mount: refused
    assert m.stop() == 0


def test_vpg_delete_force_while_connected_leaves_the_mount_serving(
        journal_server, vpg, mount_factory) -> None:
    m = replicated(mount_factory, journal_server)
    m.expected_log.append("no VPG named")
    journal_server.expected_log.append("no VPG named")  # the mount keeps asking: refused
    m.start()
    (m.mnt / "a").write_text("before")
    tag(journal_server, "t")
    journal_server.cli("vpg", "delete", VPG, "--force")
    assert not (journal_server.store / "vpgs" / VPG).exists()
    (m.mnt / "b").write_text("after")  # protection never blocks the application
    assert (m.source / "b").read_text() == "after"
    assert json.loads(journal_server.cli("vpg", "list", "--json").stdout) == []
    assert journal_server.cli("status", VPG, check=False).returncode == 3
    assert m.stop() == 0


def test_a_trimmed_spool_is_refused_by_a_server_that_lacks_its_start(
        journal_server, vpg, mount_factory, tmp_path: Path) -> None:
    m = replicated(mount_factory, journal_server)
    m.start()
    deadline = time.monotonic() + 30
    i = 0
    def first_segment() -> str:
        return min((p.name for p in (m.spool / "segments").iterdir()), default="")

    while first_segment() in ("", f"{1:020d}.zfr"):
        (m.mnt / f"f{i}").write_bytes(os.urandom(2 << 20))  # acknowledged, then trimmed
        i += 1
        assert time.monotonic() < deadline, "the spool was never trimmed"
        time.sleep(0.3)
    assert m.stop() == 0
    # the recovery site loses its store: a new server does not have records 1..N
    assert journal_server.stop() == 0
    import shutil
    shutil.rmtree(journal_server.store)
    journal_server.start()
    journal_server.cli("vpg", "create", VPG)
    journal_server.expected_log.append("the spool starts at record")
    r = zfsrep("protect", str(m.mnt), "--source", str(m.source), "--spool", str(m.spool),
               "--vpg", VPG, "--volume", VOL, "--server", journal_server.address, check=False)
    try:
        assert r.returncode == 4, r.stderr
        assert "new spool" in r.stderr
    finally:
        if is_mounted(m.mnt):
            os.system(f"fusermount3 -u {m.mnt}")
