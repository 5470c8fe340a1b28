#!/usr/bin/env python3
"""Replication benchmarks (issue #3): the journal server, replicated mounts, snapshot reads,
checkpoint listing and store overhead.

Benchmarks (``--benchmarks``, comma separated; default all five):

  rpo          replication lag under load.  A journal server (``zfsrep serve``), a VPG with
               ``--checkpoint-interval 1s --history 1m`` and a mount protected with ``--vpg``.
               First the mount's maximum sequential write rate (fio 1 MiB writes, fsync every
               16 MiB, ~10 s); then, each on a fresh server/store/spool, fio paced at 50% and
               at 100% of that rate for ~20 s while ``status`` is sampled every 0.5 s.  The
               figures are the median and max of ``rpo_s`` and of the volume's ``lag_bytes``
               over the steady part (the first 3 s are skipped).  Target: median RPO <= 2
               checkpoint intervals at 50% load; 100% load is reported only.
  throughput   fio sequential 1 MiB writes (1 GiB, end_fsync) through ``zfsrep protect
               --spool`` (no replication: the baseline) and through ``zfsrep protect --vpg``
               with the server running.  Target: replicated >= 0.9x spool-only.
  snapshot     1 GiB of random data written through a replicated mount, ``zfsrep tag``, then
               ``zfsrep snapshot mount`` (waits for the index); caches dropped
               (``/proc/sys/vm/drop_caches``) and the file read sequentially in 1 MiB reads.
               Baseline: the same file read through libfuse's passthrough_ll
               (``-o writeback -o source=BACKING``) over the backing directory, caches dropped
               too.  Target: snapshot >= 0.5x passthrough_ll.
  checkpoints  a VPG whose checkpoint log is filled with 10,000 checkpoints (server stopped,
               ``zfsrep.checkpoints.CheckpointLog.append`` with fsync skipped, one sync at
               the end), server restarted, then the wall time of the CLI ``zfsrep checkpoints
               --vpg V --json`` (median of 5 calls) against the same for a VPG of 10.
  store        256 MiB of random data (os.urandom) and of text-like data (log lines and
               English-like sentences, ~3x with zstd) written through a replicated mount,
               tagged, and once the index has reached the journal (``indexed_seq ==
               durable_seq``) and the journal is trimmed: disk usage of STORE/vpgs/<vpg>
               (st_blocks, like du) per byte written.  Targets: <= 1.05 random, <= 0.5 text.

Every measurement gets fresh directories (store, spool, backing) under a work dir in
/var/tmp (``--workdir``), removed at the end.  Runs are interleaved (for run: for
benchmark; the configs of a benchmark alternate their order every run) and every ratio is
taken against the baseline measured in the same run; the table shows medians.  Nothing is
asserted: targets print PASS/MISS.  Mounts and daemons are always torn down (fusermount3 -u,
then -z; SIGTERM, then SIGKILL), also on Ctrl-C/SIGTERM and via atexit.

Progress goes to stderr; the table (or, with --json, one JSON document) to stdout.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, REPO)
import _mounts  # noqa: E402
from _mounts import FuseMount, MountError  # noqa: E402
from hoststeal import StealMeter, describe  # noqa: E402

MiB = 1 << 20
VPG = "b"
VOLUME = "v"
INTERVAL_S = 1.0
FSYNC_EVERY = 16  # fio fsync=N: one fsync per 16 MiB in the rate benchmarks
SAMPLE_S = 0.5
WARMUP_S = 3.0

SIZES = {
    "full": dict(
        max_s=10, paced_s=20, seq=1024 * MiB, snap=1024 * MiB, store=256 * MiB,
        checkpoints=10_000, list_reps=5, rate_file=1024 * MiB,
    ),
    "quick": dict(
        max_s=4, paced_s=8, seq=128 * MiB, snap=128 * MiB, store=32 * MiB,
        checkpoints=2_000, list_reps=3, rate_file=256 * MiB,
    ),
}
ALL_BENCHMARKS = ["rpo", "throughput", "snapshot", "checkpoints", "store"]


def add_env_args(p: argparse.ArgumentParser, *, stop_timeout: float) -> None:
    """The options every script built on :class:`Env` takes."""
    p.add_argument("--workdir", default="/var/tmp", help="parent of the work dir (a disk)")
    p.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    p.add_argument("--mount-timeout", type=float, default=20.0)
    p.add_argument("--stop-timeout", type=float, default=stop_timeout)
    p.add_argument("--json", action="store_true", help="print one JSON document instead")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ============================================================================ processes


_DAEMONS: list[Daemon] = []


class Daemon:
    """A non-FUSE background process (the journal server): own session, dies with us
    (PR_SET_PDEATHSIG), registered so that it is stopped whatever happens."""

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict, cwd: str) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.problems: list[str] = []

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as logf, _mounts.deferred_signals():
            logf.write(f"\n=== {time.strftime('%F %T')} {' '.join(self.argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_mounts._child_setup,  # noqa: PLW1509
                env=self.env,
                cwd=self.cwd,
            )
            _DAEMONS.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self not in _DAEMONS:
            return self.returncode
        with _mounts.deferred_signals():
            proc = self.proc
            if proc is not None:
                if proc.poll() is None:
                    proc.terminate()
                try:
                    self.returncode = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.problems.append(f"no exit {timeout:g}s after SIGTERM: SIGKILL")
                    proc.kill()
                    self.returncode = proc.wait()
            _DAEMONS.remove(self)
        return self.returncode


def stop_everything() -> None:
    # Mounts first (a replicated mount drains to its server when unmounted), then servers.
    _mounts.stop_all()
    for d in reversed(list(_DAEMONS)):
        with contextlib.suppress(Exception):
            d.stop()


atexit.register(stop_everything)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def du_bytes(path: str) -> int:
    """Disk usage like du: st_blocks * 512 of every file (and directory) under path."""
    if not os.path.isdir(path):
        try:
            return os.lstat(path).st_blocks * 512
        except OSError:
            return 0
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"   note: cannot drop caches: {e}")
        return False


# ============================================================================ environment


class Env:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = tempfile.mkdtemp(prefix="zfsrep-repbench-", dir=args.workdir)
        self.seq = 0
        self.ptll: str | None = None
        self.skipped: dict[str, str] = {}

    def zenv(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("ZFSREP_SERVER", None)
        return env

    def zargv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "zfsrep.cli", *args]

    def cli(self, *args: str, timeout: float = 120.0) -> str:
        r = subprocess.run(
            self.zargv(*args), capture_output=True, text=True, env=self.zenv(), cwd=self.root,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise BenchError(f"zfsrep {' '.join(args)}: exit {r.returncode}: "
                             f"{r.stderr.strip()[-500:]}")
        return r.stdout

    def fresh(self, label: str) -> str:
        self.seq += 1
        d = os.path.join(self.root, f"{self.seq:03d}-{label}")
        os.makedirs(d)
        return d

    def remove(self, d: str) -> None:
        left = _mounts.mounts_under(d)
        if left:
            log(f"!! still mounted, not removing {d}: {left}")
            return
        if not self.args.keep:
            shutil.rmtree(d, ignore_errors=True)

    def cleanup(self) -> None:
        stop_everything()
        left = _mounts.mounts_under(self.root)
        if left:
            log(f"!! still mounted, NOT removing {self.root}: {left}")
        elif self.args.keep:
            log(f"work directory kept: {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Server:
    daemon: Daemon
    address: str  # HOST:PORT
    store: str

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.address.rsplit(":", 1)
        return host, int(port)

    def call(self, op: str, req: dict | None = None, timeout: float = 10.0):
        from zfsrep import protocol

        return protocol.call(self.addr, op, req, timeout=timeout)

    def status(self, vpg: str = VPG) -> dict:
        return self.call("status", {"vpg": vpg})[0]

    def volume(self, vpg: str = VPG) -> dict:
        vols = self.status(vpg)["volumes"]
        if not vols:
            raise BenchError(f"VPG {vpg} has no volume")
        return vols[0]


@contextlib.contextmanager
def journal_server(env: Env, store: str) -> Iterator[Server]:
    """``zfsrep serve --foreground`` on a free port; waits until it answers ``ping``."""
    last: Exception | None = None
    for _attempt in range(3):  # a free port may be taken between probe and bind
        address = f"127.0.0.1:{free_port()}"
        d = Daemon(
            "serve",
            env.zargv("serve", "--store", store, "--listen", address, "--foreground",
                      "--cpu-priority",
                      getattr(env.args, "server_cpu_priority", "background")),
            os.path.join(os.path.dirname(store), "serve.log"),
            env.zenv(),
            env.root,
        ).start()
        srv = Server(d, address, store)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not d.alive():
                last = BenchError(f"journal server exited with {d.proc.returncode}; "
                                  f"log {d.log_path}")
                break
            try:
                srv.call("ping", timeout=2)
                break
            except Exception as e:  # not listening yet
                last = e
                time.sleep(0.1)
        else:
            d.stop()
            raise BenchError(f"journal server did not answer within 60 s: {last}")
        if not d.alive():
            d.stop()
            continue
        try:
            yield srv
        finally:
            rc = d.stop()
            if d.problems or rc not in (0, None):
                log(f"   note: journal server stop: exit status {rc}; "
                    f"{', '.join(d.problems) or 'ok'}")
        return
    raise BenchError(f"journal server did not start: {last}")


def protect_mount(env: Env, base: str, name: str, server: Server | None) -> FuseMount:
    backing, mnt, spool = (os.path.join(base, n) for n in ("backing", "mnt", "spool"))
    for d in (backing, mnt):
        os.makedirs(d, exist_ok=True)
    argv = env.zargv("protect", "--source", backing, "--spool", spool, mnt, "--foreground")
    if server is not None:
        argv += ["--vpg", VPG, "--volume", VOLUME, "--server", server.address]
    return FuseMount(
        name, argv, mnt, os.path.join(base, f"{name}.log"), env.args.mount_timeout,
        env.args.stop_timeout, env=env.zenv(), cwd=env.root,
    )


def stop_mount(m: FuseMount) -> None:
    if m not in _mounts._ACTIVE:
        return
    rc = m.stop()
    if m.problems or (rc not in (0, None) and m.mount_seconds is not None):
        log(f"   note: {m.name} stop: exit status {rc}; {', '.join(m.problems) or 'ok'}")


@contextlib.contextmanager
def replicated(env: Env, label: str, *, vpg_args: tuple[str, ...] = (),
               store_parent: str | None = None) -> Iterator[tuple[str, Server, FuseMount]]:
    """A fresh store + server + VPG + replicated mount; yields (base dir, server, mount).
    ``store_parent`` puts the store on another filesystem (a recovery site's own disk)."""
    base = env.fresh(label)
    store_base = tempfile.mkdtemp(prefix="zfsrep-store-", dir=store_parent) if store_parent \
        else base
    try:
        with journal_server(env, os.path.join(store_base, "store")) as srv:
            env.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--history", "1m",
                    *vpg_args, "--server", srv.address)
            m = protect_mount(env, base, "replicated", srv)
            try:
                m.start()
                yield base, srv, m
            finally:
                stop_mount(m)
    finally:
        env.remove(base)
        if store_base != base:
            shutil.rmtree(store_base, ignore_errors=True)


