"""Recovery operations of a VPG, the server's half: the state machine and its persistence.

The server decides what may start, records every step in ``operation.json`` (fsynced) before
it is taken, and answers what is under way; the CLI on the recovery host does the mounting
(``zfsrep.recovery``), reporting each step back. A server restart loads the file, so an
operation is never silently half-done: ``status`` shows it, and its stop command finishes it.

Failover (live), for when the protected site is lost: protection stops (the mounts'
connections are closed and refused, their spools keep what they capture), every volume is
materialised at the checkpoint in RECOVERY_DIR/live/VOLUME ("starting"), then it is usable
and still reversible ("before-commit"). ``commit`` makes it final ("committed": the VPG is
Recovered and stays unprotected); ``rollback`` deletes the recovered copies
("rolling-back") and ends the operation, and protection resumes: the mounts reconnect and
ship what their spools hold, so nothing captured meanwhile is lost.

Operation record::

    {"op": "failover-test" | "failover-live", "phase": "starting" | "running" | ...,
     "checkpoint": {checkpoint json}, "started": ISO, "recovery_dir": DIR,
     "volumes": {VOL: {"path": DIR/test/VOL, "volume_dir": ..., "seq": N}}}
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from zfsrep.checkpoints import Checkpoint
from zfsrep.control import _resolve_checkpoint, _str, handler, wait_indexed
from zfsrep.errors import StateError, UsageError, ZfsrepError

if TYPE_CHECKING:
    from zfsrep.server import JournalServer, VpgRuntime

TEST = "failover-test"
LIVE = "failover-live"
RESULTS = ("pass", "fail")
MAX_NOTE = 1000


def describe(op: dict) -> str:
    """``in a failover test of checkpoint 7 (running since ...)``"""
    cp = op.get("checkpoint") or {}
    return (f"in a {op.get('op')} of checkpoint {cp.get('id')} ({op.get('phase')} since "
            f"{op.get('since') or op.get('started')})")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def protection_refused(vpg: VpgRuntime) -> str | None:
    """Why the VPG takes no data and no checkpoints now, if it does not."""
    op = vpg.operation
    if op is not None and op.get("op") == LIVE:
        if op.get("phase") == "committed":
            return f"VPG {vpg.name} was failed over (Recovered): it protects nothing any more"
        return f"VPG {vpg.name} is {describe(op)}: protection is stopped"
    return None


async def _save(server: JournalServer, vpg: VpgRuntime, op: dict | None) -> None:
    import trio

    await trio.to_thread.run_sync(server.store.save_operation, vpg.name, op)
    vpg.operation = op


def _expect(vpg: VpgRuntime, op_name: str, phases: tuple[str, ...]) -> dict:
    op = vpg.operation
    if op is None:
        raise StateError(f"VPG {vpg.name} has no {op_name} under way")
    if op.get("op") != op_name or op.get("phase") not in phases:
        raise StateError(f"VPG {vpg.name} is {describe(op)}")
    return op


@handler("test.start")
async def _test_start(server: JournalServer, args: dict) -> dict:
    """Begin a failover test at a checkpoint: every volume of the checkpoint, resolved."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        if vpg.deleting:
            raise StateError(f"VPG {vpg.name} is being deleted")
        if vpg.operation is not None:
            raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}")
        cp = _resolve_checkpoint(vpg, args.get("checkpoint"))
        if cp.kind == "test":
            raise StateError(f"checkpoint {cp.id} records a test result; test a data "
                             "checkpoint (an id, a tag or latest)")
        root = server.store.recovery_dir(vpg.settings)
        volumes: dict[str, Any] = {}
        for name, seq in sorted(cp.positions.items()):
            vol = vpg.volumes.get(name)
            if vol is None:
                raise StateError(f"volume {name} of checkpoint {cp.id} is gone from the VPG")
            await wait_indexed(vol, seq, cp.id)
            volumes[name] = {"path": str(root / "test" / name), "volume_dir": str(vol.dir),
                             "seq": seq, "root_ident": vol.meta.root_ident}
        op = {"op": TEST, "phase": "starting", "checkpoint": cp.to_json(), "started": _now(),
              "since": _now(), "recovery_dir": str(root), "volumes": volumes}
        await _save(server, vpg, op)
    return op


@handler("test.phase")
async def _test_phase(server: JournalServer, args: dict) -> dict:
    """The CLI reports a step: ``running`` (every volume is up) or ``stopping``."""
    vpg = server.vpg(args.get("vpg"))
    phase = _str(args, "phase")
    allowed = {"running": ("starting",), "stopping": ("starting", "running", "stopping")}
    if phase not in allowed:
        raise UsageError(f"bad phase {phase!r}")
    async with vpg.lock:
        op = _expect(vpg, TEST, allowed[phase])
        op = dict(op, phase=phase, since=_now())
        await _save(server, vpg, op)
    return op


