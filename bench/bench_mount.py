#!/usr/bin/env python3
"""Throughput/latency of the zfsrep FUSE mount against a native directory and libfuse's
C passthrough_ll example.

Configs (each is a directory the workloads run in):
  native            plain directory on the work filesystem (default under /var/tmp)
  passthrough_ll    libfuse's example, compiled here, ``-o writeback -o source=BACKING``
  zfsrep            python -m zfsrep.cli protect --source B --spool S MNT --foreground
  zfsrep-nocapture  the same plus --no-capture (pure passthrough)

Every FUSE config is mounted fresh (new empty backing dir, new spool) for every single
measurement and unmounted right after, so each spool holds exactly one workload's records.
Runs are interleaved: for run: for workload: for config (config order rotates per run);
each figure is also divided by its baseline measured in the same run, and the table shows
medians over runs.  Nothing is asserted: targets print PASS/MISS.

Progress goes to stderr; the table (or, with --json, one JSON document) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _mounts  # noqa: E402
from _mounts import FuseMount, MountError  # noqa: E402
from hoststeal import StealMeter, describe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = ["native", "passthrough_ll", "zfsrep", "zfsrep-nocapture"]
ZFSREP_CONFIGS = {"zfsrep": [], "zfsrep-nocapture": ["--no-capture"]}
MiB = 1 << 20
BLOCK = 4096

SIZES = {  # full run (default) and --quick
    "full": dict(
        seq1m=1024 * MiB,
        seq4k=256 * MiB,
        rand=256 * MiB,
        randw_rt=30,
        randr_rt=15,
        files=10_000,
        fsyncs=500,
    ),
    "quick": dict(
        seq1m=64 * MiB,
        seq4k=16 * MiB,
        rand=32 * MiB,
        randw_rt=5,
        randr_rt=3,
        files=1_000,
        fsyncs=100,
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# ============================================================================ targets


@dataclass
class Target:
    """Where one measurement runs: ``path`` is what the workload uses, ``backing`` where the
    bytes land on the disk (the same directory for native)."""

    config: str
    path: str
    backing: str
    spool: str | None = None
    mount: FuseMount | None = None
    spool_bytes: int | None = None  # set after unmount (the daemon has flushed by then)


class Env:
    """Owns the work directory, builds passthrough_ll, mounts configs on demand."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = tempfile.mkdtemp(prefix="zfsrep-bench-", dir=args.workdir)
        self.seq = 0
        self.ptll: str | None = None
        self.skipped: dict[str, str] = {}
        self.mount_times: dict[str, list[float]] = {}
        self.unmount_times: dict[str, list[float]] = {}

    # -- setup ----------------------------------------------------------------
    def prepare(self, configs: list[str]) -> list[str]:
        usable = []
        for cfg in configs:
            try:
                if cfg == "passthrough_ll":
                    self.ptll = _mounts.build_passthrough_ll(os.path.join(self.root, "build"))
                elif cfg in ZFSREP_CONFIGS:
                    self._check_zfsrep_import()
                usable.append(cfg)
            except (MountError, BenchError) as e:
                self.skip(cfg, str(e))
        return usable

    def _zfsrep_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _check_zfsrep_import(self) -> None:
        r = subprocess.run(
            [sys.executable, "-c", "import zfsrep.cli"],
            capture_output=True,
            text=True,
            env=self._zfsrep_env(),
            cwd=self.root,
            timeout=60,
        )
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            raise BenchError(f"cannot import zfsrep.cli with {sys.executable}: {last}")

    def skip(self, cfg: str, why: str) -> None:
        if cfg not in self.skipped:
            self.skipped[cfg] = why
            log(f"!! skipping config {cfg}: {why}")

    # -- one measurement's directory ---------------------------------------------
    @contextmanager
    def target(self, cfg: str, keep: bool = False) -> Iterator[Target]:
        """A fresh directory (and mount) for one measurement, emptied afterwards.

        ``keep``: the files are moved aside (renamed, same file system) instead of deleted,
        and deleted at the end of the benchmark. On ext4 without a journal, as here, the
        inode allocator skips inodes freed in the last 60 s (360 s while their inode table
        block is dirty) and looks each candidate up first: right after 10,000 files are
        deleted, creating a file takes ~400 us instead of ~15 us, in every config alike, and
        the create figures measured that instead of the file system under test."""
        self.seq += 1
        base = os.path.join(self.root, cfg)
        if cfg == "native":
            d = os.path.join(base, f"m{self.seq}")
            os.makedirs(d)
            try:
                yield Target(cfg, d, d)
            finally:
                self._discard(d, keep)
            return

        backing, mnt = os.path.join(base, "backing"), os.path.join(base, "mnt")
        spool = os.path.join(base, f"spool{self.seq}")
        for d in (backing, mnt):
            os.makedirs(d, exist_ok=True)
        logfile = os.path.join(self.root, f"{cfg}.log")
        if cfg == "passthrough_ll":
            assert self.ptll
            argv = [self.ptll, "-o", "writeback", "-o", f"source={backing}", mnt, "-f"]
            m = FuseMount(cfg, argv, mnt, logfile, self.args.mount_timeout, 20.0)
            spool = None
        else:
            os.makedirs(spool)
            argv = zfsrep_argv(backing, spool, mnt, ZFSREP_CONFIGS[cfg])
            m = FuseMount(
                cfg,
                argv,
                mnt,
                logfile,
                self.args.mount_timeout,
                self.args.stop_timeout,
                env=self._zfsrep_env(),
                cwd=self.root,
            )
        t = Target(cfg, mnt, backing, spool, m)
        try:
            m.start()
            self.mount_times.setdefault(cfg, []).append(m.mount_seconds or 0.0)
            yield t
        finally:
            rc = m.stop()
            if m.unmount_seconds is not None:
                self.unmount_times.setdefault(cfg, []).append(m.unmount_seconds)
            if m.problems or (rc not in (0, None) and m.mount_seconds is not None):
                log(f"   note: {cfg} stop: exit status {rc}; {', '.join(m.problems) or 'ok'}")
            # Only the backing dir and spool are wiped (the daemon is gone by now), never
            # anything reached through the mountpoint.
            if not _mounts.is_mounted(mnt):
                if spool:
                    t.spool_bytes = dir_bytes(spool)
                    shutil.rmtree(spool, ignore_errors=True)
                self._discard(backing, keep)
                os.makedirs(backing, exist_ok=True)

    def _discard(self, d: str, keep: bool) -> None:
        if keep:
            kept = os.path.join(self.root, "kept")
            os.makedirs(kept, exist_ok=True)
            os.rename(d, os.path.join(kept, str(self.seq)))
        else:
            shutil.rmtree(d, ignore_errors=True)

    def cleanup(self) -> None:
        _mounts.stop_all()
        left = _mounts.mounts_under(self.root)
        if left:
            log(f"!! still mounted, NOT removing {self.root}: {left}")
        elif self.args.keep:
            log(f"work directory kept: {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def zfsrep_argv(backing: str, spool: str, mnt: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zfsrep.cli",
        "protect",
        "--source",
        backing,
        "--spool",
        spool,
        mnt,
        "--foreground",
        *extra,
    ]


