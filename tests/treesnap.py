"""A comparable description of a directory tree: the oracle of replay and passthrough tests."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_snapshot(root: Path, *, times: bool = True) -> dict[str, tuple]:
    """relative path -> (kind, mode, uid, gid, size, mtime_ns, content, xattrs, link group).

    ``content`` is a SHA-256 of file data, a symlink's target, or the device number; the link
    group names the first path (in sorted order) of a hard-linked file, so two trees compare
    equal when their hard-link structure is the same.
    """
    out: dict[str, tuple] = {}
    first_path: dict[int, str] = {}
    rootb = os.fsencode(root)

    def visit(path: bytes, rel: str) -> None:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            content: object = h.hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            content = st.st_rdev
        else:
            content = None
        xattrs: tuple = ()
        if not stat.S_ISLNK(st.st_mode):
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
        group = None
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            group = first_path.setdefault(st.st_ino, rel)
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
        mtime = st.st_mtime_ns if times else None
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, mtime, content,
                    xattrs, group)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, f"{rel}/{os.fsdecode(name)}" if rel else
                      os.fsdecode(name))

    visit(rootb, "")
    return out


def diff_trees(a: dict[str, tuple], b: dict[str, tuple], limit: int = 20) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    fields = ("kind", "mode", "uid", "gid", "size", "mtime", "content", "xattrs", "link")
    out = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a:
            out.append(f"only in second: {rel!r}")
        elif rel not in b:
            out.append(f"only in first: {rel!r}")
        elif a[rel] != b[rel]:
            diffs = [f"{f}: {x!r} != {y!r}" for f, x, y in zip(fields, a[rel], b[rel], strict=True)
                     if x != y]
            out.append(f"{rel!r}: " + "; ".join(diffs))
        if len(out) >= limit:
            break
    return out


def assert_same_tree(expected: Path, actual: Path, what: str = "replayed tree") -> None:
    """Fail with the first differences if ``actual`` does not equal ``expected``."""
    diffs = diff_trees(tree_snapshot(expected), tree_snapshot(actual))
    assert not diffs, f"{what} differs from the backing directory:\n" + "\n".join(diffs)