@handler("test.stop")
async def _test_stop(server: JournalServer, args: dict) -> dict:
    """The test copies are gone: record a test checkpoint with the result and end the test."""
    vpg = server.vpg(args.get("vpg"))
    result = args.get("result") or "pass"
    if result not in RESULTS:
        raise UsageError(f"bad result {result!r}: pass or fail")
    note = args.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise UsageError(f"a note is text of at most {MAX_NOTE} characters")
    async with vpg.lock:
        op = _expect(vpg, TEST, ("stopping",))
    tested = op["checkpoint"]["id"]
    text = f"test of checkpoint {tested}: {result}" + (f"; {note}" if note else "")
    try:  # a cut of production as it is now, when production is there
        cp = await server.take_checkpoint(vpg, "test", f"test-{tested}-{result}", note=text,
                                          result=result)
    except ZfsrepError:  # otherwise the newest data checkpoint's cut, so latest stays latest
        newest = [c for c in vpg.log.all() if c.kind != "test"]
        positions = newest[-1].positions if newest else op["checkpoint"]["positions"]
        cp = Checkpoint.new("test", dict(positions), tag=f"test-{tested}-{result}",
                            note=text, result=result)
        import trio

        cp = await trio.to_thread.run_sync(vpg.log.append, cp)
    async with vpg.lock:
        await _save(server, vpg, None)
    return {"checkpoint": cp.to_json(), "tested": tested, "result": result,
            "ended": time.time()}


@handler("test.abort")
async def _test_abort(server: JournalServer, args: dict) -> dict:
    """A test that could not start is ended without a test checkpoint (its copies are
    already taken down by the CLI)."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        op = _expect(vpg, TEST, ("stopping",))
        await _save(server, vpg, None)
    return {"aborted": op["checkpoint"]["id"]}


# ---- failover (live) -----------------------------------------------------------------------
@handler("live.start")
async def _live_start(server: JournalServer, args: dict) -> dict:
    """Stop protection and resolve every volume of the checkpoint for bringing up."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        if vpg.deleting:
            raise StateError(f"VPG {vpg.name} is being deleted")
        if vpg.operation is not None:
            raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}")
        cp = _resolve_checkpoint(vpg, args.get("checkpoint"))
        if cp.kind == "test":
            raise StateError(f"checkpoint {cp.id} records a test result; fail over to a data "
                             "checkpoint (an id, a tag or latest)")
        root = server.store.recovery_dir(vpg.settings)
        volumes: dict[str, Any] = {}
        for name, seq in sorted(cp.positions.items()):
            vol = vpg.volumes.get(name)
            if vol is None:
                raise StateError(f"volume {name} of checkpoint {cp.id} is gone from the VPG")
            await wait_indexed(vol, seq, cp.id)
            volumes[name] = {"path": str(root / "live" / name), "volume_dir": str(vol.dir),
                             "seq": seq, "root_ident": vol.meta.root_ident}
        op = {"op": LIVE, "phase": "starting", "checkpoint": cp.to_json(), "started": _now(),
              "since": _now(), "recovery_dir": str(root), "volumes": volumes}
        await _save(server, vpg, op)
        server.disconnect_volumes(vpg)
    return op


@handler("live.phase")
async def _live_phase(server: JournalServer, args: dict) -> dict:
    """The CLI reports a step: ``before-commit`` (every volume is up) or ``rolling-back``."""
    vpg = server.vpg(args.get("vpg"))
    phase = _str(args, "phase")
    allowed = {"before-commit": ("starting",),
               "rolling-back": ("starting", "before-commit", "rolling-back")}
    if phase not in allowed:
        raise UsageError(f"bad phase {phase!r}")
    async with vpg.lock:
        op = _expect(vpg, LIVE, allowed[phase])
        op = dict(op, phase=phase, since=_now())
        await _save(server, vpg, op)
    return op


@handler("live.commit")
async def _live_commit(server: JournalServer, args: dict) -> dict:
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        op = _expect(vpg, LIVE, ("before-commit",))
        op = dict(op, phase="committed", since=_now())
        await _save(server, vpg, op)
    return op


@handler("live.rolled-back")
async def _live_rolled_back(server: JournalServer, args: dict) -> dict:
    """The recovered copies are gone: end the failover; protection resumes."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        op = _expect(vpg, LIVE, ("rolling-back",))
        await _save(server, vpg, None)
    return {"rolled_back": op["checkpoint"]["id"]}
