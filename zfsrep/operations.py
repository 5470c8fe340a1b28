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

Move, planned and without data loss: every mount is quiesced (its changes are held before
they happen, ``zfsrep.barrier``), everything is drained to the journal, a final checkpoint
is recorded that equals the protected directories exactly, and every volume is written at
it into RECOVERY_DIR/live/VOLUME ("starting", then "before-commit"). ``commit-move`` tells
every mount to retire (unmount, empty the source directory and the spool) and deletes the
VPG; ``rollback-move`` deletes the recovered copies and resumes the mounts: nothing is lost.
A mount that reconnects during a move is quiesced again; one that recorded more than the
final checkpoint meanwhile (restarted and written to) makes the move need a rollback.

Operation record::

    {"op": "failover-test" | "failover-live", "phase": "starting" | "running" | ...,
     "checkpoint": {checkpoint json}, "started": ISO, "recovery_dir": DIR,
     "volumes": {VOL: {"path": DIR/test/VOL, "volume_dir": ..., "seq": N}}}
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from zfsrep.checkpoints import Checkpoint
from zfsrep.control import (
    _resolve_checkpoint,
    _str,
    await_connected,
    handler,
    wait_indexed,
)
from zfsrep.errors import StateError, UsageError, ZfsrepError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from zfsrep.server import JournalServer, VpgRuntime

TEST = "failover-test"
LIVE = "failover-live"
MOVE = "move"
RESTORE = "restore"
#: phases of a move in which the protected mounts are held (quiesced)
MOVE_HOLDS = ("starting", "before-commit", "committing")
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
    await trio.to_thread.run_sync(server.store.save_operation, vpg.name, op)
    vpg.operation = op


def _expect(vpg: VpgRuntime, op_name: str | tuple[str, ...], phases: tuple[str, ...]) -> dict:
    names = (op_name,) if isinstance(op_name, str) else op_name
    op = vpg.operation
    if op is None:
        raise StateError(f"VPG {vpg.name} has no {' or '.join(names)} under way")
    if op.get("op") not in names or op.get("phase") not in phases:
        raise StateError(f"VPG {vpg.name} is {describe(op)}")
    return op


async def _begin(server: JournalServer, vpg: VpgRuntime, op_name: str, where: str,
                 checkpoint: object) -> dict:
    """Under the VPG's lock: check that nothing else runs, resolve the checkpoint for every
    volume (indexed), and persist the new operation in phase ``starting``."""
    if vpg.deleting:
        raise StateError(f"VPG {vpg.name} is being deleted")
    if vpg.operation is not None:
        raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}")
    cp = _resolve_checkpoint(vpg, checkpoint)
    if cp.kind == "test":
        raise StateError(f"checkpoint {cp.id} records a test result; give a data checkpoint "
                         "(an id, a tag or latest)")
    root = server.store.recovery_dir(vpg.settings)
    volumes: dict[str, Any] = {}
    for name, seq in sorted(cp.positions.items()):
        # a volume removed since the checkpoint: its data moved aside (indexed whole), and a
        # volume of the same name now is another one
        gone = next((r for r in vpg.removed
                     if r.name == name and cp.id <= r.last_checkpoint), None)
        vol = vpg.volumes.get(name)
        if gone is not None and op_name in (TEST, LIVE):
            volumes[name] = {"path": str(root / where / name), "volume_dir": str(gone.dir),
                             "seq": seq, "root_ident": gone.root_ident}
            continue
        if vol is None or gone is not None:
            raise StateError(f"volume {name} of checkpoint {cp.id} was removed from the VPG "
                             "(a failover test or live failover can still bring it up)")
        await wait_indexed(vol, seq, cp.id)
        volumes[name] = {"path": str(root / where / name), "volume_dir": str(vol.dir),
                         "seq": seq, "root_ident": vol.meta.root_ident}
    op = {"op": op_name, "phase": "starting", "checkpoint": cp.to_json(), "started": _now(),
          "since": _now(), "recovery_dir": str(root), "volumes": volumes}
    await _save(server, vpg, op)
    return op


async def _set_phase(server: JournalServer, args: dict, op_name: str,
                     allowed: dict[str, tuple[str, ...]]) -> dict:
    """Move the operation to ``args["phase"]``, from one of the phases ``allowed`` for it."""
    vpg = server.vpg(args.get("vpg"))
    phase = _str(args, "phase")
    if phase not in allowed:
        raise UsageError(f"bad phase {phase!r}")
    async with vpg.lock:
        op = _expect(vpg, op_name, allowed[phase])
        op = dict(op, phase=phase, since=_now())
        await _save(server, vpg, op)
    return op