@contextlib.contextmanager
def spool_only(env: Env, label: str) -> Iterator[tuple[str, FuseMount]]:
    base = env.fresh(label)
    m = protect_mount(env, base, "spool-only", None)
    try:
        m.start()
        yield base, m
    finally:
        stop_mount(m)
        env.remove(base)


def wait_indexed(srv: Server, min_seq: int, timeout: float) -> float:
    """Wait until the volume's index holds everything durable (and at least min_seq)."""
    t0 = time.monotonic()
    while True:
        v = srv.volume()
        if v["error"]:
            raise BenchError(f"volume error: {v['error']}")
        if v["indexed_seq"] >= max(v["durable_seq"], min_seq):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"index not caught up after {timeout:.0f}s: {v['indexed_seq']} of "
                             f"{v['durable_seq']}")
        time.sleep(0.2)


def wait_trimmed(journal_dir: str, timeout: float = 30.0) -> int:
    """Wait until the journal holds only its open segment (or stops shrinking); its bytes."""
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while True:
        files = os.listdir(journal_dir) if os.path.isdir(journal_dir) else []
        size = du_bytes(journal_dir)
        if len(files) <= 1:
            return size
        if size != last:
            last, stable_since = size, time.monotonic()
        if time.monotonic() - stable_since > 5 or time.monotonic() > deadline:
            return size
        time.sleep(0.2)


