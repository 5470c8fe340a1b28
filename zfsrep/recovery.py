"""Recovery operations, the recovery host's half: what the CLI mounts, writes and removes.

A failover test brings every volume of a VPG up read-write at a checkpoint, as a throw-away
copy: the checkpoint's read-only snapshot mount (``zfsrep.mountd.snapshot``, served from
the journal's index) is the lower layer of a kernel overlay whose upper layer takes the test
writes (copy-on-write; starting costs the same for 1 MiB or 10 GiB, nothing is copied).
Production and its replication are not touched. Stopping unmounts both, deletes the upper
layer (the test writes) and has the server record a test checkpoint with the result.

Layout under the VPG's recovery directory::

    DIR/test/VOLUME                the test copy (overlay mount point)
    DIR/.work/test/VOLUME/lower    the snapshot mount (read-only)
    DIR/.work/test/VOLUME/upper    test writes (deleted when the test stops)
    DIR/.work/test/VOLUME/work     overlayfs work directory
    DIR/.work/test/VOLUME/snapshot.log

A live failover (or a move) brings every volume at the checkpoint up at
``DIR/live/VOLUME``: a promotion mount (``zfsrep.mountd.promote``, ``docs/promotion.md``)
serves the volume's skeleton there at once while its data is promoted from the journal
behind it, then leaves the filled tree as a plain directory; its work directory is
``DIR/.work/live/VOLUME``. Commit waits for the promotion; rollback stops it and deletes the
directories. With ``--full-copy`` the volume is written out whole first (``zfsrep.restore``).

The server holds the operation's state (``zfsrep.operations``); every step here is reported
to it, so a stop after a crash of this command, or of the server, finds what to undo.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import time
from pathlib import Path

from zfsrep.errors import OSFailure, StateError, UsageError, ZfsrepError


def _call(args: argparse.Namespace, op: str, req: dict, timeout: float = 60.0):
    from zfsrep import wire

    return wire.call(wire.server_address(args.server), op, req, timeout=timeout)


def _run(cmd: list[str]):
    import subprocess  # (not at the top: every recovery command imports this module)

    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _work(op: dict, volume: str) -> Path:
    return Path(op["recovery_dir"]) / ".work" / "test" / volume


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


def failover_test(args: argparse.Namespace) -> dict:
    """Start a failover test of ``args.vpg`` at ``args.checkpoint``; returns the operation."""
    started = time.monotonic()
    op = _call(args, "test.start", {"vpg": args.vpg, "checkpoint": args.checkpoint},
               timeout=180)
    try:
        for name, vol in sorted(op["volumes"].items()):
            t0 = time.monotonic()
            _bring_up(args, op, name, vol)
            _say(args, f"{name}: test copy of checkpoint {op['checkpoint']['id']} at "
                       f"{vol['path']} ({time.monotonic() - t0:.1f} s)")
    except BaseException:
        with contextlib.suppress(Exception):  # undo what was mounted, then end the test
            _call(args, "test.phase", {"vpg": args.vpg, "phase": "stopping"})
            for name in op["volumes"]:
                _take_down(op, name)
            _call(args, "test.abort", {"vpg": args.vpg})
        raise
    op = _call(args, "test.phase", {"vpg": args.vpg, "phase": "running"})
    op["start_seconds"] = round(time.monotonic() - started, 3)
    return op


def _bring_up(args: argparse.Namespace, op: dict, name: str, vol: dict) -> None:
    from zfsrep.cli import spawn_daemon

    if not Path(vol["volume_dir"], "index.sqlite").exists():
        raise StateError(f"the store of VPG {args.vpg} is not on this host "
                         f"({vol['volume_dir']}); run this command on the recovery-site host")
    path, work = Path(vol["path"]), _work(op, name)
    for bad in (",", ":", "\n"):
        if bad in str(path) or bad in str(work):
            raise UsageError(f"the recovery directory may not contain {bad!r}: {path}")
    lower, upper, scratch = work / "lower", work / "upper", work / "work"
    for d in (path, lower, upper, scratch):
        d.mkdir(parents=True, exist_ok=True)
    if _mounted(path):
        raise StateError(f"{path} is already a mount point")
    if not _mounted(lower):
        label = f"{args.vpg}/{name}@{op['checkpoint']['id']} (failover test)"
        spawn_daemon(args, ["--volume-dir", vol["volume_dir"], "--seq", str(vol["seq"]),
                            "--label", label, "--log", str(work / "snapshot.log"), str(lower)],
                     work / "snapshot.log", 120.0, module="zfsrep.mountd.snapshot")
    # the overlay's root takes its owner, mode and times from the upper layer's root
    st = os.stat(lower)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))
    opts = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    r = _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(path)])
    if r.returncode != 0:
        raise OSFailure(f"cannot mount the test copy at {path}: "
                        f"{r.stderr.strip() or 'mount failed'}")


def stop_test(args: argparse.Namespace) -> dict:
    """Unmount and discard every test copy, then record the test checkpoint."""
    op = _call(args, "test.phase", {"vpg": args.vpg, "phase": "stopping"})
    for name in sorted(op["volumes"]):
        _take_down(op, name)
        _say(args, f"{name}: test copy discarded")
    return _call(args, "test.stop", {"vpg": args.vpg, "result": args.result,
                                     "note": args.note}, timeout=120)


def _take_down(op: dict, name: str) -> None:
    path, work = Path(op["volumes"][name]["path"]), _work(op, name)
    if _mounted(path):
        r = _run(["umount", str(path)])
        if r.returncode != 0:
            raise StateError(f"cannot unmount the test copy at {path}: "
                             f"{r.stderr.strip() or 'busy'} (close what uses it, then run "
                             "stop-test again)")
    lower = work / "lower"
    if _mounted(lower):
        r = _run(["fusermount3", "-u", str(lower)])
        if r.returncode != 0:
            raise StateError(f"cannot unmount {lower}: {r.stderr.strip()}")
        deadline = time.monotonic() + 10
        while _mounted(lower) and time.monotonic() < deadline:
            time.sleep(0.05)
    import shutil

    for d in (work / "upper", work / "work"):
        try:
            shutil.rmtree(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OSFailure(f"cannot discard the test writes in {d}: {e.strerror or e}") \
                from None
    with contextlib.suppress(OSError):
        path.rmdir()



# ---- failover (live) -----------------------------------------------------------------------
def failover_live(args: argparse.Namespace) -> dict:
    """Stop protection and bring every volume up at the checkpoint in DIR/live/VOLUME."""
    return _bring_up_live(args, "live", {"vpg": args.vpg, "checkpoint": args.checkpoint})


def move(args: argparse.Namespace) -> dict:
    """Quiesce, drain, final checkpoint, and every volume up at it in DIR/live/VOLUME."""
    return _bring_up_live(args, "move", {"vpg": args.vpg, "checkpoint": args.checkpoint})


def _bring_up_live(args: argparse.Namespace, kind: str, req: dict) -> dict:
    started = time.monotonic()
    _say(args, "quiescing the protected mounts and draining them" if kind == "move" else
         "stopping protection")
    op = _call(args, f"{kind}.start", req, timeout=900)
    made: list[tuple[str, Path]] = []
    try:
        for name, vol in sorted(op["volumes"].items()):
            dest = Path(vol["path"])
            if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
                raise StateError(f"{dest} exists and is not empty: move it away first")
            if not Path(vol["volume_dir"], "index.sqlite").exists():
                raise StateError(f"the store of VPG {args.vpg} is not on this host "
                                 f"({vol['volume_dir']}); run this on the recovery-site host")
            made.append((name, dest))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if args.full_copy:
                _materialise(args, name, vol, dest)
            else:
                _start_promotion(args, op, name, vol)
    except BaseException:
        with contextlib.suppress(Exception):  # back to protecting, as if never started
            _call(args, f"{kind}.phase", {"vpg": args.vpg, "phase": "rolling-back"})
            for name, dest in made:
                _stop_promotion(op, name, dest)
                _remove_tree(dest)
            _call(args, f"{kind}.rolled-back", {"vpg": args.vpg})
        raise
    op = _call(args, f"{kind}.phase", {"vpg": args.vpg, "phase": "before-commit"})
    op["start_seconds"] = round(time.monotonic() - started, 3)
    op["promotion"] = "full copy" if args.full_copy else "background"
    return op


# ---- promotion: the volumes usable before their data is copied (zfsrep.promote) ------------
def _live_work(op: dict, volume: str) -> Path:
    return Path(op["recovery_dir"]) / ".work" / "live" / volume


def _fuse_at(path: Path) -> bool:
    """Whether a mount (live, or of a daemon that died) is at ``path``, from the mount table."""
    from zfsrep.syscalls import mount_at

    return mount_at(os.path.abspath(path)) is not None


def _start_promotion(args: argparse.Namespace, op: dict, name: str, vol: dict,
                     resume: bool = False, rate: int | None = None) -> None:
    """Start the promotion mount of one volume (``zfsrep.mountd.promote``); it returns once
    the volume is served at its live path."""
    from zfsrep.cli import spawn_daemon
    from zfsrep.promote import LOG, pid_alive, read_state

    work, dest = _live_work(op, name), Path(vol["path"])
    if not resume:
        old = read_state(work)
        if old is not None and pid_alive(old.get("pid")):
            raise StateError(f"a promotion of {dest} is still running (pid {old['pid']}); "
                             "roll back the operation it belongs to first")
        _remove_tree(work)  # what a failed earlier attempt left
    dest.mkdir(parents=True, exist_ok=True)
    argv = ["--volume-dir", vol["volume_dir"], "--seq", str(vol["seq"]), "--work", str(work),
            "--label", f"{args.vpg}/{name}@{op['checkpoint']['id']}", "--log", str(work / LOG)]
    mib = getattr(args, "promote_rate", None)
    if mib:
        rate = int(mib * (1 << 20))
    if rate:
        argv += ["--rate", str(rate)]
    spawn_daemon(args, [*argv, str(dest)], work / LOG, 120.0, module="zfsrep.mountd.promote")
    _say(args, f"{name}: usable at {dest}; its data is promoted from the journal behind it")


def _stop_promotion(op: dict, name: str, dest: Path, timeout: float = 30.0) -> None:
    """Stop a volume's promotion mount, if any (processes inside it lose it)."""
    from zfsrep.promote import read_state

    work = _live_work(op, name)
    state = read_state(work)
    if _fuse_at(dest):
        r = _run(["fusermount3", "-u", "-z", str(dest)])
        if r.returncode != 0 and _fuse_at(dest):
            raise OSFailure(f"cannot unmount {dest}: {r.stderr.strip() or 'unmount failed'}")
    if state is not None:
        _stop_daemon(state.get("pid"), timeout)
    _remove_tree(work)


