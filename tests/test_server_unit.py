"""Unit tests of server pieces that need no process: a mark on a connection that just closed
is an answer ("disconnected"), never an exception that could stop the server; the barrier's
rules for accepting the positions of several volumes."""

from __future__ import annotations

import trio
import trio.testing

from zfsrep import protocol
from zfsrep.server import VolumeConnection


async def test_mark_on_a_closed_connection_is_an_answer() -> None:
    a, _b = trio.testing.memory_stream_pair()
    conn = protocol.MessageStream(a)
    await conn.aclose()
    vc = VolumeConnection(conn, trio.CancelScope())
    assert await vc.position() == (None, "the mount disconnected")


async def test_mark_returns_the_position_the_mount_answers() -> None:
    a, b = trio.testing.memory_stream_pair()
    server_side, mount_side = protocol.MessageStream(a), protocol.MessageStream(b)
    vc = VolumeConnection(server_side, trio.CancelScope())

    async def mount() -> None:
        msg = await mount_side.receive()
        assert msg is not None and msg["t"] == "mark"
        vc.answered({"t": "marked", "id": msg["id"], "seq": 42, "reason": None})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount)
        assert await vc.position() == (42, None)


class _FakeMount:
    """The mount's side of a volume connection: answers freeze and thaw as told."""

    def __init__(self, seq: int | None, held: bool = True) -> None:
        a, b = trio.testing.memory_stream_pair()
        self.server_side, self.side = protocol.MessageStream(a), protocol.MessageStream(b)
        self.vc = VolumeConnection(self.server_side, trio.CancelScope())
        self.seq, self.held = seq, held
        self.seen: list[str] = []

    async def serve(self) -> None:
        while (msg := await self.side.receive()) is not None:
            self.seen.append(msg["t"])
            if msg["t"] == "freeze":
                answer = {"t": "frozen", "seq": self.seq,
                          "reason": None if self.seq is not None else "initial sync is running"}
            else:
                answer = {"t": "thawed", "held": self.held}
            self.vc.answered(dict(answer, id=msg["id"]))


async def _positions(tmp_path, mounts: list[_FakeMount]):
    from types import SimpleNamespace

    from zfsrep.server import JournalServer
    from zfsrep.store import Store

    server = JournalServer(Store(tmp_path / "store"))
    vols = [SimpleNamespace(name=f"v{i}", conn=m.vc) for i, m in enumerate(mounts)]
    outcome: list = []
    async with trio.open_nursery() as nursery:
        for m in mounts:
            nursery.start_soon(m.serve)
        try:
            outcome.append(await server._positions(vols))  # type: ignore[arg-type]
        except Exception as e:  # raised after the nursery, not inside an exception group
            outcome.append(e)
        nursery.cancel_scope.cancel()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


async def test_a_barrier_freezes_then_thaws_every_volume(tmp_path) -> None:
    mounts = [_FakeMount(10), _FakeMount(20)]
    assert await _positions(tmp_path, mounts) == {"v0": 10, "v1": 20}
    assert [m.seen for m in mounts] == [["freeze", "thaw"], ["freeze", "thaw"]]


async def test_a_barrier_is_refused_when_a_volume_thawed_by_itself(tmp_path) -> None:
    import pytest

    from zfsrep.errors import StateError

    mounts = [_FakeMount(10), _FakeMount(20, held=False)]
    with pytest.raises(StateError, match="v1 thawed by itself"):
        await _positions(tmp_path, mounts)


async def test_a_volume_that_cannot_freeze_fails_the_barrier_and_the_others_thaw(tmp_path
                                                                                 ) -> None:
    import pytest

    from zfsrep.errors import StateError

    mounts = [_FakeMount(10), _FakeMount(None)]
    with pytest.raises(StateError, match="v1: initial sync is running"):
        await _positions(tmp_path, mounts)
    assert mounts[0].seen == ["freeze", "thaw"]  # never left frozen