# ============================================================================ fio


def run_fio(name: str, filename: str, timeout: float, **opts: object) -> dict:
    argv = ["fio", f"--name={name}", f"--filename={filename}", "--ioengine=psync",
            "--output-format=json", *(f"--{k}={v}" for k, v in opts.items())]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # fio must not keep a file open in the mount
        proc.kill()
        proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0 or "{" not in text:
        raise BenchError(f"fio {name} failed ({proc.returncode}): {err.decode()[-500:]}")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {name}: error {job['error']}: {err.decode()[-500:]}")
    return job


def fio_mibps(job: dict) -> float:
    return job["write"]["bw_bytes"] / MiB


# ============================================================================ results


@dataclass
class Metric:
    """One row of the table."""

    key: str
    title: str
    unit: str
    baseline: str  # text naming the baseline
    target: str = "-"  # text
    check: Callable[[float, float | None, float | None], bool] | None = None
    judged: bool = True  # False: shown as (pass)/(miss) or info only
    fmt: str = "{:,.1f}"
    values: list[float | None] = field(default_factory=list)
    bases: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Results:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.metrics: dict[str, Metric] = {}
        self.order: list[str] = []

    def define(self, m: Metric) -> Metric:
        if m.key not in self.metrics:
            m.values, m.bases, m.notes = [None] * self.runs, [None] * self.runs, [""] * self.runs
            self.metrics[m.key] = m
            self.order.append(m.key)
        return self.metrics[m.key]

    def put(self, key: str, run: int, value: float | None, base: float | None = None,
            note: str = "") -> None:
        m = self.metrics[key]
        m.values[run], m.bases[run], m.notes[run] = value, base, note
        v = "-" if value is None else m.fmt.format(value)
        b = "" if base is None else f" (baseline {m.fmt.format(base)})"
        log(f"      {m.title}: {v} {m.unit}{b} {note}")


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ============================================================================ benchmarks


