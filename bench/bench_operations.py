#!/usr/bin/env python3
"""Recovery-operation times (issue 4): ``zfsrep failover-test`` from the command to a
writable test copy, and ``zfsrep failover-live`` from the command to usable volumes against
``cp -a`` of the backing directory, for a volume holding 1 GiB and one holding 10 GiB.

For each size: a journal server, a VPG and one replicated protected mount; fio writes the
data (random, incompressible) through the mount, ``tag`` marks it, and the script waits until
the checkpoint is indexed. Then it starts and stops the failover test ``--repeats`` times and
reports the median start time (the CLI's wall time: resolving the checkpoint, the snapshot
mount, the overlay), the stop time, and checks that a file read through the test copy equals
the backing file. Target: start under 2 s at either size (and so about equal for both).
Then, ``--live-repeats`` times, with caches made cold before each: ``failover-live`` (then
``rollback``), ``failover-live --full-copy`` (then ``rollback``) and ``cp -a`` of the backing
directory followed by ``sync``, taking turns at going first; the ratio is the median of the
pairs' ratios. ``failover-live`` returns once the volumes are usable (served at their live
paths while their data is promoted behind them); the script also times a first read of 1 MiB
of the data file through the live path, a first write to it (4 KiB in the middle of the
file, then ``fdatasync``: it waits for the promotion of the chunk it touches, not of the
file) and the end of the promotion (the live path a plain directory), all
from the command's start. Cold means, per ``--cold``:
``all``, every cache dropped (``drop_caches``: the data, but also the Python modules the
command starts from, which then cost 0.2-0.25 s more than with a warm cache), and ``data``,
only the pages of the store's and the backing directory's files evicted (as on a recovery
host whose journal server runs from the same interpreter and package). Target:
failover-live no slower than 1.0x ``cp -a``. Last, ``move`` (then ``rollback-move``) on the
idle volume and while a 4 KiB write+fdatasync loop runs on it: the time writes are held
until the volumes are up at the recovery site, and the longest single write of the loop.
Then ``restore`` in place of the tagged checkpoint and ``rollback-restore`` (no target).

    .venv/bin/python bench/bench_operations.py [--sizes 1G,10G] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _mounts  # noqa: E402
from _mounts import FuseMount  # noqa: E402
from bench_replication import Env, add_env_args, drop_caches, journal_server, log, run_fio  # noqa: E402
from hoststeal import StealMeter, describe  # noqa: E402

VPG = "ops"
TARGET_S = 2.0


def parse_size(text: str) -> int:
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


_BUSY = """
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
buf, worst, i = os.urandom(4096), 0.0, 0
while not os.path.exists(stop):
    t0 = time.monotonic()
    os.pwrite(fd, buf, (i % 4096) * 4096)
    os.fdatasync(fd)
    worst, i = max(worst, time.monotonic() - t0), i + 1
