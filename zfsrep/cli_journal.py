"""The journal-server side of the command line: ``serve``, ``vpg``, ``tag``, ``checkpoints``,
``status``, ``snapshot`` and ``restore-file``. Client commands find the server through
``--server HOST:PORT``, else ``$ZFSREP_SERVER``, else 127.0.0.1:7450."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from zfsrep.errors import NotFoundError, ScriptError, StateError, UsageError


def json_text(obj: object) -> str:
    """``--json`` output (json is imported here: most commands print none, and every
    import slows each command's start)."""
    import json

    return json.dumps(obj)


SNAPSHOT_FSNAME = "zfsrep-snapshot:"


def _promotion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-copy", action="store_true",
                   help="copy every volume completely before the command returns, instead "
                        "of serving it at once and promoting its data behind it")
    p.add_argument("--promote-rate", type=float, metavar="MIB", default=None,
                   help="MiB a second the background promotion may copy (default: no limit); "
                        "files the applications change are copied at once whatever this is")


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="HOST:PORT",
                   help="journal server (default $ZFSREP_SERVER, else 127.0.0.1:7450)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser(
        "serve", help="run the journal server (recovery site)",
        description="Serve the journal store in --store: accept protected mounts, make their "
                    "frames durable, index them, record checkpoints. Returns once listening "
                    "(unless --foreground); stop it with SIGTERM.")
    sv.add_argument("--store", type=Path, required=True, metavar="DIR",
                    help="store directory (created if missing)")
    sv.add_argument("--listen", default="127.0.0.1:7450", metavar="HOST:PORT",
                    help="address to listen on (default 127.0.0.1:7450)")
    sv.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    sv.add_argument("--cpu-priority", choices=("background", "normal"), default="background",
                    help="background (default): while every VPG is within its RPO target, "
                         "the server and the mounts' sending take only CPU time no other "
                         "program on the host wants (SCHED_IDLE), so a burst of writes on "
                         "the same host is not slowed by its replication, which catches up "
                         "after it; once a VPG's RPO is half way from its checkpoint "
                         "interval to its target they run ordinarily until it is back. "
                         "normal: always ordinary time-sharing")
    sv.add_argument("--log", type=Path, metavar="FILE",
                    help="server log file when in the background (default STORE/server.log)")
    sv.add_argument("--ready-timeout", type=float, default=120.0, help=argparse.SUPPRESS)

    vp = sub.add_parser("vpg", help="create, list and delete VPGs (protection groups)")
    vps = vp.add_subparsers(dest="vpg_command", metavar="SUBCOMMAND")
    create = vps.add_parser("create", help="create a VPG",
                            description="Create a VPG. Durations take s, m, h or d.")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--history", default="8h", help="journal history to keep (default 8h)")
    create.add_argument("--rpo", default="10s", help="RPO target (default 10s)")
    create.add_argument("--checkpoint-interval", default="5s",
                        help="automatic checkpoint interval (default 5s)")
    create.add_argument("--recovery-dir", metavar="DIR",
                        help="where recovered volumes appear: DIR/test/VOLUME for failover "
                             "tests, DIR/live/VOLUME after a failover or move (absolute; "
                             "default STORE/recovery/NAME)")
    vset = vps.add_parser("set", help="change a VPG's settings",
                          description="Change settings of VPG NAME; the others stay.")
    vset.add_argument("name", metavar="NAME")
    vset.add_argument("--history")
    vset.add_argument("--rpo")
    vset.add_argument("--checkpoint-interval")
    vset.add_argument("--recovery-dir", metavar="DIR",
                      help="(not while a recovery operation is under way)")
    for p in (create, vset, vps.add_parser("list", help="list VPGs")):
        _server_arg(p)
        _json_arg(p)
    rmv = vps.add_parser(
        "remove-volume", help="take a volume whose mount is gone out of a VPG",
        description="Take volume VOL out of VPG NAME, so that new checkpoints go on without "
                    "it (a volume that never reconnects otherwise stops them): for a "
                    "protected directory given up, or whose spool was lost or marked "
                    "incomplete. Refused while its mount is connected. The checkpoints that "
                    "hold the volume keep it: its journal is indexed to the end and kept "
                    "(until the VPG is deleted) for snapshots and restores of those "
                    "checkpoints. The name is free again: protect the directory under it "
                    "with a new spool (a full initial sync).")
    rmv.add_argument("name", metavar="NAME")
    rmv.add_argument("volume", metavar="VOL")
    _server_arg(rmv)
    _json_arg(rmv)
    delete = vps.add_parser("delete", help="delete a VPG and its journal")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--force", action="store_true",
                        help="delete even while protected mounts are connected")
    _server_arg(delete)

    tg = sub.add_parser(
        "tag", help="record a tagged checkpoint now",
        description="Record a checkpoint named NAME across the VPG's volumes; returns once it "
                    "is durable. With several volumes the checkpoint is one consistent cut of "
                    "all of them (a barrier holds their writes for about a network round "
                    "trip). --pre and --post run shell commands on this host before and after "
                    "it, to quiesce an application for an application-consistent checkpoint: "
                    "if --pre fails no checkpoint is taken; --post runs in every case (a "
                    "failed --pre may have frozen the application half-way).")
    tg.add_argument("vpg", metavar="VPG")
    tg.add_argument("name", metavar="NAME")
    tg.add_argument("--pre", metavar="CMD", help="shell command to run first (e.g. freeze "
                    "the application); a non-zero exit cancels the checkpoint")
    tg.add_argument("--post", metavar="CMD", help="shell command to run after the "
                    "checkpoint is taken or has failed (e.g. thaw the application)")
    tg.add_argument("--script-timeout", metavar="SECONDS", type=float, default=300.0,
                    help="how long --pre or --post may run (default 300)")
    _server_arg(tg)
    _json_arg(tg)

    ft = sub.add_parser(
        "failover-test", help="start a failover test: every volume read-write at a checkpoint",
        description="Bring every volume of VPG up at CHECKPOINT (an id, a tag or latest) as "
                    "a throw-away copy in RECOVERY_DIR/test/VOLUME: copy-on-write over the "
                    "journal, so starting takes about as long for 1 MiB as for 10 GiB. "
                    "Production and its replication go on untouched. Run on the journal "
                    "server's host; stop with stop-test.")
    ft.add_argument("vpg", metavar="VPG")
    ft.add_argument("checkpoint", metavar="CHECKPOINT")
    _server_arg(ft)
    _json_arg(ft)
    st = sub.add_parser(
        "stop-test", help="stop a failover test, discard its writes, record the result",
        description="Unmount every test copy of VPG, discard what the test wrote, and record "
                    "a test checkpoint (kind test, never diluted) with the result and note.")
    st.add_argument("vpg", metavar="VPG")
    st.add_argument("--result", choices=("pass", "fail"), default="pass",
                    help="the outcome of the test (default pass)")
    st.add_argument("--note", metavar="TEXT", help="what was tested, recorded with it")
    _server_arg(st)
    _json_arg(st)

    fl = sub.add_parser(
        "failover-live", help="fail over: stop protection, bring every volume up at a "
                              "checkpoint",
        description="For when the protected site is lost: stop protection (the mounts are "
                    "disconnected and refused; their spools keep what they capture) and bring "
                    "every volume of VPG up as it was at CHECKPOINT at "
                    "RECOVERY_DIR/live/VOLUME. A volume is usable as soon as its names are "
                    "written: a mount serves it while its data is promoted (copied in from the "
                    "journal) behind it, and leaves a plain directory when that is done "
                    "(--full-copy: copy everything first). The VPG is then Failing Over / "
                    "Before Commit: still reversible with rollback, or made final with commit "
                    "(which waits for the promotion). Run on the journal server's host.")
    fl.add_argument("vpg", metavar="VPG")
    fl.add_argument("checkpoint", metavar="CHECKPOINT")
    _promotion_args(fl)
    cm = sub.add_parser("commit", help="make a live failover final (VPG Recovered)",
                        description="Make the failover of VPG final: it stays unprotected "
                                    "(Recovered) and its recovered volumes are the live copy. "
                                    "With --reverse-protect, every recovered directory is then "
                                    "protected (a mount over it) as a volume of a new VPG that "
                                    "replicates back: its first protection ships all of it "
                                    "(Initial Sync). Run on the recovery host.")
    cm.add_argument("vpg", metavar="VPG")
    cm.add_argument("--reverse-protect", action="store_true",
                    help="protect the recovered directories as a new VPG")
    cm.add_argument("--reverse-vpg", metavar="NAME",
                    help="the new VPG's name (default VPG-reverse); it must not exist yet")
    cm.add_argument("--reverse-server", metavar="HOST:PORT",
                    help="the journal server that takes the new VPG (the protected site's, "
                         "once it is back; default: the same server)")
    cm.add_argument("--reverse-spool-dir", metavar="DIR", type=Path,
                    help="the new mounts' spools go in DIR/VOLUME (default "
                         "/var/lib/zfsrep/spool/NAME/VOLUME)")
    rb = sub.add_parser("rollback", help="undo a live failover before commit",
                        description="Delete the recovered copies of VPG and return it to "
                                    "protecting: the mounts reconnect and ship what their "
                                    "spools captured meanwhile.")
    rb.add_argument("vpg", metavar="VPG")
    rsm = sub.add_parser(
        "resume", help="bring recovered volumes back up after a restart, before commit",
        description="For a live failover or a move that is before commit: start again every "
                    "promotion that stopped (the recovery host restarted, a promotion daemon "
                    "was killed, or a fill failed), so that each volume is served at "
                    "RECOVERY_DIR/live/VOLUME again and its promotion goes on where it was. "
                    "Commit does the same before it waits. Run on the journal server's host.")
    rsm.add_argument("vpg", metavar="VPG")
    rsm.add_argument("--promote-rate", type=float, metavar="MIB", default=None,
                     help="MiB a second the background promotion may copy from now on "
                          "(default: the limit the operation was started with)")
    mv = sub.add_parser(
        "move", help="planned move of a VPG to the recovery site, with no data loss",
        description="Hold every change on the VPG's protected mounts (writes wait; reads go "
                    "on), ship everything, record a final checkpoint that equals the protected "
                    "directories exactly, and bring every volume up at it at "
                    "RECOVERY_DIR/live/VOLUME, promoted as failover-live does (Moving: "
                    "StartingMove, then MoveBeforeCommit). "
                    "Then commit-move or rollback-move. Run on the journal server's host.")
    mv.add_argument("vpg", metavar="VPG")
    mv.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", default="latest",
                    help="latest (the default): the move's own final checkpoint")
    _promotion_args(mv)
    cmv = sub.add_parser("commit-move", help="finish a move: retire the protected side",
                         description="Unmount every protected mount of VPG, empty its source "
                                     "directory and spool, and delete the VPG; the moved "
                                     "volumes in RECOVERY_DIR/live are the live copy now.")
    cmv.add_argument("vpg", metavar="VPG")
    cmv.add_argument("--force", action="store_true",
                     help="commit although some protected mounts are not connected (their "
                          "host is gone for good): those are not retired, their directories "
                          "and spools are left as they are (stop such a mount and remove its "
                          "data by hand if its host comes back: it can no longer reconnect)")
    rmv = sub.add_parser("rollback-move", help="undo a move before commit: nothing is lost",
                         description="Delete the moved copies and let the protected mounts "
                                     "go on (held writes proceed).")
    rmv.add_argument("vpg", metavar="VPG")
    rs = sub.add_parser(
        "restore", help="put the protected volumes back to a checkpoint, in place",
        description="Single-site restore: every protected mount of VPG copies its volume as "
                    "it was at CHECKPOINT from the journal and swaps it in, keeping the "
                    "pre-restore tree (hidden in SOURCE/.zfsrep-restore) until commit-restore; "
                    "rollback-restore returns exactly to it. Protection goes on throughout: the "
                    "change is recorded like any other. Every mount must be connected, and no "
                    "file may be open on the volumes (stop the applications first).")
    rs.add_argument("vpg", metavar="VPG")
    rs.add_argument("checkpoint", metavar="CHECKPOINT")
    crs = sub.add_parser("commit-restore", help="keep a restore in place",
                         description="Delete the pre-restore trees the mounts kept; the VPG "
                                     "goes on protecting the restored volumes.")
    crs.add_argument("vpg", metavar="VPG")
    rrs = sub.add_parser("rollback-restore", help="undo a restore in place before commit",
                         description="Put every volume back exactly as it was before the "
                                     "restore (changes made since the restore are dropped).")
    rrs.add_argument("vpg", metavar="VPG")
    for p in (fl, cm, rb, rsm, mv, cmv, rmv, rs, crs, rrs):
        _server_arg(p)
        _json_arg(p)

    cp = sub.add_parser("checkpoints", help="list checkpoints",
                        description="List checkpoints, oldest first. Ages take s, m, h or d.")
    cp.add_argument("--selector", metavar='"vpg=V;minAge=5m;maxAge=3d"')
    cp.add_argument("--vpg", metavar="VPG")
    cp.add_argument("--min-age", metavar="AGE", help="only checkpoints at least this old")
    cp.add_argument("--max-age", metavar="AGE", help="only checkpoints at most this old")
    _server_arg(cp)
    _json_arg(cp)

    st = sub.add_parser("status", help="VPG status, RPO, journal and volume lag")
    st.add_argument("vpg", nargs="?", metavar="VPG")
    _server_arg(st)
    _json_arg(st)

    sn = sub.add_parser("snapshot", help="mount a checkpoint read-only")
    sns = sn.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND")
    mount = sns.add_parser(
        "mount", help="mount a volume as it was at a checkpoint",
        description="Mount a read-only view of a volume at CHECKPOINT (id, tag or 'latest') "
                    "on MOUNTPOINT. Runs on the recovery-site host (it reads the store). "
                    "Returns once the view is ready, unless --foreground.")
    mount.add_argument("vpg", metavar="VPG")
    mount.add_argument("checkpoint", metavar="CHECKPOINT")
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    mount.add_argument("--volume", metavar="VOL", help="needed when the VPG has several")
    mount.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    mount.add_argument("--allow-other", action="store_true",
                       help="let users other than root read the view")
    mount.add_argument("--log", type=Path, metavar="FILE",
                       help="daemon log (default /var/log/zfsrep/snapshot.log)")
    _server_arg(mount)
    umount = sns.add_parser("umount", help="unmount a snapshot view")
    umount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    rf = sub.add_parser(
        "restore-file", help="copy a file or tree out of a checkpoint",
        description="Copy PATH (inside the volume; '/' is the whole volume) as it was at "
                    "CHECKPOINT to DEST with its metadata. Refuses to overwrite without "
                    "--force; never writes outside DEST. Runs on the recovery-site host.")
    rf.add_argument("vpg", metavar="VPG")
    rf.add_argument("checkpoint", metavar="CHECKPOINT")
    rf.add_argument("volume", metavar="VOL")
    rf.add_argument("path", metavar="PATH")
    rf.add_argument("--to", type=Path, required=True, metavar="DEST", dest="dest")
    rf.add_argument("--force", action="store_true", help="overwrite existing files")
    _server_arg(rf)
    _json_arg(rf)