@handler("test.start")
async def _test_start(server: JournalServer, args: dict) -> dict:
    """Begin a failover test at a checkpoint: every volume of the checkpoint, resolved."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        return await _begin(server, vpg, TEST, "test", args.get("checkpoint"))


@handler("test.phase")
async def _test_phase(server: JournalServer, args: dict) -> dict:
    """The CLI reports a step: ``running`` (every volume is up) or ``stopping``."""
    return await _set_phase(server, args, TEST, {
        "running": ("starting",), "stopping": ("starting", "running", "stopping")})


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


@handler("op.expect")
async def _op_expect(server: JournalServer, args: dict) -> dict:
    """The VPG's operation, if it is ``op`` (a name, or a list of them) in one of ``phases``
    (else the refusal naming its state): what a command checks before it waits on the
    recovery host."""
    vpg = server.vpg(args.get("vpg"))
    phases, ops = args.get("phases"), args.get("op")
    if not isinstance(phases, list) or not all(isinstance(p, str) for p in phases):
        raise UsageError("phases must be a list of names")
    if isinstance(ops, list) and ops and all(isinstance(o, str) for o in ops):
        names: str | tuple[str, ...] = tuple(ops)
    else:
        names = _str(args, "op") or ""
    async with vpg.lock:
        return _expect(vpg, names, tuple(phases))


# ---- failover (live) -----------------------------------------------------------------------
@handler("live.start")
async def _live_start(server: JournalServer, args: dict) -> dict:
    """Stop protection and resolve every volume of the checkpoint for bringing up."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        op = await _begin(server, vpg, LIVE, "live", args.get("checkpoint"))
        server.disconnect_volumes(vpg)
    return op


_LIVE_PHASES = {"before-commit": ("starting",),
                "rolling-back": ("starting", "before-commit", "rolling-back")}


@handler("live.phase")
async def _live_phase(server: JournalServer, args: dict) -> dict:
    """The CLI reports a step: ``before-commit`` (every volume is up) or ``rolling-back``."""
    return await _set_phase(server, args, LIVE, _LIVE_PHASES)


@handler("live.commit")
async def _live_commit(server: JournalServer, args: dict) -> dict:
    vpg = server.vpg(args.get("vpg"))
    reverse = args.get("reverse")
    if reverse is not None and not (isinstance(reverse, dict) and all(
            isinstance(reverse.get(k), str) for k in ("vpg", "server"))):
        raise UsageError("bad reverse: give {vpg, server}")
    async with vpg.lock:
        op = _expect(vpg, LIVE, ("before-commit",))
        op = dict(op, phase="committed", since=_now())
        if reverse is not None:  # protected back as this VPG (the CLI starts the mounts)
            op["reverse"] = {"vpg": reverse["vpg"], "server": reverse["server"]}
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


# ---- move ------------------------------------------------------------------------------------
async def _each(vpg: VpgRuntime, kind: str, timeout: float = 60.0,
                fields: dict[str, dict] | None = None) -> dict[str, dict]:
    """Ask every connected volume ``kind`` (with its ``fields``, if given); their answers
    (raises with the problems)."""
    answers: dict[str, dict] = {}
    problems: list[str] = []

    async def ask(name: str, conn: Any) -> None:
        msg, why = await conn.ask(kind, timeout, (fields or {}).get(name))
        if msg is None:
            problems.append(f"volume {name}: {why}")
        else:
            answers[name] = msg

    async with trio.open_nursery() as nursery:
        for name, vol in vpg.volumes.items():
            if vol.conn is not None:
                nursery.start_soon(ask, name, vol.conn)
    if problems:
        raise StateError("; ".join(sorted(problems)))
    return answers