# ============================================================================ workloads


def run_fio(name: str, filename: str, timeout: float, **opts: object) -> dict:
    argv = [
        "fio",
        f"--name={name}",
        f"--filename={filename}",
        "--ioengine=psync",
        "--output-format=json",
        *(f"--{k}={v}" for k, v in opts.items()),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # timeout, Ctrl-C: fio must not keep a file open in the mount
        proc.kill()
        proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0 or "{" not in text:
        raise BenchError(f"fio {name} failed ({proc.returncode}): {err.decode()[-500:]}")
    job = json.loads(text[text.index("{") :])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {name}: error {job['error']}: {err.decode()[-500:]}")
    return job


@dataclass
class Result:
    value: float
    io_bytes: int = 0
    note: str = ""


def w_seq1m(t: Target, sz: dict) -> Result:
    job = run_fio(
        "seq1m",
        os.path.join(t.path, "seq1m"),
        900,
        rw="write",
        bs="1M",
        size=sz["seq1m"],
        end_fsync=1,
    )
    return Result(job["write"]["bw_bytes"] / MiB, job["write"]["io_bytes"])


def w_seq4k(t: Target, sz: dict) -> Result:
    job = run_fio(
        "seq4k",
        os.path.join(t.path, "seq4k"),
        900,
        rw="write",
        bs="4k",
        size=sz["seq4k"],
        end_fsync=1,
    )
    return Result(job["write"]["bw_bytes"] / MiB, job["write"]["io_bytes"])


def w_randwrite(t: Target, sz: dict) -> Result:
    job = run_fio(
        "randw4k",
        os.path.join(t.path, "randw4k"),
        600,
        rw="randwrite",
        bs="4k",
        size=sz["rand"],
        end_fsync=1,
        runtime=sz["randw_rt"],
    )
    w = job["write"]
    return Result(w["iops"], w["io_bytes"], f"{w['io_bytes'] / MiB:.0f} MiB in {w['runtime']} ms")


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def w_randread(t: Target, sz: dict) -> Result:
    f = os.path.join(t.path, "randr4k")
    run_fio("layout", f, 600, rw="write", bs="1M", size=sz["rand"], end_fsync=1)
    # fio's own invalidate=1 does this fadvise too; done here so the residency can be shown.
    _drop_cache(f)
    mnt_res = resident_fraction(f)
    back = os.path.join(t.backing, "randr4k")
    back_res = mnt_res if t.backing == t.path else resident_fraction(back)
    job = run_fio(
        "randr4k",
        f,
        600,
        rw="randread",
        bs="4k",
        size=sz["rand"],
        runtime=sz["randr_rt"],
        invalidate=0,
        direct=0,
    )
    r = job["read"]
    if t.backing == t.path:
        note = f"direct=0; file {pct(mnt_res)} cached before"
    else:
        note = f"direct=0; cached before: mnt {pct(mnt_res)}, backing {pct(back_res)}"
    return Result(r["iops"], r["io_bytes"], note)


def w_create(t: Target, sz: dict) -> Result:
    d = os.path.join(t.path, "files")
    os.mkdir(d)
    buf = b"\xa5" * BLOCK
    n = sz["files"]
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, flags, 0o644)
        os.write(fd, buf)
        os.close(fd)
    dt = time.perf_counter() - t0
    return Result(n / dt, n * BLOCK, f"{n} files in {dt:.2f} s")