def paced_run(env: Env, sz: dict, rate_mibps: float | None, seconds: float,
              label: str) -> dict:
    """Fresh replicated mount; fio sequential 1 MiB writes (fsync every FSYNC_EVERY) for
    ``seconds``, paced at ``rate_mibps`` (None: as fast as it goes), status sampled."""
    samples: list[dict] = []
    with replicated(env, label) as (base, srv, m):
        stop = threading.Event()
        t_start = [0.0]

        def sampler() -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    st = srv.status()
                    vol = st["volumes"][0] if st["volumes"] else {}
                    samples.append({"t": t - t_start[0], "rpo_s": st["rpo_s"],
                                    "lag_bytes": vol.get("lag_bytes"),
                                    "spool_bytes": vol.get("spool_bytes"),
                                    "durable_seq": vol.get("durable_seq"),
                                    "indexed_seq": vol.get("indexed_seq"),
                                    "problem": st.get("last_checkpoint_problem")})
                except Exception as e:  # noqa: BLE001 - a failed sample is recorded, not fatal
                    samples.append({"t": t - t_start[0], "error": str(e)})
                stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - t)))

        opts: dict = dict(rw="write", bs="1M", size=sz["rate_file"], time_based=1,
                          runtime=int(seconds), fsync=FSYNC_EVERY, end_fsync=1)
        if rate_mibps is not None:
            opts["rate"] = int(rate_mibps * MiB)
        # let the first automatic checkpoints happen (the mount's initial sync is empty)
        time.sleep(2.0)
        th = threading.Thread(target=sampler, daemon=True)
        t_start[0] = time.monotonic()
        th.start()
        try:
            job = run_fio(label, os.path.join(m.mountpoint, "data"), seconds + 300, **opts)
            elapsed = time.monotonic() - t_start[0]
        finally:
            stop.set()
            th.join()
    return {"mibps": fio_mibps(job), "elapsed": elapsed, "samples": samples,
            "runtime_s": job["write"]["runtime"] / 1000}


def steady(samples: list[dict], key: str, end: float) -> list[float]:
    return [s[key] for s in samples
            if WARMUP_S <= s["t"] <= end and s.get(key) is not None]


def bench_rpo(env: Env, res: Results, run: int, sz: dict) -> None:
    ms = [
        Metric("rpo.max", "max seq write 1M (replicated)", "MiB/s", "-", fmt="{:,.0f}"),
        Metric("rpo.50.rate", "50% load: achieved write rate", "MiB/s", "50% of max",
               fmt="{:,.0f}", judged=False),
        Metric("rpo.50.med", "50% load: RPO median", "s", "interval 1 s", "<= 2 intervals",
               lambda v, b, r: v <= 2 * INTERVAL_S, fmt="{:.2f}"),
        Metric("rpo.50.max", "50% load: RPO max", "s", "interval 1 s", "<= 2 intervals",
               lambda v, b, r: v <= 2 * INTERVAL_S, judged=False, fmt="{:.2f}"),
        Metric("rpo.50.lag", "50% load: lag_bytes median", "MiB", "-", fmt="{:.1f}"),
        Metric("rpo.50.lagmax", "50% load: lag_bytes max", "MiB", "-", fmt="{:.1f}"),
        Metric("rpo.100.rate", "100% load: achieved write rate", "MiB/s", "100% of max",
               fmt="{:,.0f}", judged=False),
        Metric("rpo.100.med", "100% load: RPO median", "s", "interval 1 s", "(report)",
               fmt="{:.2f}"),
        Metric("rpo.100.max", "100% load: RPO max", "s", "interval 1 s", "(report)",
               fmt="{:.2f}"),
        Metric("rpo.100.lag", "100% load: lag_bytes median", "MiB", "-", fmt="{:.1f}"),
        Metric("rpo.100.lagmax", "100% load: lag_bytes max", "MiB", "-", fmt="{:.1f}"),
    ]
    for m in ms:
        res.define(m)
    log(f"   rpo: max rate ({sz['max_s']} s)")
    mx = paced_run(env, sz, None, sz["max_s"], "rpo-max")
    res.put("rpo.max", run, mx["mibps"], note=f"fio {mx['runtime_s']:.1f} s, fsync every "
            f"{FSYNC_EVERY} MiB")
    for pct in (50, 100):
        rate = mx["mibps"] * pct / 100
        log(f"   rpo: {pct}% load = {rate:.0f} MiB/s for {sz['paced_s']} s")
        r = paced_run(env, sz, rate, sz["paced_s"], f"rpo-{pct}")
        end = r["runtime_s"]
        rpos = steady(r["samples"], "rpo_s", end)
        lags = [x / MiB for x in steady(r["samples"], "lag_bytes", end)]
        spools = [x / MiB for x in steady(r["samples"], "spool_bytes", end)]
        errs = sum(1 for s in r["samples"] if "error" in s)
        problems = {s["problem"] for s in r["samples"] if s.get("problem")}
        note = f"{len(rpos)} samples"
        if errs:
            note += f", {errs} failed"
        if problems:
            note += f"; checkpoint problem: {sorted(problems)[0][:80]}"
        res.put(f"rpo.{pct}.rate", run, r["mibps"], rate, f"target rate {rate:.0f} MiB/s")
        res.put(f"rpo.{pct}.med", run, med(rpos), INTERVAL_S, note)
        res.put(f"rpo.{pct}.max", run, max(rpos) if rpos else None, INTERVAL_S)
        res.put(f"rpo.{pct}.lag", run, med(lags), None,
                f"spool median {med(spools) or 0:.0f} MiB" if spools else "")
        res.put(f"rpo.{pct}.lagmax", run, max(lags) if lags else None, None,
                f"spool max {max(spools):.0f} MiB" if spools else "")


