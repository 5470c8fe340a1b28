"""The ``zfsrep`` command line. Every command is ``main(argv) -> int``; a user error is printed
as one line (``zfsrep: ...``) and exits with the code documented in the README."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from zfsrep import __version__
from zfsrep.cli_journal import json_text
from zfsrep.errors import (
    CorruptDataError,
    ExitCode,
    NotFoundError,
    OSFailure,
    StateError,
    UsageError,
    ZfsrepError,
)

log = logging.getLogger("zfsrep")

READY_FD_ENV = "ZFSREP_READY_FD"


def _mib(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of MiB: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 MiB")
    return value << 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zfsrep",
        description="Continuous data protection for ordinary Linux directories.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage, 3 not found, 4 wrong state, "
               "5 corrupt data, 6 I/O error, 7 unsafe (would escape or overwrite), "
               "8 journal server unreachable.")
    p.add_argument("--version", action="version", version=f"zfsrep {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error"], help="log level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    pr = sub.add_parser(
        "protect", help="mount a protected view over a directory and capture every change",
        description="Mount MOUNTPOINT as a faithful view of --source; every change made through "
                    "it is applied to the source and captured, in order, into frames in the "
                    "--spool directory. Returns once the mount is ready (unless --foreground). "
                    "Stop with 'fusermount3 -u MOUNTPOINT' or SIGTERM: everything captured is "
                    "written and fsynced before the daemon exits. MOUNTPOINT may be the source "
                    "directory itself (mount over it). With --vpg the frames are also "
                    "replicated to that VPG on the journal server (see 'zfsrep serve'); the "
                    "spool holds them until the server has made them durable.")
    pr.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    pr.add_argument("--source", type=Path, required=True, metavar="DIR",
                    help="the backing directory to protect")
    pr.add_argument("--spool", type=Path, metavar="SPOOLDIR",
                    help="directory for the captured frames (created if missing)")
    pr.add_argument("--foreground", "-f", action="store_true",
                    help="stay attached; log to stderr")
    pr.add_argument("--no-capture", action="store_true",
                    help="pure passthrough, nothing captured (diagnostics and benchmarks)")
    pr.add_argument("--no-fast-path", action="store_true",
                    help="serve reads and writes through pyfuse3 too, not the C fast path "
                         "(diagnostics)")
    pr.add_argument("--allow-other", action="store_true",
                    help="let users other than root use the mount (FUSE allow_other)")
    pr.add_argument("--memory-limit", type=_mib, default=64 << 20, metavar="MIB",
                    help="memory for captured data not yet in the spool (default 64)")
    pr.add_argument("--log", type=Path, metavar="FILE",
                    help="daemon log file (default SPOOLDIR/mountd.log)")
    pr.add_argument("--vpg", metavar="NAME",
                    help="replicate to this VPG on the journal server (see 'zfsrep vpg')")
    pr.add_argument("--volume", metavar="VOL",
                    help="the volume's name in the VPG (default: the source's basename)")
    pr.add_argument("--server", metavar="HOST:PORT",
                    help="journal server (default $ZFSREP_SERVER, else 127.0.0.1:7450)")
    pr.add_argument("--spool-limit", type=_mib, default=None, metavar="MIB",
                    help="most disk the spool may use for frames the server has not "
                         "acknowledged (default: no limit; when reached, capture stops and "
                         "the VPG reports it)")
    pr.add_argument("--ready-timeout", type=float, default=600.0, help=argparse.SUPPRESS)

    rp = sub.add_parser("replay", help="rebuild a directory from a spool's record stream",
                        description="Apply every record of SPOOL, in order, to the empty "
                                    "directory DEST (created if missing).")
    rp.add_argument("spool", type=Path, metavar="SPOOL")
    rp.add_argument("dest", type=Path, metavar="DEST")
    rp.add_argument("--json", action="store_true", help="print a JSON summary")

    sp = sub.add_parser("spool", help="inspect a spool directory")
    sps = sp.add_subparsers(dest="spool_command", metavar="SUBCOMMAND")
    show = sps.add_parser("show", help="summary of the frames and records in a spool")
    show.add_argument("spool", type=Path, metavar="SPOOL")
    show.add_argument("--records", type=int, default=0, metavar="N",
                      help="also list the last N records")
    show.add_argument("--json", action="store_true", help="machine-readable output")

    from zfsrep import cli_journal

    cli_journal.add_parsers(sub)
    return p


def _setup_logging(args: argparse.Namespace, stream=None) -> None:
    level = args.log_level or ("debug" if args.verbose else "info")
    logging.basicConfig(level=level.upper(), stream=stream or sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---- protect -------------------------------------------------------------------------------
def cmd_protect(args: argparse.Namespace) -> int:
    from zfsrep.mountd.protect import ProtectOptions, check_options

    link = None
    if args.vpg is not None:
        from zfsrep import wire
        from zfsrep.link import LinkOptions, default_spool
        from zfsrep.store import check_name

        check_name("VPG", args.vpg)
        if args.volume is None:
            args.volume = args.source.resolve().name
        check_name("volume", args.volume)
        link = LinkOptions(wire.server_address(args.server), args.vpg, args.volume)
        if args.spool is None and not args.no_capture:
            args.spool = default_spool(args.vpg, args.volume)
    elif args.volume is not None or args.server is not None:
        raise UsageError("--volume and --server need --vpg")
    if link is not None and args.no_capture:
        raise UsageError("--vpg needs capture (drop --no-capture)")
    opts = ProtectOptions(source=args.source, spool=args.spool, mountpoint=args.mountpoint,
                          capture=not args.no_capture, allow_other=args.allow_other,
                          memory_limit=args.memory_limit, fast_path=not args.no_fast_path,
                          link=link, spool_limit=args.spool_limit)
    check_options(opts)
    if args.foreground:
        from zfsrep.mountd.protect import run_protected_mount

        return run_foreground(run_protected_mount, opts,
                              mount_error=f"cannot mount {opts.mountpoint}")
    if args.spool is not None:
        args.spool.mkdir(parents=True, exist_ok=True)
    log_path = args.log or ((args.spool or Path("/var/log")) / "mountd.log")
    argv = ["protect", str(args.mountpoint), "--source", str(args.source), "--foreground",
            "--memory-limit", str(args.memory_limit >> 20)]
    if args.spool is not None:
        argv += ["--spool", str(args.spool)]
    for flag in ("no_capture", "allow_other", "no_fast_path"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.vpg is not None:
        assert args.volume is not None
        argv += ["--vpg", args.vpg, "--volume", args.volume]
        if args.server:
            argv += ["--server", args.server]
    if args.spool_limit is not None:
        argv += ["--spool-limit", str(args.spool_limit >> 20)]
    pid = spawn_daemon(args, argv, log_path, args.ready_timeout)
    target = f", replicating to VPG {args.vpg} as volume {args.volume}" if link else ""
    print(f"protecting {args.source} at {args.mountpoint}{target} (daemon pid {pid}, "
          f"log {log_path})")
    return 0


class ReadyPipe:
    """The daemon's end of the ready pipe: ``progress TEXT`` lines while it starts, then one
    ``ready`` or ``error CODE MESSAGE`` line. Calling it reports ready."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def progress(self, text: str) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):  # the parent stopped listening: keep going
                os.write(self.fd, f"progress {text}\n".encode())

    def report(self, text: str) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, text.encode() + b"\n")
            os.close(self.fd)
            self.fd = -1

    def __call__(self) -> None:
        self.report("ready")


