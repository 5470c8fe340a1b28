"""FUSE mount lifecycle helpers for bench/bench_mount.py.

The one rule here: a benchmark must never leave a mount or a daemon behind, whether it
ends normally, raises, or is interrupted with Ctrl-C / SIGTERM.  To get there:

* every daemon is registered in ``_ACTIVE`` the moment it is spawned (with SIGINT/SIGTERM
  deferred around the spawn so the registration cannot be skipped), and an ``atexit`` hook
  stops whatever is still registered;
* daemons run in their own session, so a terminal Ctrl-C reaches only the benchmark, which
  then unmounts them in order (``fusermount3 -u``, wait, SIGTERM, SIGKILL, and a lazy
  unmount as the last resort);
* daemons get PR_SET_PDEATHSIG=SIGTERM, so even a SIGKILLed benchmark takes them down
  (both passthrough_ll and pyfuse3 unmount on SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gzip
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

EXAMPLES_DIR = "/usr/share/doc/libfuse3-dev/examples"

_ACTIVE: list[FuseMount] = []


class MountError(RuntimeError):
    """A daemon did not come up (or could not be built)."""


# ---------------------------------------------------------------------------- /proc/mounts


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _exit_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def start_run(workdir: str, log) -> bool:
    """What every benchmark does first: SIGTERM/SIGHUP unwind through the scripts' cleanups
    (``finally`` blocks unmount), fio must exist, and a RAM-backed work dir is called out.
    False if the run cannot start."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    if shutil.which("fio") is None:
        log("fio not found (apt-get install fio)")
        return False
    kind = fs_type(workdir)
    if kind in ("tmpfs", "ramfs"):
        log(f"!! WARNING: {workdir} is {kind}, not a disk: use --workdir on a disk filesystem")
    return True


def mounted_paths() -> list[str]:
    with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
        return [_unescape(line.split()[1]) for line in f if len(line.split()) > 2]


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mounted_paths()


def mounts_under(path: str) -> list[str]:
    root = os.path.realpath(path).rstrip("/") + "/"
    return [m for m in mounted_paths() if (m + "/").startswith(root)]


def fs_type(path: str) -> str:
    """Filesystem type of the mount that holds ``path`` (longest mountinfo prefix)."""
    path = os.path.realpath(path)
    best, best_type = "", "unknown"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = _unescape(left.split()[4])
            prefix = mnt.rstrip("/") + "/"
            if (path == mnt or (path + "/").startswith(prefix)) and len(mnt) >= len(best):
                best, best_type = mnt, right.split()[0]
    return best_type


# ---------------------------------------------------------------------------- signals


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM off for the duration; re-deliver (as an exception) afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum, _frame):
        pending.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                raise KeyboardInterrupt


def _child_setup() -> None:
    # Runs in the forked child before exec: die with the parent.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ---------------------------------------------------------------------------- mounts


