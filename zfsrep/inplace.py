"""Restore in place, the server's half: the state machine of ``restore`` / ``commit-restore``
/ ``rollback-restore``, and the read-only export of a checkpoint's tree that the protected
mounts copy from.

Restore in place is a single-site operation: the protected mounts themselves are put back
to a checkpoint. The server resolves the checkpoint, persists the operation ("starting") and
asks every connected mount to restore its volume (``restore``, with the volume's stream
position). Each mount copies the tree at that position from the server (``view`` requests,
below) into a hidden directory of its source, records the change as ordinary records of its
stream (the old tree removed, the restored tree created: protection goes on throughout),
and swaps the trees; the pre-restore tree is kept beside it (``mountd.inplace``). Then the
VPG is "before-commit": the volumes are usable at the checkpoint and still reversible.
``commit-restore`` has every mount delete the kept tree and ends the operation;
``rollback-restore`` has every mount swap the kept tree back (recorded the same way) and
ends it. Both are idempotent on the mounts, so a command that failed half-way (a mount
disconnected) can be given again; a server restart keeps the phase (``operation.json``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from zfsrep.control import _str, handler
from zfsrep.errors import NotFoundError, StateError, UsageError
from zfsrep.operations import RESTORE, _begin, _each, _expect, _now, _save, await_connected

if TYPE_CHECKING:
    from zfsrep.server import JournalServer, VpgRuntime

#: how long a mount may take to restore its volume (copying it from the journal)
RESTORE_TIMEOUT = 6 * 3600.0
#: largest read the export answers (a message must stay below protocol.MAX_MESSAGE)
MAX_READ = 4 << 20
READ_PIECE = 1 << 20
MAX_PAGE = 4096
#: an export view unused this long is closed
VIEW_IDLE = 60.0


# ---- the operation ---------------------------------------------------------------------------
def _connected(vpg: VpgRuntime, what: str) -> None:
    down = sorted(n for n, v in vpg.volumes.items() if v.conn is None)
    if down or not vpg.volumes:
        raise StateError(f"VPG {vpg.name}: {what} needs every volume's mount connected (not "
                         f"connected: {', '.join(down) or 'no volumes'})")


@handler("restore.start")
async def _restore_start(server: JournalServer, args: dict) -> dict:
    """Put every protected volume back to the checkpoint, keeping the pre-restore state."""
    vpg = server.vpg(args.get("vpg"))
    if vpg.operation is None:
        await await_connected(vpg)
    async with vpg.lock:
        if vpg.operation is None:
            _connected(vpg, "a restore in place")
        op = await _begin(server, vpg, RESTORE, "live", args.get("checkpoint"))
        missing = sorted(set(vpg.volumes) - set(op["volumes"]))
        if missing:
            await _save(server, vpg, None)
            raise StateError(f"checkpoint {op['checkpoint']['id']} predates volume "
                             f"{', '.join(missing)}: restore to a later checkpoint")
        for name, vol in op["volumes"].items():
            vol["path"] = vpg.volumes[name].meta.source
        await _save(server, vpg, op)
    fields = {name: {"seq": vol["seq"], "checkpoint": op["checkpoint"]["id"]}
              for name, vol in op["volumes"].items()}
    try:
        try:
            answers = await _ask_all(vpg, "restore", RESTORE_TIMEOUT, fields)
        finally:
            _close_views(server, vpg.name)
        _raise_refusals(answers)
    except BaseException:
        with trio.CancelScope(shield=True):  # undo what any mount did; nothing changed then
            try:  # (a mount not connected now may still finish: it needs its rollback)
                _connected(vpg, "undoing the failed restore")
                _raise_refusals(await _ask_all(vpg, "restore-rollback", 600.0))
            except Exception as e:
                async with vpg.lock:
                    await _save(server, vpg, dict(op, phase="rolling-back", since=_now(),
                                                  needs_rollback=str(e)))
            else:
                async with vpg.lock:
                    await _save(server, vpg, None)
        raise
    async with vpg.lock:
        op = dict(op, phase="before-commit", since=_now(), restored=answers)
        await _save(server, vpg, op)
    return op


async def _ask_all(vpg: VpgRuntime, kind: str, timeout: float,
                   fields: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every volume's answer to ``kind``; one that was not connected to be asked is an
    error too (its mount still has to do this step)."""
    answers = await _each(vpg, kind, timeout, fields)
    missing = sorted(set(vpg.volumes) - set(answers))
    if missing:
        raise StateError(f"volume {', '.join(missing)} disconnected before it could be "
                         f"asked to {kind.replace('-', ' ')}; give the command again once "
                         "it is back")
    return answers


def _raise_refusals(answers: dict[str, dict]) -> None:
    bad = sorted((name, msg) for name, msg in answers.items() if msg.get("error"))
    if bad:
        code = bad[0][1].get("code")
        raise StateError("; ".join(f"volume {name}: {msg['error']}" for name, msg in bad),
                         exit_code=code if isinstance(code, int) and 0 < code < 64 else 4)


@handler("restore.commit")
async def _restore_commit(server: JournalServer, args: dict) -> dict:
    """Keep the restored state: every mount deletes its pre-restore tree."""
    return await _finish(server, args, "committing", ("before-commit", "committing"),
                         "restore-commit")