def run_foreground(async_fn, *fn_args, mount_error: str | None = None) -> int:
    """Run a daemon's trio main in this process; ``async_fn(*fn_args, ready)`` calls
    ``ready()`` once it serves. A parent waiting on the ready pipe (``$ZFSREP_READY_FD``) gets
    ``ready`` or ``error CODE MESSAGE``."""
    import trio

    ready = ReadyPipe(int(os.environ.pop(READY_FD_ENV, "-1")))
    report = ready.report

    try:
        try:
            trio.run(async_fn, *fn_args, ready)
        except BaseExceptionGroup as group:
            raise _single_error(group) from None
    except ZfsrepError as e:
        report(f"error {e.exit_code} {e}")
        raise
    except RuntimeError as e:  # pyfuse3.init failures (e.g. mount refused)
        if mount_error is None:
            raise
        report(f"error {ExitCode.IO} {mount_error}: {e}")
        raise OSFailure(f"{mount_error}: {e}") from None
    except OSError as e:
        report(f"error {ExitCode.IO} {e.strerror or e}")
        raise
    return 0


def daemon_main(args: argparse.Namespace, async_fn, opts, what: str) -> int:
    """The foreground entry point of a mount daemon module (``python -m
    zfsrep.mountd.snapshot`` / ``.promote``): log to ``args.log`` (else stderr) at
    ``args.log_level``, run ``async_fn(opts, ready)`` with ``run_foreground``, and turn its
    errors into one line on stderr (and the log) and an exit code."""
    import logging

    log = logging.getLogger(what)
    handler: logging.Handler = (logging.FileHandler(args.log) if args.log
                                else logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def failed(message: str, code: int) -> int:
        if args.log:
            log.error("%s", message)
        print(f"zfsrep: {message}", file=sys.stderr)
        return code

    try:
        return run_foreground(async_fn, opts, mount_error=f"cannot mount {args.mountpoint}")
    except ZfsrepError as e:
        return failed(str(e), e.exit_code)
    except OSError as e:
        return failed(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), ExitCode.IO)
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130
    except Exception:
        log.exception("%s failed", what)
        return ExitCode.FAILURE