def w_fsync(t: Target, sz: dict) -> Result:
    buf = b"\x5a" * BLOCK
    n = sz["fsyncs"]
    lat = []
    fd = os.open(os.path.join(t.path, "fsync"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            os.write(fd, buf)
            os.fsync(fd)
            lat.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6
    return Result(statistics.median(lat) / 1e6, n * BLOCK, f"p99 {p99:.2f} ms")


@dataclass
class Workload:
    key: str
    title: str
    unit: str
    func: Callable[[Target, dict], Result]
    baseline: str
    target: float  # ratio vs baseline
    higher_is_better: bool = True
    abs_slack: float | None = None  # lower-is-better: also value <= baseline + slack
    capture: bool = False  # measure spool bytes per byte written (zfsrep configs)
    keep: bool = False  # keep the files until the end (see Env.target)


WORKLOADS = [
    Workload("seq1m", "seq write 1M +fsync", "MiB/s", w_seq1m, "passthrough_ll", 0.8, capture=True),
    Workload("seq4k", "seq write 4k +fsync", "MiB/s", w_seq4k, "native", 0.8),
    Workload(
        "randwrite",
        "rand write 4k +fsync",
        "IOPS",
        w_randwrite,
        "passthrough_ll",
        0.5,
        capture=True,
    ),
    Workload("randread", "rand read 4k", "IOPS", w_randread, "passthrough_ll", 0.5),
    Workload("create", "create+4k+close", "files/s", w_create, "passthrough_ll", 0.5,
             keep=True),
    Workload(
        "fsync",
        "4k write+fsync p50",
        "ms",
        w_fsync,
        "native",
        3.0,
        higher_is_better=False,
        abs_slack=0.5,
    ),
]
CAPTURE_ROW = Workload(
    "capture", "seq 1M capture on/off", "MiB/s", w_seq1m, "zfsrep-nocapture", 0.8
)
EVALUATED = "zfsrep"  # the config the targets are about


# ============================================================================ helpers


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def resident_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (mmap + mincore), None if unknown."""
    import ctypes
    import mmap

    try:
        size = os.path.getsize(path)
        if size == 0:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                return sum(b & 1 for b in vec) / pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    except OSError:
        return None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def cmd_out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info(args: argparse.Namespace) -> dict:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "fio": cmd_out(["fio", "--version"]),
        "libfuse": cmd_out(["pkg-config", "--modversion", "fuse3"]),
        "python": platform.python_version(),
        "workdir": os.path.realpath(args.workdir),
        "workdir_fs": _mounts.fs_type(args.workdir),
    }


# ============================================================================ the run


@dataclass
class Cell:
    values: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    io_bytes: list[int] = field(default_factory=list)
    spool_bytes: list[int | None] = field(default_factory=list)
    steal: list[float | None] = field(default_factory=list)


def run_all(env: Env, configs: list[str], workloads: list[Workload], args) -> dict:
    sz = SIZES["quick" if args.quick else "full"]
    cells: dict[tuple[str, str], Cell] = {
        (w.key, c): Cell(
            values=[None] * args.runs,
            io_bytes=[0] * args.runs,
            spool_bytes=[None] * args.runs,
            notes=[""] * args.runs,
            steal=[None] * args.runs,
        )
        for w in workloads
        for c in configs
    }
    t_start = time.monotonic()
    for run in range(args.runs):
        order = configs[run % len(configs) :] + configs[: run % len(configs)]
        for w in workloads:
            for cfg in order:
                if cfg in env.skipped:
                    continue
                cell = cells[(w.key, cfg)]
                os.sync()  # settle the previous measurement's writeback
                try:
                    with env.target(cfg, keep=w.keep) as t:
                        meter = StealMeter()
                        res = w.func(t, sz)
                        cell.steal[run] = meter.fraction()
                    cell.values[run], cell.io_bytes[run] = res.value, res.io_bytes
                    cell.notes[run] = res.note
                    if w.capture:
                        cell.spool_bytes[run] = t.spool_bytes
                except MountError as e:
                    env.skip(cfg, str(e))
                    continue
                except BenchError as e:
                    log(f"!! {w.key} on {cfg} failed: {e}")
                    continue
                except OSError as e:
                    log(f"!! {w.key} on {cfg} failed: {e!r}")
                    continue
                log(
                    f"[run {run + 1}/{args.runs} {time.monotonic() - t_start:6.0f}s] "
                    f"{w.key:<9} {cfg:<16} {fmt_val(res.value, w.unit):>10} {w.unit:<7} "
                    f"{res.note}{_steal_note(cell.steal[run])}"
                )
    return {"cells": cells, "elapsed": time.monotonic() - t_start}


def _steal_note(fraction: float | None) -> str:
    return f"  (host steal {100 * fraction:.0f}%)" if fraction is not None else ""


# ============================================================================ report


def fmt_val(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.3f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def verdict(w: Workload, value: float | None, base: float | None, ratio: float | None) -> str:
    if value is None or base is None or ratio is None:
        return "n/a"
    if w.higher_is_better:
        ok = ratio >= w.target
    else:
        ok = ratio <= w.target and (w.abs_slack is None or value <= base + w.abs_slack)
    return "PASS" if ok else "MISS"


def target_text(w: Workload) -> str:
    if w.higher_is_better:
        return f">= {w.target:g}x"
    extra = f" & <= +{w.abs_slack:g}ms" if w.abs_slack is not None else ""
    return f"<= {w.target:g}x{extra}"


def build_rows(cells: dict, configs: list[str], workloads: list[Workload], runs: int) -> list:
    rows = []
    specs = [(w, w.key) for w in workloads]
    if "seq1m" in {w.key for w in workloads}:
        specs.append((CAPTURE_ROW, "seq1m"))
    for w, key in specs:
        shown = configs
        if w is CAPTURE_ROW:
            shown = [c for c in ("zfsrep", "zfsrep-nocapture") if c in configs]
            if len(shown) < 2:
                continue
        base_vals = cells[(key, w.baseline)].values if w.baseline in configs else [None] * runs
        for cfg in shown:
            vals = cells[(key, cfg)].values
            ratios = [
                v / b if v is not None and b else None for v, b in zip(vals, base_vals, strict=True)
            ]
            value, base, ratio = med(vals), med(base_vals), med(ratios)
            good = [v for v in vals if v is not None]
            spread = (max(good) - min(good)) / 2 / value if value and len(good) > 1 else None
            v = verdict(w, value, base, ratio)
            if cfg == w.baseline:
                v = "base"
            elif cfg != EVALUATED and v in ("PASS", "MISS"):
                v = f"({v.lower()})"  # reference only: would this config meet the target?
            # the note of the run whose value is nearest the median
            runs_ok = [
                (abs(x - value), n)
                for x, n in zip(vals, cells[(key, cfg)].notes, strict=True)
                if x is not None
            ]
            note = min(runs_ok)[1] if runs_ok else ""
            rows.append(
                {
                    "workload": w.key if w is not CAPTURE_ROW else "capture_on_off",
                    "title": w.title,
                    "config": cfg,
                    "unit": w.unit,
                    "value": value,
                    "values": vals,
                    "runs_ok": len(good),
                    "spread": spread,
                    "baseline": w.baseline,
                    "baseline_value": base,
                    "ratio": ratio,
                    "ratios": ratios,
                    "target": target_text(w),
                    "verdict": v,
                    "note": note,
                }
            )
    return rows


def capture_rows(cells: dict, configs: list[str], workloads: list[Workload]) -> list:
    rows = []
    for w in workloads:
        if not w.capture:
            continue
        for cfg in configs:
            if cfg not in ZFSREP_CONFIGS:
                continue
            c = cells[(w.key, cfg)]
            per = [
                s / b if s is not None and b else None
                for s, b in zip(c.spool_bytes, c.io_bytes, strict=True)
            ]
            rows.append(
                {
                    "workload": w.key,
                    "config": cfg,
                    "ratio": med(per),
                    "ratios": per,
                    "written_bytes": med([b or None for b in c.io_bytes]),
                    "spool_bytes": med(c.spool_bytes),
                }
            )
    return rows


def table(headers: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def print_report(report: dict) -> None:
    m = report["machine"]
    print(
        f"machine: nproc={m['nproc']} (usable {m['usable_cpus']}), kernel {m['kernel']}, "
        f"{m['fio']}, libfuse {m['libfuse']}, python {m['python']}"
    )
    print(
        f"workdir: {m['workdir']} ({m['workdir_fs']}); runs={report['runs']} (medians, "
        f"interleaved, ratio = median of per-run value/baseline); sizes={report['sizes_name']}; "
        f"elapsed {report['elapsed']:.0f}s"
    )
    for cfg, why in report["skipped"].items():
        print(f"skipped {cfg}: {why.splitlines()[0]}")
    print()
    body = []
    for r in report["rows"]:
        spread = f"±{100 * r['spread']:.0f}%" if r["spread"] is not None else ""
        runs = f"{r['runs_ok']}/{report['runs']}"
        body.append(
            [
                r["title"],
                r["config"],
                fmt_val(r["value"], r["unit"]),
                r["unit"],
                spread,
                runs,
                f"{r['baseline']} {fmt_val(r['baseline_value'], r['unit'])}",
                f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                r["target"],
                r["verdict"],
                r["note"],
            ]
        )
    heads = [
        "workload",
        "config",
        "median",
        "unit",
        "spread",
        "runs",
        "baseline (median)",
        "ratio",
        "target",
        "result",
        "note",
    ]
    print(table(heads, body, right={2, 4, 5, 7}))
    print()
    print(
        f"PASS/MISS is judged for '{EVALUATED}' only (capture_on_off: zfsrep vs "
        "zfsrep-nocapture); (pass)/(miss) show whether a reference config would meet the "
        "same target.  fsync p50 target: <= 3x native AND <= native + 0.5 ms.  rand read "
        "uses direct=0 after a POSIX_FADV_DONTNEED on the file in the measured directory; "
        "for FUSE configs the backing file usually stays in the host page cache, so those "
        "reads measure the FUSE round trip, not the disk.  Write figures include the "
        "final fsync."
    )
    if report["capture"]:
        print()
        print(
            "bytes captured per byte written (spool size after unmount / bytes written; "
            "fresh spool per workload):"
        )
        body = [
            [
                r["workload"],
                r["config"],
                human_bytes(r["written_bytes"]),
                human_bytes(r["spool_bytes"]),
                f"{r['ratio']:.4g}" if r["ratio"] is not None else "-",
            ]
            for r in report["capture"]
        ]
        print(table(["workload", "config", "written", "spool", "spool/written"], body, {2, 3, 4}))
    mt = report.get("mount_seconds") or {}
    if mt:
        print()
        print(
            "mount / unmount time (median s): "
            + ", ".join(f"{c} {v[0]:.2f}/{v[1]:.2f}" for c, v in mt.items())
        )
    print()
    print(describe([f for fs in report.get("steal", {}).values() for f in fs]))


# ============================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    p.add_argument(
        "--configs",
        default=",".join(ALL_CONFIGS),
        help=f"comma list from {','.join(ALL_CONFIGS)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(w.key for w in WORKLOADS),
        help="comma list (default: all): " + ",".join(w.key for w in WORKLOADS),
    )
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="parent of the temporary work dir; must be a real disk filesystem (default /var/tmp)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead")
    p.add_argument(
        "--mount-timeout",
        type=float,
        default=20.0,
        help="seconds to wait for a mount to appear (default 20)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=120.0,
        help="seconds zfsrep may take to flush and exit after unmount (default 120)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    args = p.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in ALL_CONFIGS]
    keys = {w.key: w for w in WORKLOADS}
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad += [w for w in args.workload_list if w not in keys]
    if bad or args.runs < 1:
        p.error(f"unknown config/workload {bad}" if bad else "--runs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not _mounts.start_run(args.workdir, log):
        return 2
    sz = SIZES["quick" if args.quick else "full"]
    st = os.statvfs(args.workdir)
    need = 2 * sz["seq1m"] + 2 * sz["rand"] + 256 * MiB
    if st.f_bavail * st.f_frsize < need:
        log(f"!! WARNING: {args.workdir} has < {need / MiB:.0f} MiB free")
    workloads = [w for w in WORKLOADS if w.key in args.workload_list]
    env = Env(args)
    interrupted = False
    result = None
    try:
        log(
            f"work dir {env.root} ({_mounts.fs_type(args.workdir)}); configs {args.config_list}; "
            f"runs {args.runs}; "
            f"sizes {'quick' if args.quick else 'full'}"
        )
        configs = env.prepare(args.config_list)
        if configs:
            result = run_all(env, configs, workloads, args)
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: unmounting and cleaning up")
    finally:
        env.cleanup()
    if result is None:
        return 130 if interrupted else 1
    cells = result["cells"]
    configs = [c for c in args.config_list if any(k[1] == c for k in cells)]
    report = {
        "machine": machine_info(args),
        "runs": args.runs,
        "sizes_name": "quick" if args.quick else "full",
        "sizes": sz,
        "configs": configs,
        "skipped": env.skipped,
        "elapsed": result["elapsed"],
        "zfsrep_argv": zfsrep_argv("BACKING", "SPOOL", "MOUNTPOINT", []),
        "rows": build_rows(cells, configs, workloads, args.runs),
        "capture": capture_rows(cells, configs, workloads),
        "mount_seconds": {
            c: (med(env.mount_times[c]), med(env.unmount_times.get(c, [])) or 0.0)
            for c in env.mount_times
        },
        # the host's steal during each measurement, as a fraction of all CPU time
        "steal": {f"{w}/{c}": cell.steal for (w, c), cell in cells.items()},
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