print(worst)
"""


def _busy_writer(path: str, stop_file: str) -> subprocess.Popen:
    """4 KiB write + fdatasync in a loop in its own process (a thread blocked on the mount
    would keep this process from forking the next command): a busy volume during a move."""
    return subprocess.Popen([sys.executable, "-c", _BUSY, path, stop_file],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def evict(*roots: str) -> None:
    """Drop the cached pages of every file under ``roots`` (written back first): their data
    is read from the disk again, while programs and modules stay cached."""
    os.sync()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                try:
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def wait_connected(srv, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = srv.call("status", {"vpg": VPG})[0]
        if all(v["connection"] == "connected" for v in st["volumes"]):
            return
        time.sleep(0.2)
    raise RuntimeError("the protected mount did not reconnect")


def timed_cli(env: Env, *args: str) -> float:
    t0 = time.monotonic()
    env.cli(*args, timeout=600)
    return time.monotonic() - t0


def measure(env: Env, size: int, repeats: int, live_repeats: int,
            colds: list[str]) -> dict:
    base = env.fresh(f"ops-{size >> 20}M")
    m: FuseMount | None = None
    try:
        with journal_server(env, os.path.join(base, "store")) as srv:
            rec = os.path.join(base, "recovery")
            env.cli("vpg", "create", VPG, "--checkpoint-interval", "5s", "--recovery-dir", rec,
                    "--server", srv.address)
            backing, mnt = os.path.join(base, "backing"), os.path.join(base, "mnt")
            os.makedirs(backing)
            os.makedirs(mnt)
            m = FuseMount("protect", env.zargv(
                "protect", "--source", backing, "--spool", os.path.join(base, "spool"), mnt,
                "--foreground", "--vpg", VPG, "--volume", "data", "--server", srv.address),
                mnt, os.path.join(base, "protect.log"), env.args.mount_timeout,
                env.args.stop_timeout, env=env.zenv(), cwd=env.root)
            m.start()
            t0 = time.monotonic()
            run_fio("data", os.path.join(mnt, "data.bin"), 3600, rw="write", bs="1M",
                    size=str(size), end_fsync=1, refill_buffers=1)
            log(f"   wrote {size >> 20} MiB in {time.monotonic() - t0:.0f} s; tagging")
            env.cli("tag", VPG, "data", "--server", srv.address, timeout=900)
            t0 = time.monotonic()
            srv.call("resolve", {"vpg": VPG, "checkpoint": "data", "volume": "data",
                                 "wait": 3600}, timeout=3700)
            log(f"   indexed after {time.monotonic() - t0:.0f} s more")
            starts, stops = [], []
            for i in range(repeats):
                starts.append(timed_cli(env, "failover-test", VPG, "data", "--server",
                                        srv.address))
                test_file = os.path.join(rec, "test", "data", "data.bin")
                if i == 0 and not filecmp.cmp(test_file, os.path.join(backing, "data.bin"),
                                              shallow=False):
                    raise RuntimeError("the test copy differs from the backing file")
                stops.append(timed_cli(env, "stop-test", VPG, "--server", srv.address))
                log(f"   start {starts[-1]:.2f} s, stop {stops[-1]:.2f} s")
            lives: dict[str, list[float]] = {mode: [] for mode in colds}
            copies: dict[str, list[float]] = {mode: [] for mode in colds}

            live_file = os.path.join(rec, "live", "data", "data.bin")
            state_file = os.path.join(rec, ".work", "live", "data", "promote.json")
            reads: dict[str, list[float]] = {mode: [] for mode in colds}
            writes: dict[str, list[float]] = {mode: [] for mode in colds}
            promoted: dict[str, list[float]] = {mode: [] for mode in colds}
            fulls: dict[str, list[float]] = {mode: [] for mode in colds}

            def live(mode: str) -> None:
                """The command (to usable volumes), then a first read of 1 MiB of the data
                file, then the end of the promotion (the tree left as a plain directory)."""
                t0 = time.monotonic()
                env.cli("failover-live", VPG, "data", "--server", srv.address, timeout=600)
                lives[mode].append(time.monotonic() - t0)
                with open(live_file, "rb") as f:
                    if len(f.read(1 << 20)) != min(size, 1 << 20):
                        raise RuntimeError("short read from the live volume")
                reads[mode].append(time.monotonic() - t0)
                # a first write, in the middle: what it touches is promoted first
                fd = os.open(live_file, os.O_WRONLY)
                try:
                    os.pwrite(fd, b"w" * 4096, size // 2)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                writes[mode].append(time.monotonic() - t0)
                deadline = t0 + 900
                while True:
                    try:
                        with open(state_file) as f:
                            state = json.load(f).get("state")
                    except (OSError, ValueError):
                        state = None
                    if state == "promoted":
                        break
                    if state == "failed" or time.monotonic() > deadline:
                        raise RuntimeError(f"the promotion did not finish: {state}")
                    time.sleep(0.02)
                promoted[mode].append(time.monotonic() - t0)
                timed_cli(env, "rollback", VPG, "--server", srv.address)

            def full(mode: str) -> None:
                fulls[mode].append(timed_cli(env, "failover-live", VPG, "data", "--full-copy",
                                             "--server", srv.address))
                timed_cli(env, "rollback", VPG, "--server", srv.address)

            def copy(mode: str) -> None:
                dest = os.path.join(base, "copy")
                t0 = time.monotonic()
                subprocess.run(["cp", "-a", backing, dest], check=True)
                subprocess.run(["sync", "-f", dest], check=True)
                copies[mode].append(time.monotonic() - t0)
                shutil.rmtree(dest)

            for i in range(live_repeats):
                # cold caches for both (failover-live reads the store, cp -a the backing
                # dir), each going first in every other pair: neither always follows the
                # other's deletion of what it wrote
                for mode in colds:
                    for step in ((live, copy, full) if i % 2 == 0 else (copy, full, live)):
                        os.sync()
                        if mode == "all":
                            drop_caches()
                        else:
                            evict(os.path.join(base, "store"), backing)
                        step(mode)
                    log(f"   cold {mode}: failover-live usable {lives[mode][-1]:.2f} s, first "
                        f"MiB read {reads[mode][-1]:.2f} s, first write "
                        f"{writes[mode][-1]:.2f} s, promoted {promoted[mode][-1]:.2f} "
                        f"s; --full-copy {fulls[mode][-1]:.2f} s; cp -a {copies[mode][-1]:.2f} s")
            moves = {}
            stop_file = os.path.join(base, "stop-busy")
            wait_connected(srv)  # (after a rollback the mount reconnects within seconds)
            for load in ("idle", "busy"):
                writer = None
                if load == "busy":
                    writer = _busy_writer(os.path.join(mnt, "busy.bin"), stop_file)
                    time.sleep(1.0)
                try:
                    moves[load] = timed_cli(env, "move", VPG, "--server", srv.address)
                finally:
                    timed_cli(env, "rollback-move", VPG, "--server", srv.address)
                    if writer is not None:
                        open(stop_file, "w").close()
                        out, _ = writer.communicate(timeout=120)
                        moves["busy_max_write_s"] = float(out.strip() or "nan")
                log(f"   move ({load}): writes held {moves[load]:.2f} s")
            # restore in place of the tagged checkpoint (the mount copies the volume from
            # the journal, records it, swaps it in), then rolled back (recorded the same way)
            wait_connected(srv)
            restore_s = timed_cli(env, "restore", VPG, "data", "--server", srv.address)
            rollback_s = timed_cli(env, "rollback-restore", VPG, "--server", srv.address)
            log(f"   restore in place {restore_s:.2f} s, rollback-restore {rollback_s:.2f} s")
            m.stop()
        return {"size": size, "restore_s": restore_s, "restore_rollback_s": rollback_s,
                "move_idle_s": moves["idle"], "move_busy_s": moves["busy"],
                "move_busy_max_write_s": moves["busy_max_write_s"],
                "start_s": statistics.median(starts), "start_max_s": max(starts),
                "stop_s": statistics.median(stops), "repeats": repeats,
                "live": {mode: {"live_s": statistics.median(lives[mode]),
                                "read_s": statistics.median(reads[mode]),
                                "write_s": statistics.median(writes[mode]),
                                "promoted_s": statistics.median(promoted[mode]),
                                "full_s": statistics.median(fulls[mode]),
                                "cp_s": statistics.median(copies[mode]),
                                "ratio": statistics.median(
                                    a / b for a, b in zip(lives[mode], copies[mode],
                                                          strict=True)),
                                "full_ratio": statistics.median(
                                    a / b for a, b in zip(fulls[mode], copies[mode],
                                                          strict=True))}
                         for mode in colds if lives[mode]}}
    finally:
        if m is not None and m in _mounts._ACTIVE:
            m.stop()
        subprocess.run(["sync"], check=False)
        env.remove(base)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1G,10G", help="data sizes (default 1G,10G)")
    p.add_argument("--repeats", type=int, default=5, help="test starts per size (default 5)")
    p.add_argument("--live-repeats", type=int, default=5,
                   help="failover-live + rollback, against cp -a, per size (default 5)")
    p.add_argument("--cold", default="all,data",
                   help="how caches are made cold before each failover-live and cp -a: "
                        "all (drop_caches: the data, and the programs and Python modules "
                        "too), data (only the store's and the backing directory's files "
                        "evicted, as on a recovery host whose journal server runs the same "
                        "interpreter), or both (default all,data)")
    add_env_args(p, stop_timeout=300.0)
    args = p.parse_args()
    colds = args.cold.split(",")
    if not colds or any(c not in ("all", "data") for c in colds):
        p.error("--cold takes all, data or all,data")
    if not _mounts.start_run(args.workdir, log):
        return 1
    env = Env(args)
    rows = []
    try:
        for text in args.sizes.split(","):
            log(f"[{text}] preparing")
            meter = StealMeter()
            rows.append(measure(env, parse_size(text), args.repeats, args.live_repeats,
                                colds))
            rows[-1]["steal"] = meter.fraction()  # the host's, during this size's runs
    finally:
        env.cleanup()
    if args.json:
        print(json.dumps({"target_s": TARGET_S, "rows": rows}, indent=1))
        return 0
    print(f"failover-test start (command to writable copy), median of {args.repeats}; "
          f"nproc={os.cpu_count()}")
    print(f"{'data':>8}  {'start s':>8}  {'max s':>6}  {'stop s':>7}  target  result")
    for r in rows:
        ok = "PASS" if r["start_max_s"] < TARGET_S else "MISS"
        print(f"{r['size'] >> 20:>5} MiB  {r['start_s']:>8.2f}  {r['start_max_s']:>6.2f}  "
              f"{r['stop_s']:>7.2f}  < {TARGET_S:g} s  {ok}")
    for mode in colds:
        what = ("every cache dropped" if mode == "all" else
                "the store's and the backing directory's files evicted")
        print(f"\nfailover-live (command to usable volumes; cold: {what}) vs cp -a of the "
              f"backing directory (+ sync), median of {args.live_repeats}; then the first MiB "
              "read from the live volume, a first 4 KiB write + fdatasync in the middle of "
              "the data file (it waits for the promotion of the chunk it touches) and the "
              "end of the promotion (all from the "
              "command's start), and --full-copy (everything copied before the command "
              "returns)")
        print(f"{'data':>8}  {'live s':>7}  {'cp -a s':>8}  {'ratio':>6}  target   result  "
              f"{'1st MiB s':>9}  {'1st write s':>11}  {'promoted s':>10}  {'full copy s':>11}  "
              f"{'ratio':>6}")
        for r in rows:
            m = r["live"].get(mode)
            if m is None:
                continue
            ok = "PASS" if m["ratio"] <= 1.0 else "MISS"
            print(f"{r['size'] >> 20:>5} MiB  {m['live_s']:>7.2f}  {m['cp_s']:>8.2f}  "
                  f"{m['ratio']:>5.2f}x  <= 1.0x  {ok:<6}  {m['read_s']:>9.2f}  "
                  f"{m['write_s']:>11.2f}  {m['promoted_s']:>10.2f}  {m['full_s']:>11.2f}  "
                  f"{m['full_ratio']:>5.2f}x")
    print("\nmove: writes held from the command until the volumes are up at the recovery "
          "site (MoveBeforeCommit), then rolled back; busy = a 4 KiB write+fdatasync loop runs")
    print(f"{'data':>8}  {'idle s':>7}  {'busy s':>7}  {'longest write s':>15}")
    for r in rows:
        print(f"{r['size'] >> 20:>5} MiB  {r['move_idle_s']:>7.2f}  {r['move_busy_s']:>7.2f}  "
              f"{r['move_busy_max_write_s']:>15.2f}")
    print("\nrestore in place of the tagged checkpoint (copy from the journal, record, swap), "
          "then rollback-restore")
    print(f"{'data':>8}  {'restore s':>9}  {'rollback s':>10}")
    for r in rows:
        print(f"{r['size'] >> 20:>5} MiB  {r['restore_s']:>9.2f}  "
              f"{r['restore_rollback_s']:>10.2f}")
    print()
    print(describe([r.get("steal") for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