def _single_error(group: BaseExceptionGroup) -> BaseException:
    """The one user-facing error inside a nursery's exception group, else the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


def spawn_daemon(args: argparse.Namespace, argv: list[str], log_path: Path,
                 ready_timeout: float, *, module: str = "zfsrep.cli") -> int:
    """Start ``python -m MODULE ARGV`` in its own session, logging to ``log_path``, and
    return its pid once it reports ready; its error line becomes this command's error."""
    import subprocess

    cmd = [sys.executable, "-m", module]
    if module == "zfsrep.cli":
        if args.log_level:
            cmd += ["--log-level", args.log_level]
        elif args.verbose:
            cmd.append("-v")
    cmd += argv
    r, w = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w)})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), env=env, start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        while True:
            line = pipe.readline().decode(errors="replace").strip()
            if not line.startswith("progress "):
                break
            print(line[len("progress "):], file=sys.stderr, flush=True)
    if line == "ready":
        return proc.pid
    try:
        code = proc.wait(timeout=ready_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = ExitCode.FAILURE
    if line.startswith("error "):
        _, code_text, message = line.split(" ", 2)
        raise ZfsrepError(message, exit_code=int(code_text))
    raise ZfsrepError(f"the daemon exited with status {code}; see {log_path}",
                      exit_code=ExitCode.FAILURE)


# ---- replay and spool ----------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from zfsrep.replay import Replayer
    from zfsrep.spool import check_complete, iter_records, read_identity

    identity = read_identity(args.spool)
    check_complete(args.spool)
    dest: Path = args.dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"destination {dest} exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    replayer = Replayer(dest, identity.root_ident)
    count = replayer.apply_all(iter_records(args.spool))
    elapsed = time.monotonic() - started
    if args.json:
        print(json_text({"records": count, "dest": str(dest), "seconds": round(elapsed, 3)}))
    else:
        print(f"replayed {count} records into {dest} in {elapsed:.2f} s")
    return 0


def _describe(rec: list) -> str:
    from zfsrep.records import Op

    seq, ts, op, *rest = rec
    try:
        name = Op(op).name
    except ValueError:
        name = str(op)
    shown = []
    for value in rest:
        if isinstance(value, bytes) and len(value) > 32:
            shown.append(f"<{len(value)} bytes>")
        else:
            shown.append(repr(value))
    when = time.strftime("%H:%M:%S", time.localtime(ts / 1e9))
    return f"{seq:>8} {when} {name:<11} {' '.join(shown)}"


def cmd_spool(args: argparse.Namespace) -> int:
    from zfsrep.spool import RunState, iter_records, read_identity, read_incomplete, spool_stats

    if args.spool_command != "show":
        raise UsageError("usage: zfsrep spool show SPOOL")
    identity = read_identity(args.spool)
    run = RunState.read(args.spool)
    daemon = None
    if run is not None:
        daemon = {"pid": run["pid"], "state": "stopped in order" if run["clean"] else
                  "running" if _alive(run["pid"]) else "died without a clean shutdown"}
    try:
        stats = spool_stats(args.spool)
    except CorruptDataError as e:
        if daemon is not None and daemon["state"] == "running":
            raise StateError(f"spool {args.spool} is being written by the mount daemon (pid "
                             f"{daemon['pid']}) and its last frame is not finished: try again, "
                             "or stop the mount first") from None
        raise e
    tail: list[list] = []
    if args.records > 0:
        for rec in iter_records(args.spool, allow_incomplete=True):
            tail.append(rec)
            if len(tail) > args.records:
                tail.pop(0)
    incomplete = read_incomplete(args.spool)
    if run is not None and daemon is not None and \
            daemon["state"] == "died without a clean shutdown" and incomplete is None:
        daemon["next_protect"] = _after_crash(run, stats)
    if args.json:
        out = dict(stats, source=identity.source, root_ident=identity.root_ident,
                   block_size=identity.block_size, incomplete=incomplete, daemon=daemon)
        print(json_text(out))
        return 0
    print(f"spool {args.spool}: volume {identity.source} (root inode {identity.root_ident})")
    if daemon is not None:
        print(f"  mount daemon: pid {daemon['pid']}, {daemon['state']}")
        if "next_protect" in daemon:
            print(f"  next protect: {daemon['next_protect']}")
    if incomplete is not None:
        print(f"  INCOMPLETE: capture stopped after record {incomplete.get('last_seq')} "
              f"({incomplete.get('reason')}, {incomplete.get('time')})")
    print(f"  {stats['segments']} segments, {stats['frames']} frames, {stats['records']} "
          f"records (seq {stats['first_seq']}..{stats['last_seq']}), {stats['bytes']} bytes "
          f"on disk for {stats['raw_bytes']} bytes of records")
    for rec in tail:
        print("  " + _describe(rec))
    return 0


def _after_crash(run: dict, stats: dict) -> str:
    """What the next ``protect`` of a spool whose daemon died will do."""
    from zfsrep.spool import after_crash

    spooled = stats.get("last_seq") or max((stats.get("first_seq") or 1) - 1, 0)
    lost, idents, why_not = after_crash(run, spooled)
    if lost is None:
        return "goes on (everything captured is in the spool)"
    if idents is None:
        return f"refuses ({why_not}) and marks the spool incomplete"
    return (f"records {len(idents)} file{'' if len(idents) == 1 else 's'} again (resync: "
            "their last changes are not in the spool)")


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running ``zfsrep protect`` (not another process given the pid
    of one that died)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"protect" in f.read().split(b"\0")
    except OSError:
        return False


COMMANDS = {"protect": cmd_protect, "replay": cmd_replay, "spool": cmd_spool}


def _command(name: str):
    from zfsrep import cli_journal

    return COMMANDS.get(name) or cli_journal.COMMANDS[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return ExitCode.USAGE
    _setup_logging(args)
    try:
        return _command(args.command)(args)
    except ZfsrepError as e:
        print(f"zfsrep: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"zfsrep: {NotFoundError(str(e))}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    except OSError as e:
        print(f"zfsrep: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return ExitCode.IO
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