@handler("move.start")
async def _move_start(server: JournalServer, args: dict) -> dict:
    """Quiesce every mount, drain, record the final checkpoint, resolve it for bringing up."""
    vpg = server.vpg(args.get("vpg"))
    if vpg.operation is None:
        await await_connected(vpg)
    if (args.get("checkpoint") or "latest") != "latest":
        raise UsageError("a move brings the volumes up at its own final checkpoint, which "
                         "equals the directories: give latest (or nothing)")
    async with vpg.lock:
        if vpg.deleting:
            raise StateError(f"VPG {vpg.name} is being deleted")
        if vpg.operation is not None:
            raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}")
        down = sorted(n for n, v in vpg.volumes.items() if v.conn is None)
        if down or not vpg.volumes:
            raise StateError(f"VPG {vpg.name}: a move needs every volume connected "
                             f"(not connected: {', '.join(down) or 'no volumes'})")
        root = server.store.recovery_dir(vpg.settings)
        op: dict[str, Any] = {"op": MOVE, "phase": "starting", "started": _now(),
                              "since": _now(), "recovery_dir": str(root), "volumes": {}}
        await _save(server, vpg, op)
    try:
        answers = await _each(vpg, "quiesce", timeout=120.0)
        positions: dict[str, int] = {}
        for name, msg in answers.items():
            if not isinstance(msg.get("seq"), int):
                raise StateError(f"volume {name}: {msg.get('reason')}")
            positions[name] = msg["seq"]
        missing = sorted(set(vpg.volumes) - set(positions))
        if missing:
            raise StateError(f"volume {', '.join(missing)} disconnected during the move")
        for name, seq in positions.items():
            vol = vpg.volumes[name]

            def drained(v: Any = vol, q: int = seq) -> bool:
                return bool(v.durable_seq >= q)

            if not await vol.wait_until(drained, 600.0):
                raise StateError(f"volume {name}: records through {seq} did not reach the "
                                 "journal within 600 s")
        cp = await trio.to_thread.run_sync(vpg.log.append, Checkpoint.new(
            "tagged", positions, tag="move-final", note="final checkpoint of a move"))
        volumes: dict[str, Any] = {}
        for name, seq in sorted(positions.items()):
            vol = vpg.volumes[name]
            await wait_indexed(vol, seq, cp.id, 600.0)
            volumes[name] = {"path": str(root / "live" / name), "volume_dir": str(vol.dir),
                             "seq": seq, "root_ident": vol.meta.root_ident}
        async with vpg.lock:
            op = dict(op, checkpoint=cp.to_json(), volumes=volumes)
            await _save(server, vpg, op)
        return op
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await _each(vpg, "resume")
            finally:
                async with vpg.lock:
                    await _save(server, vpg, None)
        raise


@handler("move.phase")
async def _move_phase(server: JournalServer, args: dict) -> dict:
    return await _set_phase(server, args, MOVE, _LIVE_PHASES)


@handler("move.commit")
async def _move_commit(server: JournalServer, args: dict) -> dict:
    """Retire every protected mount (it unmounts and removes its data), delete the VPG.
    ``force``: commit although some mounts are not connected (their host is gone): those
    are left as they are, and named in the answer (``left``)."""
    vpg = server.vpg(args.get("vpg"))
    force = args.get("force", False)
    if not isinstance(force, bool):
        raise UsageError("force must be true or false")
    async with vpg.lock:
        op = _expect(vpg, MOVE, ("before-commit", "committing"))
        if op.get("needs_rollback"):
            raise StateError(f"VPG {vpg.name}: the move needs a rollback: "
                             f"{op['needs_rollback']}")
        down = sorted(n for n, v in vpg.volumes.items() if v.conn is None)
        if down and not force:
            raise StateError(f"volume {', '.join(down)} is not connected: its protected data "
                             "cannot be removed; reconnect it, roll the move back, or commit "
                             "with --force if its host is gone for good (its directory and "
                             "spool are then left as they are)")
        op = dict(op, phase="committing", since=_now(), left=down)
        await _save(server, vpg, op)
    if op["left"]:
        log.warning("VPG %s: the move is committed without retiring volume %s (not "
                    "connected): its protected directory and spool are left as they are",
                    vpg.name, ", ".join(op["left"]))
    await _each(vpg, "retire")
    with trio.move_on_after(60):
        while any(v.conn is not None for v in vpg.volumes.values()):
            await trio.sleep(0.1)
    async with vpg.lock:
        op = dict(op, phase="committed", since=_now())
        await _save(server, vpg, op)
    await server.delete_vpg(vpg.name, force=True)
    return {"moved": vpg.name, "checkpoint": op["checkpoint"], "volumes": op["volumes"],
            "left": op["left"]}


@handler("move.rolled-back")
async def _move_rolled_back(server: JournalServer, args: dict) -> dict:
    """The recovered copies are gone: the mounts go on, nothing was lost."""
    vpg = server.vpg(args.get("vpg"))
    async with vpg.lock:
        op = _expect(vpg, MOVE, ("rolling-back",))
    await _each(vpg, "resume")
    async with vpg.lock:
        await _save(server, vpg, None)
    return {"rolled_back": (op.get("checkpoint") or {}).get("id")}


async def move_holds(server: JournalServer, vpg: VpgRuntime, volume: str,
                     last_seq: int) -> bool:
    """Whether a (re)connecting mount must hold its changes (a move is under way; the
    welcome says so). One that recorded past the move's final checkpoint meanwhile (it was
    restarted and written to) makes the move need a rollback."""
    op = vpg.operation
    if op is None or op.get("op") != MOVE or op.get("phase") not in MOVE_HOLDS:
        return False
    final = (op.get("volumes") or {}).get(volume, {}).get("seq")
    if isinstance(final, int) and last_seq > final and not op.get("needs_rollback"):
        async with vpg.lock:
            if vpg.operation is not None:
                await _save(server, vpg, dict(vpg.operation, needs_rollback=(
                    f"volume {volume} recorded changes after the final checkpoint (through "
                    f"record {last_seq}, the checkpoint has {final})")))
    return True