def _stop_daemon(pid: object, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: a daemon in the middle of a file's fill
    finishes that file first."""
    import signal

    from zfsrep.promote import pid_alive

    if not isinstance(pid, int) or not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_promoted(args: argparse.Namespace, op: dict) -> list[int]:
    """Wait until every volume's data is promoted, with progress; a promotion that stopped
    (its daemon killed, the host restarted) is started again and goes on where it was.
    Returns the daemons still serving a detached mount to processes inside it."""
    from zfsrep.promote import LOG, pid_alive, read_state

    lingering: list[int] = []
    for name, vol in sorted(op["volumes"].items()):
        work, dest = _live_work(op, name), Path(vol["path"])
        restarts, shown = 0, 0.0
        while True:
            state = read_state(work)
            if state is None:
                break  # (a full copy has no promotion)
            if state.get("state") == "promoted":
                if pid_alive(state.get("pid")):
                    lingering.append(state["pid"])
                break
            failed = state.get("state") == "failed"
            if failed or not pid_alive(state.get("pid")):
                if restarts >= 3:
                    why = f": {state.get('error')}" if state.get("error") else ""
                    raise OSFailure(f"{name}: the promotion stopped {restarts} times{why} "
                                    f"(see {work / LOG}); roll back, or fix the "
                                    "cause and commit again")
                restarts += 1
                _restart_promotion(args, op, name, vol, state)
                continue
            now = time.monotonic()
            if now - shown >= 1.0:
                shown = now
                _say(args, f"{name}: promoting, {state.get('files_left', 0)} files "
                           f"({int(state.get('bytes_left', 0)) >> 20} MiB) left")
            time.sleep(0.1)
        _remove_tree(work)
        _say(args, f"{name}: promoted; {dest} is a plain directory")
    return lingering


def _restart_promotion(args: argparse.Namespace, op: dict, name: str, vol: dict,
                       state: dict) -> None:
    """Start a volume's promotion again where it stopped (its daemon dead, or failed)."""
    from zfsrep.promote import STATE

    work, dest = _live_work(op, name), Path(vol["path"])
    if state.get("state") == "failed":  # (a cause fixed meanwhile, a full disk emptied)
        _say(args, f"{name}: the promotion failed ({state.get('error')}); starting it again")
        _stop_daemon(state.get("pid"))
    else:
        _say(args, f"{name}: the promotion was stopped; going on with it")
    if _fuse_at(dest):  # (a daemon that died leaves its mount: ENOTCONN)
        _run(["fusermount3", "-u", "-z", str(dest)])
    (work / STATE).unlink(missing_ok=True)
    rate = state.get("rate")  # (the limit it was started with, unless the command gives one)
    _start_promotion(args, op, name, vol, resume=True,
                     rate=int(rate) if isinstance(rate, int | float) and rate > 0 else None)


def resume(args: argparse.Namespace) -> dict:
    """Bring the volumes of a live failover or move that is before commit back up where
    their promotion stopped (the recovery host restarted, a daemon was killed), without
    committing. ``resumed``: the volumes started again."""
    from zfsrep.promote import pid_alive, read_state

    op = _call(args, "op.expect", {"vpg": args.vpg, "op": ["failover-live", "move"],
                                   "phases": ["before-commit"]})
    resumed = []
    for name, vol in sorted(op["volumes"].items()):
        state = read_state(_live_work(op, name))
        if state is None or state.get("state") == "promoted":
            continue  # (a full copy, or done)
        if state.get("state") != "failed" and pid_alive(state.get("pid")):
            continue
        _restart_promotion(args, op, name, vol, state)
        resumed.append(name)
    op["resumed"] = resumed
    return op


def _materialise(args: argparse.Namespace, name: str, vol: dict, dest: Path) -> None:
    from zfsrep.restore import restore_tree
    from zfsrep.syscalls import syncfs
    from zfsrep.view import open_view

    view = open_view(Path(vol["volume_dir"]), vol["seq"])
    last = [0.0]
    t0 = time.monotonic()

    def progress(stats) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            _say(args, f"{name}: {stats.files} files, {stats.bytes >> 20} MiB")

    try:
        stats = restore_tree(view, b"/", dest, progress=progress)
    finally:
        view.close()
    try:
        syncfs(dest)  # the recovered copy is durable before the VPG says it is up
    except OSError as e:
        raise OSFailure(f"cannot make {dest} durable: {e.strerror or e}") from None
    _say(args, f"{name}: up at {dest} ({stats.files} files, {stats.bytes >> 20} MiB in "
               f"{time.monotonic() - t0:.1f} s)")


def _remove_tree(path: Path) -> None:
    import shutil

    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OSFailure(f"cannot remove {path}: {e.strerror or e}") from None


def commit(args: argparse.Namespace) -> dict:
    """Make a live failover final; with ``--reverse-protect``, protect every recovered
    directory as a volume of a new VPG (a mount over it, on this host). Waits for the
    promotion of every volume first."""
    lingering = _wait_promoted(args, _call(args, "op.expect", {
        "vpg": args.vpg, "op": "failover-live", "phases": ["before-commit"]}))
    if not args.reverse_protect:
        if args.reverse_vpg or args.reverse_server or args.reverse_spool_dir:
            raise UsageError("--reverse-vpg, --reverse-server and --reverse-spool-dir go with "
                             "--reverse-protect")
        return _call(args, "live.commit", {"vpg": args.vpg})
    from zfsrep import wire
    from zfsrep.store import check_name

    name = check_name("VPG", args.reverse_vpg or f"{args.vpg}-reverse")
    host, port = wire.server_address(args.reverse_server or args.server)
    where = f"{host}:{port}"
    # before anything is final: the new VPG's server answers, and the name is free
    if any(v["name"] == name for v in wire.call((host, port), "vpg.list", {})):
        raise StateError(f"VPG {name} already exists on {where}: give another --reverse-vpg")
    settings = next((v for v in _call(args, "vpg.list", {}) if v["name"] == args.vpg), None)
    if settings is None:
        raise StateError(f"no VPG named {args.vpg}")
    op = _call(args, "live.commit", {"vpg": args.vpg,
                                     "reverse": {"vpg": name, "server": where}})
    if lingering:  # their writes would bypass the protection: those processes must reopen
        import signal

        for pid in lingering:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _say(args, f"stopped {len(lingering)} detached promotion mount(s) still in use: the "
                   "processes inside must reopen their files from the live path")
    wire.call((host, port), "vpg.create", {
        "name": name, "history": settings["history_s"], "rpo": settings["rpo_s"],
        "checkpoint_interval": settings["checkpoint_interval_s"]})
    protected: list[str] = []
    for volume, vol in sorted(op["volumes"].items()):
        path = vol["path"]
        cmd = [sys.executable, "-m", "zfsrep.cli", "protect", "--vpg", name, "--volume", volume,
               "--server", where, "--source", path, path]
        if args.reverse_spool_dir is not None:
            cmd += ["--spool", str(args.reverse_spool_dir / volume)]
        r = _run(cmd)
        if r.returncode != 0:
            why = r.stderr.strip().removeprefix("zfsrep: ") or f"exit {r.returncode}"
            raise ZfsrepError(
                f"failover committed and VPG {name} created, but {path} could not be "
                f"protected: {why} (protected: {', '.join(protected) or 'none'}; protect "
                "the rest with zfsrep protect)", exit_code=r.returncode)
        protected.append(volume)
        _say(args, f"{volume}: {path} protected as volume {volume} of VPG {name} on {where}")
    op["reverse"] = {"vpg": name, "server": where, "volumes": protected}
    return op


def rollback(args: argparse.Namespace, kind: str = "live") -> dict:
    """Delete the recovered copies and return the VPG to protecting."""
    op = _call(args, f"{kind}.phase", {"vpg": args.vpg, "phase": "rolling-back"})
    for name in sorted(op.get("volumes") or {}):
        dest = Path(op["volumes"][name]["path"])
        _stop_promotion(op, name, dest)
        _remove_tree(dest)
        _say(args, f"{name}: recovered copy removed")
    return _call(args, f"{kind}.rolled-back", {"vpg": args.vpg}, timeout=120)


def commit_move(args: argparse.Namespace) -> dict:
    # the promotion reads the journal, which the commit deletes with the VPG
    _wait_promoted(args, _call(args, "op.expect", {"vpg": args.vpg, "op": "move",
                                                   "phases": ["before-commit", "committing"]}))
    return _call(args, "move.commit", {"vpg": args.vpg, "force": args.force}, timeout=300)


# ---- restore in place ------------------------------------------------------------------------
def restore_in_place(args: argparse.Namespace) -> dict:
    """Have every protected mount put its volume back to the checkpoint (zfsrep.inplace)."""
    started = time.monotonic()
    _say(args, "restoring the protected volumes in place (each mount copies its volume from "
               "the journal; progress in its log)")
    op = _call(args, "restore.start", {"vpg": args.vpg, "checkpoint": args.checkpoint},
               timeout=6 * 3600 + 60)
    op["start_seconds"] = round(time.monotonic() - started, 3)
    return op


def finish_restore(args: argparse.Namespace, how: str) -> dict:
    return _call(args, f"restore.{how}", {"vpg": args.vpg}, timeout=3600 + 60)