# ---- helpers -------------------------------------------------------------------------------
def _call(args: argparse.Namespace, op: str, req: dict | None = None, timeout: float = 60.0):
    from zfsrep import wire

    return wire.call(wire.server_address(args.server), op, req, timeout=timeout)


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human(seconds: float) -> str:
    from zfsrep.status import _human as human

    return human(seconds)


# ---- serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from zfsrep import wire
    from zfsrep.cli import run_foreground, spawn_daemon

    listen = wire.parse_address(args.listen)
    if args.foreground:
        import functools

        from zfsrep.server import serve

        args.store.mkdir(parents=True, exist_ok=True)
        main = functools.partial(serve, background=args.cpu_priority == "background")
        return run_foreground(main, args.store.resolve(), listen)
    args.store.mkdir(parents=True, exist_ok=True)
    log_path = args.log or (args.store / "server.log")
    argv = ["serve", "--store", str(args.store.resolve()), "--listen", args.listen,
            "--cpu-priority", args.cpu_priority, "--foreground"]
    pid = spawn_daemon(args, argv, log_path, args.ready_timeout)
    print(f"journal server listening on {args.listen}, store {args.store} (pid {pid}, "
          f"log {log_path})")
    return 0


# ---- VPGs ----------------------------------------------------------------------------------
def cmd_vpg(args: argparse.Namespace) -> int:
    if args.vpg_command == "create":
        res = _call(args, "vpg.create", {"name": args.name, "history": args.history,
                                         "rpo": args.rpo,
                                         "checkpoint_interval": args.checkpoint_interval,
                                         "recovery_dir": _abs(args.recovery_dir)})
        return _output(args, res, lambda: (
            f"VPG {res['name']} created (history {args.history}, RPO {args.rpo}, checkpoints "
            f"every {args.checkpoint_interval})"))
    if args.vpg_command == "set":
        req = {"name": args.name, "history": args.history, "rpo": args.rpo,
               "checkpoint_interval": args.checkpoint_interval,
               "recovery_dir": _abs(args.recovery_dir)}
        res = _call(args, "vpg.set", {k: v for k, v in req.items() if v is not None})
        return _output(args, res, lambda: (
            f"VPG {res['name']}: history {_human(res['history_s'])}, RPO {res['rpo_s']:g} s, "
            f"checkpoints every {res['checkpoint_interval_s']:g} s, recovery directory "
            f"{res['recovery_dir']}"))
    if args.vpg_command == "list":
        res = _call(args, "vpg.list")
        if args.json:
            print(json_text(res))
            return 0
        print(f"{'VPG':<20} {'volumes':<30} {'history':>8} {'RPO':>6} {'interval':>8}")
        for v in res:
            print(f"{v['name']:<20} {','.join(v['volumes']) or '-':<30} "
                  f"{v['history_s'] / 3600:>7.1f}h {v['rpo_s']:>5g}s "
                  f"{v['checkpoint_interval_s']:>7g}s")
        return 0
    if args.vpg_command == "remove-volume":
        res = _call(args, "vpg.remove-volume", {"name": args.name, "volume": args.volume},
                    timeout=120)
        return _output(args, res, lambda: (
            f"volume {res['volume']} removed from VPG {res['vpg']}; " + (
                f"checkpoints up to {res['last_checkpoint']} keep it"
                if res["last_checkpoint"] else "no checkpoint held it: its data is deleted")))
    if args.vpg_command == "delete":
        _call(args, "vpg.delete", {"name": args.name, "force": args.force}, timeout=600)
        print(f"VPG {args.name} deleted")
        return 0
    raise UsageError("usage: zfsrep vpg {create,set,list,remove-volume,delete} ...")


