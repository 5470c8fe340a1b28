"""Control requests of the CLI, served by the journal server (docs/protocol.md).

Each request is ``{"t": "req", "op": ..., "args": {...}}`` and gets one ``result`` or ``error``
reply. Every argument is checked here before it reaches the server's state; a bad request is an
error reply with an exit code, never a dropped connection for anyone else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from zfsrep import protocol
from zfsrep.checkpoints import Checkpoint, Selector, parse_duration, select
from zfsrep.errors import NotFoundError, StateError, UsageError, ZfsrepError
from zfsrep.store import VpgSettings

if TYPE_CHECKING:
    from zfsrep.server import JournalServer, VolumeRuntime, VpgRuntime

log = logging.getLogger(__name__)

RESOLVE_WAIT = 120.0
#: how long a tag waits for a mount that has just connected to report its initial sync
SETTLE_S = 3.0
#: how long a command that needs every mount (a tag, a recovery operation) waits for one
#: that is reconnecting
CONNECT_WAIT = 10.0

Handler = Callable[["JournalServer", dict], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {}


def handler(op: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[op] = fn
        return fn
    return register


async def serve_control(server: JournalServer, conn: protocol.MessageStream) -> None:
    while True:
        msg = await conn.receive()
        if msg is None:
            return
        if msg["t"] != "req":
            raise protocol.ProtocolError(f"expected a request, got {msg['t']!r}")
        op = msg.get("op")
        args = msg.get("args")
        fn = HANDLERS.get(op) if isinstance(op, str) else None
        try:
            if fn is None:
                raise UsageError(f"unknown request {op!r}")
            if not isinstance(args, dict):
                raise UsageError("request arguments must be a map")
            result = await fn(server, args)
            reply = {"t": "result", "result": result}
        except ZfsrepError as e:
            log.info("request %s refused: %s", op, e)
            reply = protocol.error_reply(e)
        await conn.send(reply)


def _str(args: dict, key: str, *, required: bool = True) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key} is required")
    return value


def _duration(args: dict, key: str, default: float) -> float:
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise UsageError(f"bad {key}: {value!r}")


# ---- VPGs --------------------------------------------------------------------------------
@handler("vpg.create")
async def _vpg_create(server: JournalServer, args: dict) -> dict:
    defaults = VpgSettings(name="x")
    settings = VpgSettings(
        name=_str(args, "name"),  # type: ignore[arg-type]
        history_s=_duration(args, "history", defaults.history_s),
        rpo_s=_duration(args, "rpo", defaults.rpo_s),
        checkpoint_interval_s=_duration(args, "checkpoint_interval",
                                        defaults.checkpoint_interval_s),
        recovery_dir=_str(args, "recovery_dir", required=False) or "")
    settings.check()
    vpg = await server.create_vpg(settings)
    return _vpg_summary(server, vpg)


@handler("vpg.set")
async def _vpg_set(server: JournalServer, args: dict) -> dict:
    """Change settings of a VPG; the recovery directory only while no operation runs."""
    import dataclasses

    vpg = server.vpg(args.get("name"))
    s = vpg.settings
    changed = dataclasses.replace(
        s, history_s=_duration(args, "history", s.history_s),
        rpo_s=_duration(args, "rpo", s.rpo_s),
        checkpoint_interval_s=_duration(args, "checkpoint_interval", s.checkpoint_interval_s),
        recovery_dir=(_str(args, "recovery_dir", required=False) or s.recovery_dir))
    changed.check()
    async with vpg.lock:
        if changed.recovery_dir != s.recovery_dir and vpg.operation is not None:
            from zfsrep.operations import describe

            raise StateError(f"VPG {vpg.name} is {describe(vpg.operation)}: its recovery "
                             "directory cannot change now")
        await trio.to_thread.run_sync(server.store.save_vpg, changed)
        vpg.settings = changed
    return _vpg_summary(server, vpg)


@handler("vpg.list")
async def _vpg_list(server: JournalServer, args: dict) -> list[dict]:
    return [_vpg_summary(server, vpg) for _name, vpg in sorted(server.vpgs.items())
            if not vpg.deleting]


@handler("vpg.delete")
async def _vpg_delete(server: JournalServer, args: dict) -> dict:
    name = _str(args, "name")
    await server.delete_vpg(name, force=bool(args.get("force")))  # type: ignore[arg-type]
    return {"name": name, "deleted": True}


@handler("vpg.remove-volume")
async def _vpg_remove_volume(server: JournalServer, args: dict) -> dict:
    from zfsrep.store import check_name

    vpg = server.vpg(args.get("name"))
    if vpg.deleting:
        raise StateError(f"VPG {vpg.name} is being deleted")
    volume = check_name("volume", _str(args, "volume"))  # type: ignore[arg-type]
    gone = await server.remove_volume(vpg, volume)
    return {"vpg": vpg.name, "volume": gone.name, "last_checkpoint": gone.last_checkpoint,
            "removed": gone.removed}


def _vpg_summary(server: JournalServer, vpg: VpgRuntime) -> dict:
    s = vpg.settings
    return {"name": s.name, "history_s": s.history_s, "rpo_s": s.rpo_s,
            "checkpoint_interval_s": s.checkpoint_interval_s, "created": s.created,
            "recovery_dir": str(server.store.recovery_dir(s)), "volumes": sorted(vpg.volumes),
            "removed_volumes": [{"name": r.name, "last_checkpoint": r.last_checkpoint,
                                 "removed": r.removed} for r in vpg.removed]}


# ---- checkpoints -------------------------------------------------------------------------
@handler("tag")
async def _tag(server: JournalServer, args: dict) -> dict:
    from zfsrep.checkpoints import validate_tag

    vpg = server.vpg(args.get("vpg"))
    tag = validate_tag(_str(args, "name"))  # type: ignore[arg-type]
    if vpg.operation is None and not vpg.deleting:  # (else refused below, at once)
        await await_connected(vpg)
    await _settle(vpg)
    cp = await server.take_checkpoint(vpg, "tagged", tag)
    return cp.to_json()


@handler("checkpoints")
async def _checkpoints(server: JournalServer, args: dict) -> list[dict]:
    selector = Selector(vpg=_str(args, "vpg", required=False),
                        min_age_s=_opt_age(args, "min_age"),
                        max_age_s=_opt_age(args, "max_age"))
    names = [selector.vpg] if selector.vpg else sorted(server.vpgs)
    logs = [(name, server.vpg(name).log) for name in names]

    def listing() -> list[dict]:  # thousands of checkpoints: off the event loop
        now = time.time_ns()
        return [dict(cp.to_json(), vpg=name) for name, log_ in logs
                for cp in select(log_.all(), selector, now)]

    return await trio.to_thread.run_sync(listing)


async def await_connected(vpg: VpgRuntime, wait: float = CONNECT_WAIT) -> None:
    """Give mounts that are reconnecting (after a rollback, a server restart, a network
    blip) a few seconds before a command that needs every one of them refuses."""
    with trio.move_on_after(wait):
        while vpg.volumes and any(v.conn is None for v in vpg.volumes.values()):
            await trio.sleep(0.1)


async def _settle(vpg: VpgRuntime) -> None:
    """A mount that connected a moment ago reports its (empty or finished) initial sync
    right after: give it that moment, so `protect` then `tag` does not fail."""
    def fresh() -> bool:
        now = time.time()
        return any(v.conn is not None and not v.meta.synced_seq
                   and now - v.conn.since < SETTLE_S for v in vpg.volumes.values())

    with trio.move_on_after(SETTLE_S):
        while fresh():
            await trio.sleep(0.05)


def _opt_age(args: dict, key: str) -> int | None:
    if args.get(key) is None:
        return None
    return int(_duration(args, key, 0.0))


def _resolve_checkpoint(vpg: VpgRuntime, text: object) -> Checkpoint:
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text:
        raise UsageError("a checkpoint (id, tag name or 'latest') is required")
    return vpg.log.resolve(text)


async def wait_indexed(vol: VolumeRuntime, seq: int, cp_id: int,
                       wait: float = RESOLVE_WAIT) -> None:
    """Return once the volume's index reaches record ``seq`` (indexing it first, now)."""
    vol.index_wanted += 1
    try:
        reached = await vol.wait_until(lambda: vol.indexed_seq >= seq, wait)
    finally:
        vol.index_wanted -= 1
    if not reached:
        raise StateError(f"volume {vol.name}: checkpoint {cp_id} is not indexed yet (indexed "
                         f"through record {vol.indexed_seq} of {seq}); try again shortly")