def bench_throughput(env: Env, res: Results, run: int, sz: dict) -> None:
    res.define(Metric("tp.spool", "seq write 1M: spool only", "MiB/s", "spool-only",
                      judged=False, fmt="{:,.0f}"))
    res.define(Metric("tp.repl", "seq write 1M: replicated", "MiB/s", "spool-only", ">= 0.9x",
                      lambda v, b, r: r is not None and r >= 0.9, fmt="{:,.0f}"))
    res.define(Metric("tp.repl.shm", "  replicated, store in memory (tmpfs)", "MiB/s",
                      "spool-only", judged=False, fmt="{:,.0f}"))
    vals: dict[str, float] = {}
    notes: dict[str, str] = {}
    order = ["spool", "repl", "repl.shm"]
    order = order[run % 3:] + order[:run % 3]
    for cfg in order:
        os.sync()
        log(f"   throughput: {cfg}")
        if cfg == "spool":
            with spool_only(env, "tp-spool") as (_base, m):
                job = run_fio("seq1m", os.path.join(m.mountpoint, "seq1m"), 900, rw="write",
                              bs="1M", size=sz["seq"], end_fsync=1)
            vals[cfg] = fio_mibps(job)
        else:
            # repl.shm: the store on tmpfs, so the one disk here is not shared by three write
            # streams (CPU still is). Reported, not judged: it no longer stands for a store
            # on a disk of its own, as tmpfs takes no O_DIRECT and the journal is then
            # written through the page cache (docs/journal-format.md)
            where = "/dev/shm" if cfg == "repl.shm" else None
            with replicated(env, "tp-repl", store_parent=where) as (_base, srv, m):
                job = run_fio("seq1m", os.path.join(m.mountpoint, "seq1m"), 900, rw="write",
                              bs="1M", size=sz["seq"], end_fsync=1)
                vals[cfg] = fio_mibps(job)
                v = srv.volume()
                notes[cfg] = (f"at the end: lag {v['lag_bytes'] and v['lag_bytes'] / MiB or 0:.0f} "
                              f"MiB unacked (status up to 1 s old)")
    res.put("tp.spool", run, vals["spool"], vals["spool"])
    res.put("tp.repl", run, vals["repl"], vals["spool"], notes.get("repl", ""))
    res.put("tp.repl.shm", run, vals["repl.shm"], vals["spool"], notes.get("repl.shm", ""))