@handler("restore.rollback")
async def _restore_rollback(server: JournalServer, args: dict) -> dict:
    """Return every volume exactly to its pre-restore state."""
    return await _finish(server, args, "rolling-back",
                         ("starting", "before-commit", "rolling-back"), "restore-rollback")


async def _finish(server: JournalServer, args: dict, phase: str, allowed: tuple[str, ...],
                  ask: str) -> dict:
    vpg = server.vpg(args.get("vpg"))
    if vpg.operation is not None and vpg.operation.get("op") == RESTORE:
        await await_connected(vpg)
    async with vpg.lock:
        op = _expect(vpg, RESTORE, allowed)
        if phase == "committing" and op.get("needs_rollback"):
            raise StateError(f"VPG {vpg.name}: the restore needs a rollback: "
                             f"{op['needs_rollback']}")
        _connected(vpg, "finishing a restore in place")
        op = dict(op, phase=phase, since=_now())
        await _save(server, vpg, op)
    _raise_refusals(await _ask_all(vpg, ask, 3600.0))
    async with vpg.lock:
        await _save(server, vpg, None)
    done = "committed" if phase == "committing" else "rolled_back"
    return {done: op["checkpoint"]["id"], "vpg": vpg.name, "volumes": sorted(op["volumes"])}


# ---- the export: a checkpoint's tree, read by the mounts --------------------------------------
class _Views:
    """Open index views of the export, by (volume directory, seq), closed when idle."""

    def __init__(self) -> None:
        self.views: dict[tuple[str, int], list] = {}  # key -> [view, last used]

    def get(self, voldir: Path, seq: int) -> Any:
        now = time.monotonic()
        for key, entry in list(self.views.items()):
            if now - entry[1] > VIEW_IDLE:
                del self.views[key]
                entry[0].close()
        key = (str(voldir), seq)
        found = self.views.get(key)
        if found is None:
            from zfsrep.view import open_view

            found = self.views[key] = [open_view(voldir, seq), now]
        found[1] = now
        return found[0]


#: the export's views, by (server, VPG name); a VPG's are closed when its restore has copied
_VIEWS: dict[tuple[int, str], _Views] = {}


def _close_views(server: JournalServer, vpg: str) -> None:
    views = _VIEWS.pop((id(server), vpg), None)
    if views is not None:
        for entry in views.views.values():
            entry[0].close()


def _int(args: dict, key: str, limit: int = 1 << 63) -> int:
    value = args.get(key)
    if type(value) is not int or not 0 <= value < limit:
        raise UsageError(f"bad {key}: {value!r}")
    return value


def node_fields(node: Any) -> list:
    return [node.ident, node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.nlink,
            node.rdev]


@handler("view")
async def _view(server: JournalServer, args: dict) -> Any:
    """One read of a volume's tree at a stream position the journal has indexed:
    ``what`` is node, readdir, readlink, read or xattrs (all the xattrs of a node)."""
    vpg = server.vpg(args.get("vpg"))
    name = _str(args, "volume")
    vol = vpg.volumes.get(name)  # type: ignore[arg-type]
    if vol is None:
        raise NotFoundError(f"VPG {vpg.name} has no volume {name}")
    seq = _int(args, "seq")
    if not 0 < seq <= vol.indexed_seq:
        raise UsageError(f"volume {name}: record {seq} is not indexed (indexed through "
                         f"{vol.indexed_seq})")
    what = _str(args, "what")
    views = _VIEWS.setdefault((id(server), vpg.name), _Views())
    view = views.get(vol.dir, seq)  # (opening one is quick; the reads go to threads)
    try:
        return await _view_read(view, what, args)
    except OSError as e:  # (reading a directory, readlink of a file, ...)
        raise UsageError(f"view {what} of {args.get('ident')}: {e.strerror or e}") from None


async def _view_read(view: Any, what: str | None, args: dict) -> Any:
    if what == "node":
        ident = args.get("ident")
        ident = view.root if ident is None else _int(args, "ident")
        return node_fields(await trio.to_thread.run_sync(view.getattr, ident))
    ident = _int(args, "ident")
    if what == "readdir":
        after = args.get("after", b"")
        if not isinstance(after, bytes):
            raise UsageError("bad after")
        limit = min(_int(args, "limit", 1 << 31), MAX_PAGE)
        page = await trio.to_thread.run_sync(view.readdir, ident, after, limit)
        return [[n, node_fields(node)] for n, node in page]
    if what == "readlink":
        return await trio.to_thread.run_sync(view.readlink, ident)
    if what == "read":
        offset, size = _int(args, "offset"), min(_int(args, "size"), MAX_READ)

        def read() -> bytes:  # in 1 MiB pieces: the view's group cache holds about that
            parts = []
            for off in range(offset, offset + size, READ_PIECE):
                part = view.read(ident, off, min(READ_PIECE, offset + size - off))
                parts.append(part)
                if len(part) < READ_PIECE:
                    break
            return b"".join(parts)

        return await trio.to_thread.run_sync(read)
    if what == "xattrs":
        def xattrs() -> dict[bytes, bytes]:
            out = {}
            for xname in view.listxattr(ident):
                value = view.getxattr(ident, xname)
                if value is not None:
                    out[xname] = value
            return out

        return await trio.to_thread.run_sync(xattrs)
    raise UsageError(f"bad what: {what!r}")