@handler("resolve")
async def _resolve(server: JournalServer, args: dict) -> dict:
    """Where a checkpoint of a volume lives in the store, once the index has reached it."""
    vpg = server.vpg(args.get("vpg"))
    cp = _resolve_checkpoint(vpg, args.get("checkpoint"))
    volume = _str(args, "volume", required=False)
    if volume is None:
        if len(cp.positions) != 1:
            raise UsageError(f"VPG {vpg.name} has volumes {', '.join(sorted(cp.positions))}: "
                             "name one with --volume")
        volume = next(iter(cp.positions))
    if volume not in cp.positions:
        raise NotFoundError(f"checkpoint {cp.id} of VPG {vpg.name} has no volume {volume}")
    seq = cp.positions[volume]
    for gone in vpg.removed:  # a volume removed since: its data moved aside, indexed whole
        if gone.name == volume and cp.id <= gone.last_checkpoint:
            return {"vpg": vpg.name, "volume": volume, "volume_dir": str(gone.dir), "seq": seq,
                    "root_ident": gone.root_ident, "checkpoint": cp.to_json()}
    vol: VolumeRuntime | None = vpg.volumes.get(volume)
    if vol is None:
        raise NotFoundError(f"VPG {vpg.name} has no volume {volume}")
    await wait_indexed(vol, seq, cp.id, _duration(args, "wait", RESOLVE_WAIT))
    return {"vpg": vpg.name, "volume": volume, "volume_dir": str(vol.dir), "seq": seq,
            "root_ident": vol.meta.root_ident, "checkpoint": cp.to_json()}


# ---- status ------------------------------------------------------------------------------
@handler("status")
async def _status(server: JournalServer, args: dict) -> list[dict]:
    from zfsrep.status import vpg_status

    name = _str(args, "vpg", required=False)
    vpgs = [server.vpg(name)] if name else [v for _n, v in sorted(server.vpgs.items())
                                            if not v.deleting]
    out = []
    for vpg in vpgs:
        used = await trio.to_thread.run_sync(server.store.bytes_used, vpg.name)
        st = vpg_status(vpg, time.time(), journal_bytes=used,
                        recovery_dir=str(server.store.recovery_dir(vpg.settings)))
        # the server's CPU priority for replication now (zfsrep.pacer): the same for all
        st["replication_priority"] = "background" if server.background else "normal"
        out.append(st)
    return out


@handler("ping")
async def _ping(server: JournalServer, args: dict) -> dict:
    return {"store": str(server.store.root), "uptime_s": time.time() - server.started}