async def test_one_volume_is_marked_without_a_barrier(tmp_path) -> None:
    m = _FakeMount(5)

    async def serve_mark() -> None:
        msg = await m.side.receive()
        m.seen.append(msg["t"])
        m.vc.answered({"t": "marked", "id": msg["id"], "seq": 5, "reason": None})

    from types import SimpleNamespace

    from zfsrep.server import JournalServer
    from zfsrep.store import Store

    server = JournalServer(Store(tmp_path / "store"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_mark)
        got = await server._positions([SimpleNamespace(name="v0", conn=m.vc)])  # type: ignore
    assert got == {"v0": 5} and m.seen == ["mark"]


def test_a_volume_removal_cut_short_by_a_crash_is_finished_at_load(tmp_path) -> None:
    """remove_volume writes its marker into the volume's directory, then moves it: a crash
    in between leaves a directory that load treats as removed and moves aside."""
    from zfsrep.store import Store, VolumeMeta, VpgSettings

    store = Store(tmp_path / "store")
    store.create_vpg(VpgSettings(name="g"))
    for name in ("keep", "gone"):
        store.save_volume("g", VolumeMeta(name=name, root_ident=7, source="/s", host="h",
                                          spool_id=name))
    marker = store.volume_dir("g", "gone") / "removed.json"
    marker.write_text('{"name": "gone", "last_checkpoint": 12, "root_ident": 7, '
                      '"removed": "2026-11-22T00:00:00Z"}')
    assert store.volume_names("g") == ["keep"]
    (removed,) = store.removed_volumes("g")
    assert (removed.name, removed.last_checkpoint) == ("gone", 12)
    assert removed.dir == store.vpg_dir("g") / "removed" / "gone.12"
    assert (removed.dir / "volume.json").exists()
    assert not store.volume_dir("g", "gone").exists()  # the name is free


def test_a_volume_no_checkpoint_holds_is_discarded_whole(tmp_path) -> None:
    from zfsrep.store import Store, VolumeMeta, VpgSettings

    store = Store(tmp_path / "store")
    store.create_vpg(VpgSettings(name="g"))
    store.save_volume("g", VolumeMeta(name="v", root_ident=7, source="/s", host="h",
                                      spool_id="x"))
    (store.volume_dir("g", "v") / "journal").mkdir()
    store.discard_volume("g", "v")
    assert store.volume_names("g") == [] and store.removed_volumes("g") == []
    assert not any((store.vpg_dir("g") / "volumes").iterdir())


def _vpg(interval: float, rpo: float, checkpoint_age: float | None, *,
         connected: bool = True, synced: bool = True, volumes: int = 1):
    from types import SimpleNamespace

    now = 1_000_000.0
    latest = (None if checkpoint_age is None
              else SimpleNamespace(time_ns=int((now - checkpoint_age) * 1e9)))
    vols = {f"v{i}": SimpleNamespace(conn=object() if connected else None,
                                     meta=SimpleNamespace(synced_seq=5 if synced else 0))
            for i in range(volumes)}
    return now, SimpleNamespace(volumes=vols, log=SimpleNamespace(latest=lambda: latest),
                                settings=SimpleNamespace(checkpoint_interval_s=interval,
                                                         rpo_s=rpo))


def test_rpo_pressure_measures_the_way_from_the_interval_to_the_target() -> None:
    from zfsrep.pacer import rpo_pressure

    for age, want in ((0.5, 0.0), (5.0, 0.0), (7.5, 0.5), (10.0, 1.0), (15.0, 2.0)):
        now, vpg = _vpg(5.0, 10.0, age)
        assert rpo_pressure(vpg, now) == want, age
    now, vpg = _vpg(5.0, 5.0, 5.5)  # no slack: late at once
    assert rpo_pressure(vpg, now) == 1.0
    now, vpg = _vpg(5.0, 5.0, 4.0)
    assert rpo_pressure(vpg, now) == 0.0
    # nothing a faster server could change: no checkpoint, a volume away or still syncing
    for kw in ({"checkpoint_age": None}, {"connected": False}, {"synced": False},
               {"volumes": 0}):
        args = {"checkpoint_age": 30.0, **kw}
        now, vpg = _vpg(5.0, 10.0, args.pop("checkpoint_age"), **args)
        assert rpo_pressure(vpg, now) is None, kw


def test_the_pacer_switches_with_hysteresis_and_puts_threads_back(monkeypatch) -> None:
    """A pacer in this process: hurries past HURRY_AT, calms below CALM_AT (not between),
    announces each change once, and the threads it put in the background come back."""
    import os
    import threading
    import time

    from zfsrep import pacer as pacer_mod

    monkeypatch.setattr(pacer_mod, "PACE_INTERVAL", 0.02)
    state = {"age": 0.0}

    class Log:
        @staticmethod
        def latest():
            from types import SimpleNamespace
            return SimpleNamespace(time_ns=int((time.time() - state["age"]) * 1e9))

    _, vpg = _vpg(1.0, 5.0, 0.0)  # hurry at RPO 3 s, calm below 2 s
    vpg.log = Log()
    said: list[bool] = []
    p = pacer_mod.Pacer({"v": vpg}, said.append)
    worker = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    worker.start()

    def wait_for(cond) -> None:
        deadline = time.monotonic() + 5
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        p.start()
        wait_for(lambda: os.sched_getscheduler(worker.native_id) == os.SCHED_IDLE)
        assert p.background and said == []
        state["age"] = 3.5
        wait_for(lambda: not p.background)
        wait_for(lambda: os.sched_getscheduler(worker.native_id) == os.SCHED_OTHER)
        state["age"] = 2.5  # between the two marks: stays
        time.sleep(0.1)
        assert not p.background
        state["age"] = 1.0
        wait_for(lambda: p.background)
        assert said == [False, True]
    finally:
        p.stop()
        from zfsrep.syscalls import set_threads_idle

        set_threads_idle(False)  # (this is the test process)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_a_pacer_that_fails_leaves_the_server_at_normal_priority(caplog) -> None:
    """A bug in the pacer must not leave the server in the background with nobody watching
    its RPO: it logs, puts every thread back to normal priority and says so."""
    import os
    import threading

    from zfsrep import pacer as pacer_mod
    from zfsrep.syscalls import set_threads_idle

    class Broken:
        @property
        def volumes(self):
            raise RuntimeError("boom")

    said: list[bool] = []
    worker = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    worker.start()
    set_threads_idle(True)  # as a server in the background is
    try:
        p = pacer_mod.Pacer({"v": Broken()}, said.append)
        p.start()
        assert p._thread is not None
        p._thread.join(5)
        assert not p._thread.is_alive()
        assert not p.background and said == [False]
        assert os.sched_getscheduler(worker.native_id) == os.SCHED_OTHER
        assert "pacer failed" in caplog.text
    finally:
        set_threads_idle(False)
