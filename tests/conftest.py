"""Shared fixtures. Real-mount fixtures always unmount, whatever the test did."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from treesnap import assert_same_tree

FUSERMOUNT = "fusermount3"


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace(b"\\040", b" ") == target:
                return True
    return False


def zfsrep(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the zfsrep CLI as a user would (a subprocess of this Python)."""
    proc = subprocess.run([sys.executable, "-m", "zfsrep.cli", *args], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 300), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"zfsrep {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")
    return proc


def log_problems(path: Path, expected: list[str]) -> list[str]:
    """Warnings, errors and tracebacks in a daemon's log, except the expected ones."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines
           if (" WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln
               or "Traceback" in ln)]
    return [ln for ln in bad if not any(e in ln for e in expected)]


class ProtectedMount:
    """A `zfsrep protect --foreground` daemon over a backing directory, for one test."""

    def __init__(self, base: Path, *, capture: bool = True, extra: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()):
        self.source = base / "source"
        self.mnt = base / "mnt"
        self.spool = base / "spool"
        self.log = base / "mountd.log"
        self.capture = capture
        self.extra = extra
        self.prefix = prefix  # a command the daemon runs under (e.g. prlimit ... --)
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None  # of the last daemon that stopped
        self.expected_log: list[str] = []
        for d in (self.source, self.mnt):
            d.mkdir(exist_ok=True)

    def start(self, timeout: float = 30.0) -> None:
        args = [*self.prefix, sys.executable, "-m", "zfsrep.cli", "protect", str(self.mnt),
                "--source", str(self.source), "--foreground", *self.extra]
        args += ["--spool", str(self.spool)] if self.capture else ["--no-capture"]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf)
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount daemon exited {self.proc.returncode}:\n"
                                     + self.log.read_text())
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("mount did not come up in time:\n" + self.log.read_text())
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Unmount and wait for the daemon; escalate to lazy unmount and kill if needed."""
        if self.proc is None:
            return self.returncode
        code = None
        try:
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True,
                               timeout=30)
            if self.proc is not None:
                code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mnt)], capture_output=True)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.returncode = code
        return code

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def kill(self) -> None:
        """kill -9 the daemon, then clear the dead mount as an administrator would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        if is_mounted(self.mnt):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mnt)], capture_output=True)

    def log_problems(self) -> list[str]:
        return log_problems(self.log, self.expected_log)

    def replay_equals_source(self, dest: Path) -> None:
        zfsrep("replay", str(self.spool), str(dest))
        assert_same_tree(self.source, dest)


@pytest.fixture
def protected(tmp_path: Path):
    """A started protected mount with capture on; unmounted and log-checked afterwards."""
    m = ProtectedMount(tmp_path)
    m.start()
    try:
        yield m
    finally:
        code = m.stop()
    assert code == 0, f"mount daemon exited {code}:\n{m.log.read_text()}"
    problems = m.log_problems()
    assert not problems, "unexpected warnings or errors in the daemon log:\n" + "\n".join(
        problems)


@pytest.fixture
def mount_factory(tmp_path: Path):
    """Make ProtectedMount objects (not started); all are stopped at the end."""
    made: list[ProtectedMount] = []

    def make(name: str = "m", **kw) -> ProtectedMount:
        base = tmp_path / name
        base.mkdir()
        m = ProtectedMount(base, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JournalServerProcess:
    """A `zfsrep serve --foreground` process on a loopback port, for one test."""

    def __init__(self, base: Path) -> None:
        self.store = base / "store"
        self.log = base / "server.log"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.expected_log: list[str] = []

    def start(self, timeout: float = 30.0) -> None:
        import socket

        args = [sys.executable, "-m", "zfsrep.cli", "serve", "--store", str(self.store),
                "--listen", self.address, "--foreground"]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n"
                                     + self.log.read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError("server did not listen in time") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self.proc = None
        return code

    def cli(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        env = dict(os.environ, ZFSREP_SERVER=self.address)
        return zfsrep(*args, check=check, env=env, **kw)

    def log_problems(self) -> list[str]:
        return log_problems(self.log, self.expected_log)


@pytest.fixture
def journal_server(tmp_path: Path):
    """A started journal server; stopped (SIGTERM, exit 0) and log-checked afterwards."""
    srv = JournalServerProcess(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"server exited {code}:\n{srv.log.read_text()}"
    problems = srv.log_problems()
    assert not problems, "unexpected warnings or errors in the server log:\n" + "\n".join(
        problems)


class LogCheck(logging.Handler):
    """Collects the package's log records; a test takes the warnings it expects with
    ``take()``, and any other warning or error fails the test (CONVENTIONS 16)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self, level: int = logging.WARNING) -> list[str]:
        taken = [r for r in self.records if r.levelno >= level]
        self.records = [r for r in self.records if r.levelno < level]
        return [r.getMessage() for r in taken]


def checked_logs():
    """Generator for an autouse ``logs`` fixture of in-process tests: yields a LogCheck on
    the ``zfsrep`` logger and fails the test on warnings it did not take."""
    handler = LogCheck()
    logger = logging.getLogger("zfsrep")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    unexpected = handler.take()
    assert not unexpected, f"unexpected warnings or errors logged: {unexpected}"


def sweep_promotions(base: str) -> None:
    """Unmount and stop every promotion mount and daemon (``zfsrep.mountd.promote``, started
    in a session of its own) under ``base``."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f
                  if " - fuse.zfsrep zfsrep-promote:" in line and line.split()[4].startswith(base)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"zfsrep.mountd.promote" in cmd and any(a.startswith(base.encode()) for a in cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


@pytest.fixture(autouse=True)
def _no_promotion_left(request):
    """A test that fails half-way through a live failover or move must not leave a
    promotion's mount or daemon behind."""
    base = (str(request.getfixturevalue("tmp_path")) if "tmp_path" in request.fixturenames
            else None)  # (taken before: it is torn down after this fixture)
    yield
    if base is not None:
        sweep_promotions(base)