def _fusermount(*args: str) -> bool:
    try:
        r = subprocess.run(
            ["fusermount3", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class FuseMount:
    """One FUSE daemon serving ``mountpoint``; usable as a context manager."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        mountpoint: str,
        log_path: str,
        ready_timeout: float = 20.0,
        stop_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.mountpoint = os.path.realpath(mountpoint)
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.mount_seconds: float | None = None
        self.unmount_seconds: float | None = None
        self.problems: list[str] = []

    # -- start --------------------------------------------------------------
    def start(self) -> FuseMount:
        if is_mounted(self.mountpoint):
            raise MountError(f"{self.mountpoint} is already a mountpoint")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log, deferred_signals():
            log.write(f"\n=== {time.strftime('%F %T')} {shlex.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,  # noqa: PLW1509 - single-threaded here
                env=self.env,
                cwd=self.cwd,
            )
            _ACTIVE.append(self)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + self.ready_timeout
        while True:
            if is_mounted(self.mountpoint):
                self.mount_seconds = time.monotonic() - t0
                return
            rc = self.proc.poll()
            if rc is not None:
                raise MountError(
                    f"{self.name}: daemon exited with status {rc} before mounting "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise MountError(
                    f"{self.name}: {self.mountpoint} not in /proc/mounts after "
                    f"{self.ready_timeout:.0f}s (log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.02)

    # -- stop ---------------------------------------------------------------
    def stop(self) -> int | None:
        """Unmount and reap the daemon.  Idempotent; never raises for cleanup trouble."""
        if self not in _ACTIVE:
            return self.returncode
        with deferred_signals():
            t0 = time.monotonic()
            self._stop()
            self.unmount_seconds = time.monotonic() - t0
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        return self.returncode

    def _stop(self) -> None:
        proc = self.proc
        # 1. polite unmount; retry a little while something still holds a file open.
        deadline = time.monotonic() + 5.0
        while is_mounted(self.mountpoint):
            if _fusermount("-u", self.mountpoint):
                break
            if proc is not None and proc.poll() is not None:
                break  # dead daemon: plain -u may not succeed; lazy unmount below
            if time.monotonic() > deadline:
                self.problems.append("fusermount3 -u kept failing")
                break
            time.sleep(0.1)
        # 2. the daemon should now flush and exit on its own.
        if proc is not None:
            # A daemon that never mounted has nothing to flush: don't wait long for it.
            grace = self.stop_timeout if self.mount_seconds is not None else 0.5
            try:
                self.returncode = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.problems.append(f"no exit {grace:g}s after unmount: SIGTERM")
                proc.terminate()
                try:
                    self.returncode = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.problems.append("SIGKILL")
                    proc.kill()
                    self.returncode = proc.wait()
        # 3. last resort: lazy unmount.
        if is_mounted(self.mountpoint):
            self.problems.append("lazy unmount")
            if not _fusermount("-uz", self.mountpoint):
                subprocess.run(
                    ["umount", "-l", self.mountpoint],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + ln for ln in text.splitlines()[-lines:])

    def __enter__(self) -> FuseMount:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all() -> None:
    for m in reversed(list(_ACTIVE)):
        with contextlib.suppress(Exception):  # keep going: the others must still be unmounted
            m.stop()


atexit.register(stop_all)


# ---------------------------------------------------------------------------- passthrough_ll


def _fetch_example(name: str, dest_dir: str) -> str | None:
    """Copy ``name`` (or ``name.gz``, decompressed) from the libfuse examples into dest_dir."""
    plain = os.path.join(EXAMPLES_DIR, name)
    out = os.path.join(dest_dir, name)
    if os.path.exists(plain):
        shutil.copyfile(plain, out)
        return out
    if os.path.exists(plain + ".gz"):
        with gzip.open(plain + ".gz", "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return out
    return None


def build_passthrough_ll(dest_dir: str) -> str:
    """Compile libfuse's passthrough_ll example into dest_dir; return the binary path."""
    os.makedirs(dest_dir, exist_ok=True)
    src = _fetch_example("passthrough_ll.c", dest_dir)
    if src is None:
        raise MountError(f"passthrough_ll.c(.gz) not found in {EXAMPLES_DIR} (libfuse3-dev)")
    _fetch_example("passthrough_helpers.h", dest_dir)
    try:
        flags = subprocess.run(
            ["pkg-config", "fuse3", "--cflags", "--libs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise MountError(f"pkg-config fuse3 failed: {e}") from e
    binary = os.path.join(dest_dir, "passthrough_ll")
    cmd = [
        "gcc",
        "-O2",
        "-Wall",
        f"-I{dest_dir}",
        f"-I{EXAMPLES_DIR}",
        src,
        *shlex.split(flags),
        "-o",
        binary,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not os.access(binary, os.X_OK):
        raise MountError(f"compiling passthrough_ll failed:\n{r.stderr[-2000:]}")
    return binary
