#!/usr/bin/env python3
"""The write pause added by the cross-volume checkpoint barrier (issue 4).

A VPG of two volumes, each a protected mount in its own process, replicating to one journal
server on loopback. On each volume a thread writes 4 KiB and fdatasyncs it, in a loop, and
times every pair (a plain buffered write stays in the kernel's cache and never meets the
barrier; the fsync makes the write reach the mount). Two configs, interleaved over the runs:

  none         checkpoint interval 1 h: no checkpoint during the measurement
  barrier-1s   checkpoint interval 1 s: a barrier (freeze both volumes, thaw) every second

The table gives the median over runs of each run's p50, p99, p99.9 and max latency, and the
ratio to ``none`` of the same run; plus how many checkpoints were taken and the longest
time a mount held its answers (from the mounts' logs). Nothing is asserted.

    .venv/bin/python bench/bench_barrier.py [--runs 3] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _mounts  # noqa: E402
from _mounts import FuseMount  # noqa: E402
from bench_replication import Env, add_env_args, journal_server, log  # noqa: E402

VPG = "b"
CONFIGS = {"none": "1h", "barrier-1s": "1s"}
BLOCK = 4096


def _writer(path: str, seconds: float, out: list[float]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    buf = os.urandom(BLOCK)
    try:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            os.pwrite(fd, buf, (i % 1024) * BLOCK)
            os.fdatasync(fd)
            out.append(time.perf_counter() - t0)
            i += 1
    finally:
        os.close(fd)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(env: Env, config: str, seconds: float) -> dict:
    base = env.fresh(config)
    mounts: list[FuseMount] = []
    try:
        with journal_server(env, os.path.join(base, "store")) as srv:
            env.cli("vpg", "create", VPG, "--checkpoint-interval", CONFIGS[config],
                    "--history", "1h", "--server", srv.address)
            for v in range(2):
                d = os.path.join(base, f"vol{v}")
                backing, mnt = os.path.join(d, "backing"), os.path.join(d, "mnt")
                os.makedirs(backing)
                os.makedirs(mnt)
                argv = env.zargv("protect", "--source", backing, "--spool",
                                 os.path.join(d, "spool"), mnt, "--foreground", "--vpg", VPG,
                                 "--volume", f"vol{v}", "--server", srv.address)
                m = FuseMount(f"vol{v}", argv, mnt, os.path.join(d, "mount.log"),
                              env.args.mount_timeout, env.args.stop_timeout, env=env.zenv(),
                              cwd=env.root)
                mounts.append(m)
                m.start()
            time.sleep(2)  # both connected, initial syncs (empty) done
            before = len(json.loads(env.cli("checkpoints", "--vpg", VPG, "--json",
                                            "--server", srv.address)))
            lat: list[list[float]] = [[], []]
            threads = [threading.Thread(target=_writer, args=(
                os.path.join(m.mountpoint, "f"), seconds, lat[i])) for i, m in enumerate(mounts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = len(json.loads(env.cli("checkpoints", "--vpg", VPG, "--json",
                                           "--server", srv.address)))
            for m in mounts:
                m.stop()
            held = []
            for m in mounts:
                with open(m.log_path) as f:
                    found = re.search(r"answers held ([\d.]+) ms at most", f.read())
                held.append(float(found.group(1)) if found else 0.0)
        xs = lat[0] + lat[1]
        return {"p50": _pct(xs, 0.5) * 1e3, "p99": _pct(xs, 0.99) * 1e3,
                "p999": _pct(xs, 0.999) * 1e3, "max": max(xs) * 1e3, "ops": len(xs),
                "checkpoints": after - before, "held_max_ms": max(held)}
    finally:
        for m in mounts:
            if m in _mounts._ACTIVE:
                m.stop()
        env.remove(base)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="writing time per measurement")
    add_env_args(p, stop_timeout=60.0)
    args = p.parse_args()
    if not _mounts.start_run(args.workdir, log):
        return 1
    env = Env(args)
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    try:
        for run in range(args.runs):
            order = list(CONFIGS) if run % 2 == 0 else list(reversed(CONFIGS))
            for config in order:
                r = measure(env, config, args.seconds)
                log(f"[run {run + 1}/{args.runs}] {config:11} p50 {r['p50']:.3f} ms  "
                    f"p99 {r['p99']:.3f} ms  max {r['max']:.1f} ms  {r['ops']} ops  "
                    f"{r['checkpoints']} checkpoints  held <= {r['held_max_ms']:.1f} ms")
                results[config].append(r)
    finally:
        env.cleanup()
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for c, rs in results.items()}
    ratio = {c: {k: statistics.median(r[k] / b[k] for r, b in zip(rs, results["none"],
                                                                    strict=True) if b[k])
                 for k in ("p50", "p99", "p999", "max")} for c, rs in results.items()}
    if args.json:
        print(json.dumps({"runs": args.runs, "seconds": args.seconds, "median": med,
                          "ratio_to_none": ratio}, indent=1))
        return 0
    print(f"4 KiB write+fdatasync latency on 2 volumes of one VPG; medians of {args.runs} runs "
          f"of {args.seconds:g} s; nproc={os.cpu_count()}")
    head = ("config", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "p50 x", "p99 x", "ops",
            "checkpoints", "held max ms")
    rows = [(c, f"{m['p50']:.3f}", f"{m['p99']:.3f}", f"{m['p999']:.3f}", f"{m['max']:.1f}",
             f"{ratio[c]['p50']:.2f}x", f"{ratio[c]['p99']:.2f}x", f"{m['ops']:.0f}",
             f"{m['checkpoints']:.0f}", f"{m['held_max_ms']:.1f}") for c, m in med.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for line in (head, *rows):
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
