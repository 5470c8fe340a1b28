"""Crash-consistent checkpoints across volumes (DESIGN invariant 2): the completion gate on its
own, and end to end with two protected mounts in separate processes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import trio
from conftest import JournalServerProcess
from test_replication import VPG, checkpoints, replicated

from zfsrep import protocol
from zfsrep.barrier import CompletionGate
from zfsrep.errors import ZfsrepError
from zfsrep.view import open_view

# ---- the gate ------------------------------------------------------------------------------


async def test_a_frozen_gate_holds_answers_until_thawed() -> None:
    changes: list[bool] = []
    gate = CompletionGate(changes.append)
    gate.freeze()
    answered: list[float] = []

    async def handler() -> None:
        await gate.wait_open()
        answered.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler)
        await trio.sleep(0.05)
        assert not answered  # held while frozen
        assert gate.thaw() is True  # the barrier held: frozen without a break
    assert answered
    assert changes == [True, False]
    assert gate.stats.freezes == 1 and gate.stats.expired == 0
    assert gate.stats.max_held_s >= 0.04


async def test_a_gate_thaws_by_itself_and_then_says_the_barrier_did_not_hold() -> None:
    gate = CompletionGate(max_freeze=0.1)
    gate.freeze()
    with trio.fail_after(2):
        await gate.wait_open()  # returns once max_freeze is over, without a thaw
    assert not gate.frozen
    assert gate.thaw() is False
    assert gate.stats.expired == 1


async def test_a_late_thaw_of_an_expired_gate_is_refused_even_without_waiters() -> None:
    gate = CompletionGate(max_freeze=0.05)
    gate.freeze()
    await trio.sleep(0.1)
    assert gate.thaw() is False


async def test_an_open_gate_does_not_wait_and_thaw_is_harmless() -> None:
    gate = CompletionGate()
    with trio.fail_after(1):
        await gate.wait_open()
    assert gate.thaw() is False  # nothing was frozen


# ---- two volumes in two processes ----------------------------------------------------------


def _alternating_steps(roots: list[Path], stop: threading.Event, done: list[int]) -> None:
    """Step i appends "i" to the log of volume i % 2 and fsyncs it; step i+1 starts only
    after that fsync returned, so step i completed before step i+1 was issued."""
    fds = [os.open(r / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for r in roots]
    try:
        for i in range(1, 1_000_000):
            if stop.is_set():
                return
            fd = fds[i % len(fds)]
            os.write(fd, f"{i}\n".encode())
            os.fsync(fd)
            done.append(i)
    finally:
        for fd in fds:
            os.close(fd)


def _steps_in(server: JournalServerProcess, cp_id: int, volume: str) -> list[int]:
    """The steps in ``volume``'s log at checkpoint ``cp_id`` (none if the volume had not
    joined the VPG yet: then the cut holds no step of the other volume either)."""
    try:
        where = protocol.call(protocol.parse_address(server.address), "resolve",
                              {"vpg": VPG, "checkpoint": str(cp_id), "volume": volume})
    except ZfsrepError as e:
        if "has no volume" in str(e):
            return []
        raise
    view = open_view(Path(where["volume_dir"]), where["seq"])
    try:
        node = view.lookup(view.root, b"log")
        return [] if node is None else [int(x) for x in view.read(node.ident, 0,
                                                                   node.size).split()]
    finally:
        view.close()


@pytest.mark.mount
def test_every_checkpoint_is_one_consistent_cut_across_two_volumes(
        journal_server, mount_factory) -> None:
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--history", "1m")
    mounts = [replicated(mount_factory, journal_server, name=f"m{v}", volume=f"vol{v}")
              for v in (0, 1)]
    for m in mounts:
        m.start()
    stop, done = threading.Event(), []
    writer = threading.Thread(target=_alternating_steps, args=([m.mnt for m in mounts], stop,
                                                                done))
    writer.start()
    try:
        time.sleep(5)
        tagged = json.loads(journal_server.cli("tag", VPG, "mid", "--json").stdout)
        time.sleep(2)
    finally:
        stop.set()
        writer.join()
    assert len(done) > 200, "the workload made too little progress to prove anything"
    cps = [cp for cp in checkpoints(journal_server) if cp["kind"] in ("auto", "tagged")]
    assert len(cps) >= 5 and tagged["id"] in [cp["id"] for cp in cps]
    cuts = []
    for cp in cps:
        per_volume = [_steps_in(journal_server, cp["id"], f"vol{v}") for v in (0, 1)]
        for v, steps in enumerate(per_volume):
            assert all(s % 2 == v for s in steps)
            assert steps == sorted(steps), f"checkpoint {cp['id']}: vol{v} log is torn"
        got = sorted(per_volume[0] + per_volume[1])
        k = len(got)
        assert got == list(range(1, k + 1)), (
            f"checkpoint {cp['id']} is not a consistent cut: it holds steps {got[:3]}...; "
            f"missing {sorted(set(range(1, got[-1] + 1)) - set(got))[:5]}")
        cuts.append(k)
    assert cuts == sorted(cuts) and cuts[-1] > 0
    for m in mounts:
        assert m.stop() == 0
        assert "checkpoint barriers:" in m.log.read_text()


@pytest.mark.mount
def test_tag_runs_pre_and_post_commands_around_the_checkpoint(journal_server, mount_factory
                                                             ) -> None:
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1h")
    m = replicated(mount_factory, journal_server)
    m.start()
    flag, ran = m.mnt / "quiesced", m.source.parent / "post-ran"
    journal_server.cli("tag", VPG, "app", "--pre", f"echo frozen > {flag}",
                       "--post", f"rm {flag} && touch {ran}")
    assert not flag.exists() and ran.exists()
    assert _read_in(journal_server, "app", "quiesced") == b"frozen\n"  # taken between them

    ran.unlink()
    r = journal_server.cli("tag", VPG, "never", "--pre", "exit 3", "--post", f"touch {ran}",
                           check=False)
    assert r.returncode == 9 and "--pre command exited with 3" in r.stderr
    assert "Traceback" not in r.stderr
    assert "never" not in [cp["tag"] for cp in checkpoints(journal_server)]
    assert ran.exists()  # --post runs whenever --pre ran

    r = journal_server.cli("tag", VPG, "late", "--post", "exit 1", check=False)
    assert r.returncode == 9 and "--post command exited with 1" in r.stderr
    assert "late" in [cp["tag"] for cp in checkpoints(journal_server)]  # taken all the same

    r = journal_server.cli("tag", "no-such-vpg", "x", "--post", f"rm {ran}", check=False)
    assert r.returncode == 3 and not ran.exists()  # the tag's error is reported; post ran
    assert m.stop() == 0


def _read_in(server: JournalServerProcess, cp: str, name: str) -> bytes | None:
    where = protocol.call(protocol.parse_address(server.address), "resolve",
                          {"vpg": VPG, "checkpoint": cp, "volume": "vol"})
    view = open_view(Path(where["volume_dir"]), where["seq"])
    try:
        node = view.lookup(view.root, name.encode())
        return None if node is None else view.read(node.ident, 0, node.size)
    finally:
        view.close()