def _abs(path: str | None) -> str | None:
    """A directory named on this host, made absolute (the server may run elsewhere)."""
    return None if path is None else os.path.abspath(path)


# ---- checkpoints ---------------------------------------------------------------------------
def _run_script(which: str, cmd: str, timeout: float) -> None:
    """Run an administrator's command through the shell; its output goes to ours."""
    import subprocess

    try:
        proc = subprocess.run(cmd, shell=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ScriptError(f"{which} command did not finish within {timeout:g} s: {cmd}") \
            from None
    except OSError as e:
        raise ScriptError(f"{which} command could not run: {e.strerror or e}") from None
    if proc.returncode != 0:
        raise ScriptError(f"{which} command exited with {proc.returncode}: {cmd}")


def cmd_tag(args: argparse.Namespace) -> int:
    try:
        if args.pre:
            _run_script("--pre", args.pre, args.script_timeout)
        res = _call(args, "tag", {"vpg": args.vpg, "name": args.name}, timeout=120)
    except BaseException:
        if args.post:  # thaw the application anyway; the tag's error is the one to report
            try:
                _run_script("--post", args.post, args.script_timeout)
            except ScriptError as e:
                print(f"zfsrep: {e}", file=sys.stderr)
        raise
    if args.post:
        _run_script("--post", args.post, args.script_timeout)
    return _output(args, res, lambda: f"checkpoint {res['id']} tagged {res['tag']} at "
                                      f"{res['time']}")


def _output(args: argparse.Namespace, res: object, text: Callable[[], str]) -> int:
    """Print ``res`` as JSON with --json, else the line ``text()`` makes of it."""
    print(json_text(res) if args.json else text())
    return 0


def cmd_failover_test(args: argparse.Namespace) -> int:
    from zfsrep.recovery import failover_test

    op = failover_test(args)
    cp = op["checkpoint"]
    return _output(args, op, lambda: (
        f"failover test of VPG {args.vpg} at checkpoint {cp['id']} ({cp['time']}) running: "
        f"{len(op['volumes'])} volume(s) under {op['recovery_dir']}/test (started in "
        f"{op['start_seconds']:.1f} s)"))


def cmd_stop_test(args: argparse.Namespace) -> int:
    from zfsrep.recovery import stop_test

    res = stop_test(args)
    return _output(args, res, lambda: (
        f"failover test of checkpoint {res['tested']} stopped ({res['result']}); recorded as "
        f"checkpoint {res['checkpoint']['id']}"))


def cmd_failover_live(args: argparse.Namespace) -> int:
    from zfsrep.recovery import failover_live

    op = failover_live(args)
    cp = op["checkpoint"]
    return _output(args, op, lambda: (
        f"VPG {args.vpg} failed over to checkpoint {cp['id']} ({cp['time']}): "
        f"{len(op['volumes'])} volume(s) under {op['recovery_dir']}/live in "
        f"{op['start_seconds']:.1f} s; before commit (commit or rollback)"))


def cmd_commit(args: argparse.Namespace) -> int:
    from zfsrep.recovery import commit

    op = commit(args)
    rev = op.get("reverse")
    return _output(args, op, lambda: f"VPG {args.vpg}: failover committed (Recovered)" + (
        f"; reverse protection: VPG {rev['vpg']} on {rev['server']} protects "
        f"{', '.join(sorted(rev['volumes']))}" if rev else ""))


def cmd_rollback(args: argparse.Namespace) -> int:
    from zfsrep.recovery import rollback

    res = rollback(args)
    return _output(args, res, lambda: f"VPG {args.vpg}: failover rolled back; protection "
                                      "resumes as the mounts reconnect")


def cmd_resume(args: argparse.Namespace) -> int:
    from zfsrep.recovery import resume

    op = resume(args)
    done = op["resumed"]
    return _output(args, op, lambda: f"VPG {args.vpg}: " + (
        f"promotion resumed for {', '.join(done)}" if done else
        "nothing to resume: every promotion runs or is done"))


def cmd_move(args: argparse.Namespace) -> int:
    from zfsrep.recovery import move

    op = move(args)
    cp = op["checkpoint"]
    return _output(args, op, lambda: (
        f"VPG {args.vpg} moved to checkpoint {cp['id']} ({cp['time']}): "
        f"{len(op['volumes'])} volume(s) under {op['recovery_dir']}/live in "
        f"{op['start_seconds']:.1f} s; protected mounts hold their writes until "
        "commit-move or rollback-move"))


def cmd_commit_move(args: argparse.Namespace) -> int:
    from zfsrep.recovery import commit_move

    res = commit_move(args)
    left = res.get("left") or []
    return _output(args, res, lambda: f"VPG {args.vpg}: move committed; the protected side "
                                      "is retired and the VPG deleted" + (
                                          f" (not retired, not connected: {', '.join(left)}; "
                                          "their directories and spools are untouched)"
                                          if left else ""))


def cmd_rollback_move(args: argparse.Namespace) -> int:
    from zfsrep.recovery import rollback

    res = rollback(args, "move")
    return _output(args, res, lambda: f"VPG {args.vpg}: move rolled back; the protected "
                                      "mounts go on")


def cmd_restore(args: argparse.Namespace) -> int:
    from zfsrep.recovery import restore_in_place

    op = restore_in_place(args)
    cp = op["checkpoint"]
    return _output(args, op, lambda: (
        f"VPG {args.vpg} restored in place to checkpoint {cp['id']} ({cp['time']}): "
        f"{len(op['volumes'])} volume(s) in {op['start_seconds']:.1f} s; before commit "
        "(commit-restore or rollback-restore)"))


def cmd_commit_restore(args: argparse.Namespace) -> int:
    from zfsrep.recovery import finish_restore

    res = finish_restore(args, "commit")
    return _output(args, res, lambda: f"VPG {args.vpg}: restore committed; the pre-restore "
                                      "state is deleted")


def cmd_rollback_restore(args: argparse.Namespace) -> int:
    from zfsrep.recovery import finish_restore

    res = finish_restore(args, "rollback")
    return _output(args, res, lambda: f"VPG {args.vpg}: restore rolled back; the volumes are "
                                      "as they were before it")


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from zfsrep.checkpoints import parse_duration, parse_selector

    req: dict = {}
    if args.selector:
        sel = parse_selector(args.selector)
        req = {"vpg": sel.vpg, "min_age": sel.min_age_s, "max_age": sel.max_age_s}
    for key, value in (("vpg", args.vpg), ("min_age", args.min_age),
                       ("max_age", args.max_age)):
        if value is None:
            continue
        if req.get(key) is not None:
            raise UsageError(f"{key.replace('_', '-')} is given twice (option and selector)")
        req[key] = parse_duration(value) if key != "vpg" else value
    res = _call(args, "checkpoints", {k: v for k, v in req.items() if v is not None})
    if args.json:
        print(json_text(res))
        return 0
    print(f"{'VPG':<16} {'id':>7}  {'time (UTC)':<24} {'kind':<7} tag")
    for cp in res:
        print(f"{cp['vpg']:<16} {cp['id']:>7}  {cp['time']:<24} {cp['kind']:<7} "
              f"{cp.get('tag') or ''}")
    return 0


# ---- status --------------------------------------------------------------------------------
def _promotion_state(recovery_dir: Path, volume: str) -> dict | None:
    """A live volume's promotion (zfsrep.promote), from its progress file; None if none."""
    from zfsrep.promote import pid_alive, read_state

    state = read_state(recovery_dir / ".work" / "live" / volume)
    if state is None:
        return None
    out = {k: state.get(k) for k in ("state", "files_left", "bytes_left", "files_done",
                                      "bytes_done", "error")}
    if out["state"] in ("building", "promoting") and not pid_alive(state.get("pid")):
        out["state"] = "stopped"  # (resume, commit or rollback takes it up)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    res = _call(args, "status", {"vpg": args.vpg} if args.vpg else {})
    for v in res:  # promotions under way, when the recovery directory is on this host
        op = v.get("operation") or {}
        if op.get("op") in ("failover-live", "move") and v.get("recovery_dir"):
            for vol in v["volumes"]:
                state = _promotion_state(Path(v["recovery_dir"]), vol["name"])
                if state is not None:
                    vol["promotion"] = state
    if args.json:
        print(json_text(res))
        return 0
    for v in res:
        rpo = "-" if v["rpo_s"] is None else f"{v['rpo_s']:.1f} s"
        sub = f" ({v['substatus']})" if v["substatus"] else ""
        print(f"VPG {v['vpg']}: {v['status']}{sub}")
        print(f"  RPO {rpo} (target {v['rpo_target_s']:g} s), history held "
              f"{_human(v['history_s'])} of {_human(v['history_target_s'])}, "
              f"{v['checkpoints']} checkpoints, journal {_size(v['journal_bytes'])}; "
              f"replication at {v.get('replication_priority', 'normal')} CPU priority")
        op = v.get("operation")
        if op:
            print(f"  {op['op']} of checkpoint {op['checkpoint']}: {op['phase']} since "
                  f"{op['since']}; recovery directory {v['recovery_dir']}")
        for vol in v["volumes"]:
            lag = ("-" if vol["lag_records"] is None
                   else f"{vol['lag_records']} records / {_size(vol['lag_bytes'])}")
            print(f"  volume {vol['name']}: {vol['connection']} since {_iso(vol['since'])}, "
                  f"{vol['source']} on {vol['host']}; lag {lag}; spool "
                  f"{_size(vol['spool_bytes'])}; journal through {vol['durable_seq']}, "
                  f"indexed through {vol['indexed_seq']}")
            if op and vol["state"] != "protected":
                where = vol["live_path"] if op["op"] in ("failover-live", "move") else \
                    vol["test_path"]
                print(f"    {vol['state']}: {where}")
            promo = vol.get("promotion")
            if promo:
                print(f"    promotion {promo['state']}: {promo['files_left']} files "
                      f"({_size(promo['bytes_left'])}) left, {promo['files_done']} done"
                      + (f"; {promo['error']}" if promo.get("error") else "")
                      + ("; zfsrep resume brings it back up" if promo["state"] in
                         ("stopped", "failed") else ""))
            prog = vol.get("initial_sync_progress")
            if prog:
                pct = "?" if prog["percent"] is None else f"{prog['percent']:g}%"
                print(f"    initial sync {pct}: {_size(prog['bytes'])} of "
                      f"{_size(prog['total_bytes'])}")
    return 0


# ---- snapshots and restore -----------------------------------------------------------------
def _resolve_local(args: argparse.Namespace, volume: str | None) -> dict:
    res = _call(args, "resolve", {"vpg": args.vpg, "checkpoint": args.checkpoint,
                                  "volume": volume}, timeout=180)
    if not Path(res["volume_dir"], "index.sqlite").exists():
        raise StateError(f"the store of VPG {args.vpg} is not on this host "
                         f"({res['volume_dir']}); run this command on the recovery-site host")
    return res


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.snapshot_command == "umount":
        return _snapshot_umount(args.mountpoint)
    if args.snapshot_command != "mount":
        raise UsageError("usage: zfsrep snapshot {mount,umount} ...")
    from zfsrep.cli import run_foreground, spawn_daemon

    if not args.mountpoint.is_dir():
        raise NotFoundError(f"mount point {args.mountpoint} does not exist")
    if os.path.ismount(args.mountpoint):
        raise StateError(f"{args.mountpoint} is already a mount point")
    res = _resolve_local(args, args.volume)
    cp = res["checkpoint"]
    label = f"{res['vpg']}/{res['volume']}@{cp['id']}"
    if args.foreground:
        from zfsrep.mountd.snapshot import SnapshotOptions, run_snapshot_mount

        opts = SnapshotOptions(volume_dir=Path(res["volume_dir"]), seq=res["seq"],
                               mountpoint=args.mountpoint, label=label,
                               allow_other=args.allow_other)
        return run_foreground(run_snapshot_mount, opts)
    log_path = args.log or Path("/var/log/zfsrep/snapshot.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--volume-dir", res["volume_dir"], "--seq", str(res["seq"]), "--label", label,
            "--log", str(log_path)]
    if args.allow_other:
        argv.append("--allow-other")
    argv.append(str(args.mountpoint))
    pid = spawn_daemon(args, argv, log_path, 120.0, module="zfsrep.mountd.snapshot")
    tag = f" ({cp['tag']})" if cp.get("tag") else ""
    print(f"checkpoint {cp['id']}{tag} of {res['vpg']}/{res['volume']} at {cp['time']} "
          f"mounted read-only on {args.mountpoint} (pid {pid})")
    return 0


def _snapshot_umount(mountpoint: Path) -> int:
    import subprocess

    from zfsrep.syscalls import mount_at

    mounted = mount_at(os.path.realpath(mountpoint))
    fsname = mounted[2] if mounted is not None else None
    if fsname is None:
        raise NotFoundError(f"{mountpoint} is not a mount point")
    if not fsname.startswith(SNAPSHOT_FSNAME):
        raise StateError(f"{mountpoint} is not a zfsrep snapshot mount ({fsname})")
    r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if r.returncode != 0:
        raise StateError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")
    deadline = time.monotonic() + 10
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def cmd_restore_file(args: argparse.Namespace) -> int:
    from zfsrep.restore import restore_tree
    from zfsrep.view import open_view

    path = os.fsencode(args.path)
    if not path.startswith(b"/"):
        path = b"/" + path
    res = _resolve_local(args, args.volume)
    view = open_view(Path(res["volume_dir"]), res["seq"])
    show = sys.stderr.isatty() and not args.json
    last = [0.0]

    def progress(stats) -> None:
        now = time.monotonic()
        if show and now - last[0] > 0.5:
            last[0] = now
            print(f"\r  {stats.files} files, {stats.bytes >> 20} MiB", end="",
                  file=sys.stderr, flush=True)

    try:
        stats = restore_tree(view, path, args.dest, force=args.force, progress=progress)
    finally:
        view.close()
        if show:
            print(file=sys.stderr)
    cp = res["checkpoint"]
    out = {"vpg": res["vpg"], "volume": res["volume"], "checkpoint": cp, "path": args.path,
           "dest": str(args.dest), **vars(stats)}
    if args.json:
        print(json_text(out))
    else:
        print(f"restored {args.path} of {res['vpg']}/{res['volume']} at checkpoint {cp['id']} "
              f"({cp['time']}) to {args.dest}: {out.get('files', 0)} files, "
              f"{_size(out.get('bytes'))}")
    return 0


COMMANDS = {"serve": cmd_serve, "vpg": cmd_vpg, "tag": cmd_tag, "checkpoints": cmd_checkpoints,
            "failover-test": cmd_failover_test, "stop-test": cmd_stop_test,
            "failover-live": cmd_failover_live, "commit": cmd_commit, "rollback": cmd_rollback,
            "resume": cmd_resume,
            "move": cmd_move, "commit-move": cmd_commit_move,
            "rollback-move": cmd_rollback_move, "restore": cmd_restore,
            "commit-restore": cmd_commit_restore, "rollback-restore": cmd_rollback_restore,
            "status": cmd_status, "snapshot": cmd_snapshot, "restore-file": cmd_restore_file}
