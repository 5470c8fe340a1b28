"""``mount.zfsrep``: the mount(8) helper, so that a protected mount can be an fstab entry or a
systemd mount unit::

    # /etc/fstab
    /srv/data  /srv/data  zfsrep  spool=/var/lib/zfsrep/data,vpg=prod,server=10.0.0.5:7450  0 0

mount(8) runs ``/sbin/mount.zfsrep SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`` for file system
type ``zfsrep`` (link ``/sbin/mount.zfsrep`` to the installed script: ``make mount-helper``).
The helper turns the options into ``zfsrep protect MOUNTPOINT --source SOURCE ...`` and returns
once the mount serves, as that command does; ``umount MOUNTPOINT`` stops it (everything
captured is flushed first).

Options (comma separated; ``=`` values may not contain commas):

========================  ==========================================================
``spool=DIR``             ``--spool`` (required unless ``vpg`` is given)
``vpg=NAME``              ``--vpg``; ``volume=VOL`` and ``server=HOST:PORT`` with it
``memory_limit=MIB``      ``--memory-limit`` (``memory-limit`` also accepted)
``spool_limit=MIB``       ``--spool-limit``
``log=FILE``              ``--log``
``allow_other``           ``--allow-other``
========================  ==========================================================

What mount(8) and systemd pass for every file system is accepted and has no effect here:
``defaults``, ``rw``, ``auto``, ``noauto``, ``nofail``, ``_netdev``, ``nosuid``, ``nodev``,
``noexec``, ``suid``, ``dev``, ``exec``, ``atime``, ``noatime``, ``relatime``, ``user_xattr``,
``comment=...`` and ``x-...`` (the protected mount is always ``nosuid,nodev``, and the
kernel's writeback cache owns access times). ``ro`` is refused: a protected mount exists to
capture changes. Any other option is an error, unless ``-s`` (sloppy) is given.

Exit codes follow mount(8): 0 mounted, 1 bad invocation or options, 32 the mount failed (the
one-line reason is printed, as ``zfsrep protect`` prints it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = 1
MOUNT_FAILURE = 32

_VALUED: dict[str, str] = {
    "spool": "--spool", "vpg": "--vpg", "volume": "--volume", "server": "--server",
    "memory_limit": "--memory-limit", "memory-limit": "--memory-limit",
    "spool_limit": "--spool-limit", "spool-limit": "--spool-limit", "log": "--log",
}
_FLAGS = {"allow_other": "--allow-other"}
_IGNORED = {"defaults", "rw", "auto", "noauto", "nofail", "_netdev", "nosuid", "nodev",
            "noexec", "suid", "dev", "exec", "atime", "noatime", "relatime", "user_xattr"}


class HelperError(Exception):
    """Bad invocation or options: one line, exit code 1."""


def protect_argv(source: str, mountpoint: str, options: str, sloppy: bool = False
                 ) -> list[str]:
    """The ``zfsrep`` command line that mounts ``source`` at ``mountpoint`` with the mount
    options ``options`` (see the module docstring)."""
    argv = ["protect", mountpoint, "--source", source]
    seen: set[str] = set()
    for opt in filter(None, options.split(",")):
        key, eq, value = opt.partition("=")
        if key in _VALUED:
            if not eq or not value:
                raise HelperError(f"option {key} needs a value ({key}=...)")
            flag = _VALUED[key]
            if flag in seen:
                raise HelperError(f"option {key} given twice")
            seen.add(flag)
            argv += [flag, value]
        elif key in _FLAGS and not eq:
            argv.append(_FLAGS[key])
        elif key == "ro" and not eq:
            raise HelperError("a protected mount cannot be read-only (option ro); mount a "
                              "checkpoint with 'zfsrep snapshot mount' to browse")
        elif (key in _IGNORED and not eq) or key == "comment" or key.startswith("x-"):
            continue
        elif not sloppy:
            raise HelperError(f"unknown option {opt!r} (see 'zfsrep protect --help' and "
                              "the mount helper's options in the README)")
    if "--spool" not in seen and "--vpg" not in seen:
        raise HelperError("option spool=DIR (or vpg=NAME) is required")
    return argv


def parse_args(args: list[str]) -> tuple[str, str, str, dict[str, bool]]:
    """mount(8)'s calling convention: SOURCE MOUNTPOINT, then -s -f -n -v, -o OPTIONS (also
    -oOPTIONS), -t TYPE and -N NAMESPACE, in any order after the two names."""
    names: list[str] = []
    options: list[str] = []
    flags = {"sloppy": False, "fake": False, "verbose": False}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 >= len(args):
                raise HelperError(f"{a} needs a value")
            if a == "-o":
                options.append(args[i + 1])
            elif a == "-N":
                raise HelperError("mounting in another namespace (-N) is not supported")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a.startswith("-") and len(a) > 1 and a != "--":
            for ch in a[1:]:
                if ch == "s":
                    flags["sloppy"] = True
                elif ch == "f":
                    flags["fake"] = True
                elif ch == "v":
                    flags["verbose"] = True
                elif ch != "n":  # -n: no /etc/mtab, which nothing here writes anyway
                    raise HelperError(f"unknown flag -{ch}")
        else:
            names.append(a)
        i += 1
    if len(names) != 2:
        raise HelperError("usage: mount.zfsrep SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]")
    return names[0], names[1], ",".join(options), flags


def main(argv: list[str] | None = None,
         run: Callable[[list[str]], int] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        source, mountpoint, options, flags = parse_args(args)
        command = protect_argv(source, mountpoint, options, flags["sloppy"])
    except HelperError as e:
        print(f"mount.zfsrep: {e}", file=sys.stderr)
        return USAGE
    if flags["verbose"] or flags["fake"]:
        print("zfsrep " + " ".join(command), file=sys.stderr)
    if flags["fake"]:
        return 0
    if run is None:
        from zfsrep.cli import main as run
    code = run(command)
    if code == 0:
        return 0
    return USAGE if code == 2 else MOUNT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