def write_random_file(path: str, size: int, chunk: int = MiB) -> float:
    """Write ``size`` bytes of os.urandom (fresh for every chunk) and fsync; seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = min(chunk, left)
            os.write(fd, os.urandom(n))
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def timed_read(path: str) -> tuple[float, int]:
    buf = bytearray(MiB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            total += n
    return time.perf_counter() - t0, total


def bench_snapshot(env: Env, res: Results, run: int, sz: dict) -> None:
    res.define(Metric("snap.ptll", "seq read 1M: passthrough_ll", "MiB/s", "passthrough_ll",
                      judged=False, fmt="{:,.0f}"))
    res.define(Metric("snap.read", "seq read 1M: snapshot mount", "MiB/s", "passthrough_ll",
                      ">= 0.5x", lambda v, b, r: r is not None and r >= 0.5, fmt="{:,.0f}"))
    res.define(Metric("snap.index", "snapshot: tag to mounted", "s", "-", judged=False,
                      fmt="{:.1f}"))
    if env.ptll is None:
        env.ptll = _mounts.build_passthrough_ll(os.path.join(env.root, "build"))
    size = sz["snap"]
    with replicated(env, "snapshot") as (base, srv, m):
        log(f"   snapshot: writing {size / MiB:.0f} MiB of random data")
        wsec = write_random_file(os.path.join(m.mountpoint, "big"), size)
        t_tag = time.monotonic()
        env.cli("tag", VPG, "big", "--server", srv.address, timeout=300)
        stop_mount(m)  # the application is done; its spool drains to the server
        backing = os.path.join(base, "backing")
        mounts: dict[str, FuseMount] = {}
        vals: dict[str, float] = {}
        notes: dict[str, str] = {}
        try:
            # the snapshot mount first: it returns once the index has reached the checkpoint
            for cfg in ("snap", "ptll"):
                mnt = os.path.join(base, f"mnt-{cfg}")
                os.makedirs(mnt, exist_ok=True)
                if cfg == "snap":
                    argv = env.zargv("snapshot", "mount", VPG, "big", mnt, "--server",
                                     srv.address, "--foreground")
                    fm = FuseMount("snapshot", argv, mnt, os.path.join(base, "snapshot.log"),
                                   ready_timeout=900, stop_timeout=30, env=env.zenv(),
                                   cwd=env.root)
                else:
                    argv = [env.ptll, "-o", "writeback", "-o", f"source={backing}", mnt, "-f"]
                    fm = FuseMount("passthrough_ll", argv, mnt, os.path.join(base, "ptll.log"),
                                   ready_timeout=env.args.mount_timeout, stop_timeout=20)
                mounts[cfg] = fm
                fm.start()
                if cfg == "snap":
                    res.put("snap.index", run, time.monotonic() - t_tag, None,
                            f"{size / MiB:.0f} MiB written in {wsec:.1f} s")
            order = ["snap", "ptll"] if run % 2 == 0 else ["ptll", "snap"]
            for cfg in order:
                dropped = drop_caches()
                sec, n = timed_read(os.path.join(mounts[cfg].mountpoint, "big"))
                if n != size:
                    raise BenchError(f"{cfg}: read {n} bytes, expected {size}")
                vals[cfg] = n / MiB / sec
                notes[cfg] = "caches dropped" if dropped else "caches NOT dropped"
                log(f"   snapshot: {cfg} read {n / MiB:.0f} MiB in {sec:.2f} s")
        finally:
            for fm in mounts.values():
                stop_mount(fm)
    res.put("snap.ptll", run, vals["ptll"], vals["ptll"], notes["ptll"])
    res.put("snap.read", run, vals["snap"], vals["ptll"], notes["snap"])


class _NoSyncFS:
    """JournalFS that skips fsync (filling a checkpoint log; one os.sync() afterwards)."""

    def __init__(self) -> None:
        from zfsrep.journal import OSJournalFS

        self._real = OSJournalFS()

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def fill_checkpoints(path: str, vpg: str, n: int) -> float:
    from zfsrep.checkpoints import Checkpoint, CheckpointLog

    t0 = time.perf_counter()
    now = time.time_ns()
    cplog = CheckpointLog(Path(path), vpg=vpg, fs=_NoSyncFS())
    try:
        for i in range(n):
            tag = f"t{i}" if i % 100 == 99 else None
            cp = Checkpoint.new("tagged" if tag else "auto", {VOLUME: 10 * (i + 1)}, tag=tag,
                                time_ns=now - (n - i) * 1_000_000_000)
            cplog.append(cp)
    finally:
        cplog.close()
    os.sync()
    return time.perf_counter() - t0


def bench_checkpoints(env: Env, res: Results, run: int, sz: dict) -> None:
    n = sz["checkpoints"]
    res.define(Metric("cp.small", "list 10 checkpoints (CLI)", "s", "10 checkpoints",
                      judged=False, fmt="{:.3f}"))
    res.define(Metric("cp.big", f"list {n:,} checkpoints (CLI)", "s", "10 checkpoints",
                      "(fast)", fmt="{:.3f}"))
    res.define(Metric("cp.req", f"list {n:,} checkpoints (request only)", "s",
                      "10 checkpoints", "-", fmt="{:.3f}"))
    base = env.fresh("checkpoints")
    store = os.path.join(base, "store")
    try:
        with journal_server(env, store) as srv:
            for name in ("big", "small"):
                env.cli("vpg", "create", name, "--history", "30d", "--checkpoint-interval",
                        "1m", "--server", srv.address)
        fill = fill_checkpoints(os.path.join(store, "vpgs", "big", "checkpoints.log"), "big", n)
        fill_checkpoints(os.path.join(store, "vpgs", "small", "checkpoints.log"), "small", 10)
        log(f"   checkpoints: {n} appended in {fill:.1f} s (no fsync per append)")
        with journal_server(env, store) as srv:
            t: dict[str, list[float]] = {"big": [], "small": []}
            treq: dict[str, list[float]] = {"big": [], "small": []}
            out_len: dict[str, int] = {}
            for rep in range(sz["list_reps"]):
                for name in (("big", "small") if rep % 2 == 0 else ("small", "big")):
                    t0 = time.perf_counter()
                    out = env.cli("checkpoints", "--vpg", name, "--json", "--server",
                                  srv.address)
                    t[name].append(time.perf_counter() - t0)
                    out_len[name] = len(out.encode())
                    got = len(json.loads(out))
                    want = n if name == "big" else 10
                    if got != want:
                        raise BenchError(f"checkpoints --vpg {name}: {got} listed, {want} expected")
                    t0 = time.perf_counter()
                    srv.call("checkpoints", {"vpg": name}, timeout=60)
                    treq[name].append(time.perf_counter() - t0)
    finally:
        env.remove(base)
    small, big = med(t["small"]), med(t["big"])
    res.put("cp.small", run, small, small, f"output {out_len['small']:,} B")
    res.put("cp.big", run, big, small,
            f"output {out_len['big'] / MiB:.2f} MiB; median of {sz['list_reps']} calls")
    res.put("cp.req", run, med(treq["big"]), med(treq["small"]),
            "protocol.call in the benchmark process (no interpreter start, no JSON print)")


# -- text-like data --------------------------------------------------------------------------

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their can has more if will "
    "would been when who what so no out up into than them its some could time these two may "
    "then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
)
_WORDS = tuple(_WORD_TEXT.split())
_LEVELS = ("INFO",) * 8 + ("DEBUG",) * 3 + ("WARN", "ERROR")
_STATUS = (200, 200, 200, 201, 304, 404, 500)
_SVCS = ("api", "worker", "scheduler", "auth", "billing", "search", "mailer")


class TextSource:
    """Log lines with varying numbers, ids and times, mixed with English-like sentences.

    A pool of distinct lines is generated once (slow in Python); every chunk is a fresh
    random choice from the pool, so the file never repeats at block or group scale. zstd
    level 1 on 64 KiB pieces compresses it about 3x."""

    def __init__(self, seed: int, pool_lines: int = 150_000) -> None:
        rng = random.Random(seed)
        t = 1795300000.0
        lines = []
        for _ in range(pool_lines):
            t += rng.random() * 0.05
            if rng.random() < 0.6:
                lines.append(
                    f"2026-11-22T{int(t) % 86400 // 3600:02d}:{int(t) % 3600 // 60:02d}:"
                    f"{t % 60:06.3f}Z {rng.choice(_LEVELS)} {rng.choice(_SVCS)}"
                    f"[{rng.randrange(1, 64)}] req={rng.getrandbits(32):08x} GET /v1/items/"
                    f"{rng.randrange(100000)} status={rng.choice(_STATUS)}"
                    f" bytes={rng.randrange(100, 90000)} ms={rng.random() * 250:.1f}\n")
            else:
                k = rng.randrange(6, 18)
                lines.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".\n")
        self.pool = [ln.encode() for ln in lines]
        self.avg = sum(map(len, self.pool)) / len(self.pool)
        self.rng = rng

    def chunk(self, n: int) -> bytes:
        k = int(n / self.avg) + 64
        data = b"".join(self.rng.choices(self.pool, k=k))
        while len(data) < n:
            data += b"".join(self.rng.choices(self.pool, k=64))
        return data[:n]


def zstd_ratio(data: bytes) -> float | None:
    try:
        import zstandard
    except ImportError:
        return None
    c = zstandard.ZstdCompressor(level=1)
    step = 64 * 1024
    out = sum(len(c.compress(data[i:i + step])) for i in range(0, len(data), step))
    return len(data) / out if out else None


def bench_store(env: Env, res: Results, run: int, sz: dict, text: TextSource) -> None:
    size = sz["store"]
    res.define(Metric("store.random", "store bytes / written: random", "ratio", "written",
                      "<= 1.05", lambda v, b, r: v <= 1.05, fmt="{:.3f}"))
    res.define(Metric("store.random.x", "  random, without open journal seg.", "ratio",
                      "written", "(info)", fmt="{:.3f}"))
    res.define(Metric("store.text", "store bytes / written: text", "ratio", "written",
                      "<= 0.5", lambda v, b, r: v <= 0.5, fmt="{:.3f}"))
    res.define(Metric("store.text.x", "  text, without open journal seg.", "ratio", "written",
                      "(info)", fmt="{:.3f}"))
    order = ["random", "text"] if run % 2 == 0 else ["text", "random"]
    for kind in order:
        with replicated(env, f"store-{kind}") as (base, srv, m):
            log(f"   store: writing {size / MiB:.0f} MiB of {kind} data")
            path = os.path.join(m.mountpoint, f"{kind}.dat")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            zr = []
            try:
                left = size
                while left > 0:
                    n = min(4 * MiB, left)
                    data = os.urandom(n) if kind == "random" else text.chunk(n)
                    if kind == "text" and len(zr) < 4:
                        zr.append(zstd_ratio(data))
                    os.write(fd, data)
                    left -= n
                os.fsync(fd)
            finally:
                os.close(fd)
            cp = json.loads(env.cli("tag", VPG, "done", "--json", "--server", srv.address,
                                    timeout=300))
            pos = int(cp["positions"][VOLUME])
            widx = wait_indexed(srv, pos, 900)
            vpgdir = os.path.join(base, "store", "vpgs", VPG)
            jdir = os.path.join(vpgdir, "volumes", VOLUME, "journal")
            jbytes = wait_trimmed(jdir)
            total = du_bytes(vpgdir)
            voldir = os.path.join(vpgdir, "volumes", VOLUME)
            packs = du_bytes(os.path.join(voldir, "packs"))
            index = sum(du_bytes(p) for p in Path(voldir).glob("index.sqlite*"))
            nseg = len(os.listdir(jdir))
            note = (f"packs {packs / MiB:.1f} MiB, index {index / 1024:,.0f} KiB, journal "
                    f"{jbytes / MiB:.1f} MiB in {nseg} seg.; indexed {widx:.1f} s after tag")
            if kind == "text" and zr and all(zr):
                note += f"; data zstd-1/64KiB {statistics.median(zr):.1f}x"
            res.put(f"store.{kind}", run, total / size, 1.0, note)
            res.put(f"store.{kind}.x", run, (total - jbytes) / size, 1.0)


# ============================================================================ report


def build_rows(res: Results) -> list[dict]:
    rows = []
    for key in res.order:
        m = res.metrics[key]
        value, base = med(m.values), med(m.bases)
        ratios = [v / b if v is not None and b else None
                  for v, b in zip(m.values, m.bases, strict=True)]
        ratio = med(ratios)
        good = [v for v in m.values if v is not None]
        spread = (max(good) - min(good)) / 2 / value if value and len(good) > 1 else None
        if m.check is None or value is None:
            verdict = "" if m.check is None else "n/a"
        else:
            ok = m.check(value, base, ratio)
            verdict = ("PASS" if ok else "MISS") if m.judged else f"({'pass' if ok else 'miss'})"
        near = [(abs(v - value), n)
                for v, n in zip(m.values, m.notes, strict=True) if v is not None]
        note = min(near)[1] if near else ""
        rows.append({
            "key": key, "title": m.title, "unit": m.unit, "value": value, "values": m.values,
            "runs_ok": len(good), "spread": spread, "baseline": m.baseline,
            "baseline_value": base, "baselines": m.bases, "ratio": ratio, "ratios": ratios,
            "target": m.target, "verdict": verdict, "note": note, "fmt": m.fmt,
        })
    return rows


def table(headers: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"machine: nproc={m['nproc']}, kernel {m['kernel']}, {m['fio']}, libfuse "
          f"{m['libfuse']}, python {m['python']}, git {m['git']}")
    print(f"workdir: {m['workdir']} ({m['workdir_fs']}); runs={report['runs']} (medians, "
          f"interleaved, ratio = median of per-run value/baseline); sizes={report['sizes_name']}"
          f"; elapsed {report['elapsed']:.0f}s; server --cpu-priority "
          f"{m.get('server_cpu_priority', 'background')}")
    for b, why in report["skipped"].items():
        print(f"failed/skipped {b}: {why.splitlines()[0]}")
    print()
    body = []
    for r in report["rows"]:
        f = r["fmt"]
        val = "-" if r["value"] is None else f.format(r["value"])
        base = r["baseline"]
        if r["baseline_value"] is not None:
            base += f" ({f.format(r['baseline_value'])})"
        body.append([
            r["title"], val, r["unit"],
            f"±{100 * r['spread']:.0f}%" if r["spread"] is not None else "",
            f"{r['runs_ok']}/{report['runs']}", base,
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
            r["target"], r["verdict"], r["note"],
        ])
    print(table(["figure", "median", "unit", "spread", "runs", "baseline (median)", "ratio",
                 "target", "result", "note"], body, right={1, 3, 4, 6}))
    print()
    print(describe(report.get("steal", [])))


def cmd_out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info(args: argparse.Namespace) -> dict:
    dirty = cmd_out(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "fio": cmd_out(["fio", "--version"]),
        "libfuse": cmd_out(["pkg-config", "--modversion", "fuse3"]),
        "python": platform.python_version(),
        "git": cmd_out(["git", "rev-parse", "--short", "HEAD"]) + ("+dirty" if dirty else ""),
        "workdir": os.path.realpath(args.workdir),
        "workdir_fs": _mounts.fs_type(args.workdir),
        "server_cpu_priority": args.server_cpu_priority,
    }


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    p.add_argument("--benchmarks", default=",".join(ALL_BENCHMARKS),
                   help=f"comma list (default all): {','.join(ALL_BENCHMARKS)}")
    p.add_argument("--workdir", default="/var/tmp",
                   help="parent of the temporary work dir; a real disk (default /var/tmp)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument("--mount-timeout", type=float, default=30.0,
                   help="seconds to wait for a protected mount to appear (default 30)")
    p.add_argument("--stop-timeout", type=float, default=120.0,
                   help="seconds a protected mount may take to flush and exit (default 120)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, stores)")
    p.add_argument("--server-cpu-priority", choices=("background", "normal"),
                   default="background",
                   help="the journal server's --cpu-priority (default background, as serve's)")
    args = p.parse_args(argv)
    args.bench_list = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    bad = [b for b in args.bench_list if b not in ALL_BENCHMARKS]
    if bad or args.runs < 1:
        p.error(f"unknown benchmark {bad}" if bad else "--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not _mounts.start_run(args.workdir, log):
        return 2
    if os.geteuid() != 0:
        log("!! not root: FUSE mounts and drop_caches may fail")
    sz = SIZES["quick" if args.quick else "full"]
    res = Results(args.runs)
    env = Env(args)
    text = None
    interrupted = False
    t_start = time.monotonic()
    steal: list[float | None] = []
    try:
        log(f"work dir {env.root} ({_mounts.fs_type(args.workdir)}); benchmarks "
            f"{args.bench_list}; runs {args.runs}; "
            f"sizes {'quick' if args.quick else 'full'}")
        for run in range(args.runs):
            for b in args.bench_list:
                if b in env.skipped:
                    continue
                log(f"[run {run + 1}/{args.runs} {time.monotonic() - t_start:6.0f}s] {b}")
                os.sync()
                meter = StealMeter()
                try:
                    if b == "rpo":
                        bench_rpo(env, res, run, sz)
                    elif b == "throughput":
                        bench_throughput(env, res, run, sz)
                    elif b == "snapshot":
                        bench_snapshot(env, res, run, sz)
                    elif b == "checkpoints":
                        bench_checkpoints(env, res, run, sz)
                    elif b == "store":
                        if text is None:
                            text = TextSource(seed=1234)
                        bench_store(env, res, run, sz, text)
                except MountError as e:
                    log(f"!! {b}: {e}")
                    env.skipped[b] = str(e)
                except (BenchError, OSError, subprocess.SubprocessError, KeyError) as e:
                    log(f"!! {b} (run {run + 1}) failed: {e!r}")
                steal.append(meter.fraction())
                if steal[-1] is not None:
                    log(f"   host steal {100 * steal[-1]:.0f}%")
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: unmounting and cleaning up")
    finally:
        env.cleanup()
    report = {
        "machine": machine_info(args),
        "runs": args.runs,
        "sizes_name": "quick" if args.quick else "full",
        "sizes": sz,
        "benchmarks": args.bench_list,
        "skipped": env.skipped,
        "elapsed": time.monotonic() - t_start,
        "rows": build_rows(res),
        "steal": steal,  # the host's steal during each benchmark run (fraction of CPU time)
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
