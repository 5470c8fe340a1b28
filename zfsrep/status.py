"""VPG status and substatus in the vocabulary of reference/vpg-status-reference.txt.

Order of precedence (the first that applies): a live failover (Failing Over / Before Commit,
Rolling back Failover, or Recovered once committed), a move (Moving / StartingMove,
MoveBeforeCommit, Committing Move, Rolling back Move), no volumes (Error / VPG has no volumes), a
journal or index error (Error / Journal storage error), a volume still in its initial sync
(Initializing / Initial Sync), a disconnected volume (Error / Site disconnection[. No
checkpoints]), capture stopped on a volume (Not Meeting SLA / the reason), then the SLA: RPO
(now minus the newest checkpoint) against its target and the history actually held against the
configured history: Meeting SLA, RPO Not Meeting SLA, History Not Meeting SLA, or Not Meeting
SLA when both miss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zfsrep.server import VolumeRuntime, VpgRuntime


def _volume_status(vol: VolumeRuntime) -> dict[str, Any]:
    rep = vol.report
    connected = vol.conn is not None
    captured = rep.get("captured_seq") if connected else None
    written = rep.get("written_seq") if connected else None
    scan = rep.get("scan") or {}
    out: dict[str, Any] = {
        "name": vol.name,
        "source": vol.meta.source,
        "host": vol.meta.host,
        "connection": "connected" if connected else "disconnected",
        "since": (vol.conn.since if vol.conn is not None else vol.disconnected_since),
        "durable_seq": vol.durable_seq,
        "indexed_seq": vol.indexed_seq,
        "captured_seq": captured,
        "lag_records": (max(int(written) - vol.durable_seq, 0)
                        if isinstance(written, int) else None),
        "lag_bytes": rep.get("unacked_bytes") if connected else None,
        "spool_bytes": rep.get("spool_bytes") if connected else None,
        "spool_limit": rep.get("spool_limit") if connected else None,
        "initial_sync": "done" if vol.meta.synced_seq else "running",
        "capture_failed": rep.get("capture_failed") if connected else None,
        "error": vol.error,
    }
    if not vol.meta.synced_seq:
        total = scan.get("total_bytes")
        done = scan.get("bytes") or 0
        out["initial_sync_progress"] = {
            "bytes": done, "total_bytes": total, "entries": scan.get("entries"),
            "percent": (round(100.0 * done / total, 1) if total else None)}
    return out


def vpg_status(vpg: VpgRuntime, now: float, *, journal_bytes: int,
               recovery_dir: str = "") -> dict[str, Any]:
    settings = vpg.settings
    cps = vpg.log.all()
    newest = cps[-1].time_ns / 1e9 if cps else None
    oldest = cps[0].time_ns / 1e9 if cps else None
    rpo = (now - newest) if newest is not None else None
    history = (now - oldest) if oldest is not None else 0.0
    volumes = [_volume_status(v) for _n, v in sorted(vpg.volumes.items())]
    op = vpg.operation
    for v in volumes:  # where each volume's recovered copies appear, and what it is doing
        v["test_path"] = f"{recovery_dir}/test/{v['name']}" if recovery_dir else None
        v["live_path"] = f"{recovery_dir}/live/{v['name']}" if recovery_dir else None
        in_op = op is not None and v["name"] in (op.get("volumes") or {})
        v["state"] = f"{op['op']} {op.get('phase')}" if in_op and op else "protected"

    status, substatus = _classify(vpg, volumes, rpo, history, bool(cps))
    return {
        "vpg": settings.name,
        "status": status,
        "substatus": substatus,
        "rpo_s": None if rpo is None else round(rpo, 3),
        "rpo_target_s": settings.rpo_s,
        "history_s": round(history, 3),
        "history_target_s": settings.history_s,
        "checkpoint_interval_s": settings.checkpoint_interval_s,
        "checkpoints": len(cps),
        "latest_checkpoint": cps[-1].to_json() if cps else None,
        "journal_bytes": journal_bytes,
        "last_checkpoint_problem": vpg.last_problem,
        "recovery_dir": recovery_dir or None,
        "operation": None if op is None else {
            "op": op.get("op"), "phase": op.get("phase"), "since": op.get("since"),
            "started": op.get("started"), "checkpoint": (op.get("checkpoint") or {}).get("id"),
            "needs_rollback": op.get("needs_rollback"), "reverse": op.get("reverse")},
        "volumes": volumes,
    }


def _classify(vpg: VpgRuntime, volumes: list[dict], rpo: float | None, history: float,
              have_checkpoints: bool) -> tuple[str, str]:
    settings = vpg.settings
    op = vpg.operation
    if op is not None and op.get("op") == "failover-live":
        phase = str(op.get("phase"))
        return _FAILOVER.get(phase, ("Failing Over", phase))
    if op is not None and op.get("op") == "move":
        phase = str(op.get("phase"))
        status, sub = _MOVE.get(phase, ("Moving", phase))
        if op.get("needs_rollback"):
            sub += f" (needs rollback: {op['needs_rollback']})"
        return status, sub
    if op is not None and op.get("op") == "restore":
        status, sub = _RESTORE.get(str(op.get("phase")), ("Restoring", str(op.get("phase"))))
        if op.get("needs_rollback"):
            sub += f" (needs rollback: {op['needs_rollback']})"
        return status, sub
    if not volumes:
        return "Error", "VPG has no volumes"
    if any(v["error"] for v in volumes):
        return "Error", "Journal storage error"
    syncing = [v for v in volumes if v["initial_sync"] != "done"]
    if syncing:
        parts = []
        for v in syncing:
            pct = v["initial_sync_progress"]["percent"]
            parts.append(f"{v['name']} {pct:g}%" if pct is not None else v["name"])
        return "Initializing", "Initial Sync (" + ", ".join(parts) + ")"
    if any(v["connection"] != "connected" for v in volumes):
        return "Error", ("Site disconnection" if have_checkpoints
                         else "Site disconnection. No checkpoints")
    failed = [v for v in volumes if v["capture_failed"]]
    if failed:
        return "Not Meeting SLA", f"Capture stopped on {failed[0]['name']}: " \
                                  f"{failed[0]['capture_failed']} (resync needed)"
    rpo_ok = rpo is not None and rpo <= settings.rpo_s
    history_ok = history >= settings.history_s
    rpo_text = ("no checkpoint yet" if rpo is None
                else f"RPO {rpo:.0f} s exceeds the {settings.rpo_s:g} s target")
    history_text = (f"history held {_human(history)} of {_human(settings.history_s)}")
    if rpo_ok and history_ok:
        return "Meeting SLA", ""
    if rpo_ok:
        return "History Not Meeting SLA", history_text
    if history_ok:
        return "RPO Not Meeting SLA", rpo_text
    return "Not Meeting SLA", f"{rpo_text}; {history_text}"


#: (status, substatus) of a VPG in each phase of a live failover
_FAILOVER = {
    "starting": ("Failing Over", "Before Commit (bringing volumes up)"),
    "before-commit": ("Failing Over", "Before Commit"),
    "rolling-back": ("Failing Over", "Rolling back Failover"),
    "committed": ("Recovered", ""),
}


#: (status, substatus) of a VPG in each phase of a restore in place (the reference has no
#: restore states; these follow the failover's)
_RESTORE = {
    "starting": ("Restoring", "Before Commit (restoring volumes)"),
    "before-commit": ("Restoring", "Before Commit"),
    "committing": ("Restoring", "Committing"),
    "rolling-back": ("Restoring", "Rolling back Restore"),
}


#: (status, substatus) of a VPG in each phase of a planned move
_MOVE = {
    "starting": ("Moving", "StartingMove"),
    "before-commit": ("Moving", "MoveBeforeCommit"),
    "committing": ("Moving", "Committing Move"),
    "rolling-back": ("Moving", "Rolling back Move"),
}


def _human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"
