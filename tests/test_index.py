"""The volume index: views at any position equal replay of the stream up to it.

The oracle streams come from :class:`FsCapture`, which performs seeded random operations on a
real directory and records each one as the mount would (identities are inode numbers, times
are read back after the operation), so every stream is one a real filesystem accepted.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest
from treesnap import assert_same_tree, tree_snapshot

from zfsrep import syscalls
from zfsrep.blockstore import pack_path
from zfsrep.errors import CorruptDataError, NotFoundError, StateError
from zfsrep.index import (
    FALLOC_COLLAPSE_RANGE,
    FALLOC_INSERT_RANGE,
    FALLOC_KEEP_SIZE,
    FALLOC_PUNCH_HOLE,
    FALLOC_ZERO_RANGE,
    IndexView,
    VolumeIndex,
)
from zfsrep.records import RENAME_EXCHANGE, Op
from zfsrep.replay import Replayer
from zfsrep.restore import restore_tree

ROOT = 1000
T = 1_600_000_000_123_456_789
REG, DIR, LNK, FIFO = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO


class FsCapture:
    """Performs operations on a real directory and records them as records."""

    def __init__(self, source: Path) -> None:
        self.src = source
        self.records: list[list] = []
        self.root = os.lstat(source).st_ino
        self.open_unlinked: list[tuple[int, int]] = []  # (fd, ino) of unlinked open files
        st = os.lstat(source)
        self.emit(Op.SETATTR, self.root, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)

    def emit(self, op: int, *args: object) -> None:
        seq = len(self.records) + 1
        self.records.append([seq, 1_700_000_000_000_000_000 + seq, op, *args])

    def ino(self, p: Path) -> int:
        return os.lstat(p).st_ino

    def mt(self, p: Path) -> int:
        return os.lstat(p).st_mtime_ns

    def new(self, p: Path, kind: str, data: bytes = b"", target: bytes = b"") -> None:
        if kind == "file":
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif kind == "dir":
            os.mkdir(p, 0o755)
        elif kind == "link":
            os.symlink(target, p)
        elif kind == "fifo":
            os.mkfifo(p, 0o640)
        elif kind == "chr":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        st = os.lstat(p)
        self.emit(Op.NEW, self.ino(p.parent), os.fsencode(p.name), st.st_ino, st.st_mode,
                  st.st_uid, st.st_gid, st.st_rdev, target if kind == "link" else None,
                  st.st_mtime_ns, self.mt(p.parent))
        if data:
            self.write(p, 0, data)

    def write(self, p: Path, off: int, data: bytes) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, data, off)
            self.emit(Op.WRITE, os.fstat(fd).st_ino, off, data, None,
                      os.fstat(fd).st_mtime_ns)
        finally:
            os.close(fd)

    def truncate(self, p: Path, size: int) -> None:
        os.truncate(p, size)
        self.emit(Op.TRUNCATE, self.ino(p), size, self.mt(p))

    def fallocate(self, p: Path, mode: int, off: int, length: int) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            syscalls.fallocate(fd, mode, off, length)
            self.emit(Op.FALLOCATE, os.fstat(fd).st_ino, mode, off, length,
                      os.fstat(fd).st_mtime_ns)
        finally:
            os.close(fd)

    def link(self, p: Path, q: Path) -> None:
        os.link(p, q, follow_symlinks=False)
        self.emit(Op.LINK, self.ino(p), self.ino(q.parent), os.fsencode(q.name),
                  self.mt(q.parent))

    def remove(self, p: Path) -> None:
        ino, is_dir = self.ino(p), stat.S_ISDIR(os.lstat(p).st_mode)
        os.rmdir(p) if is_dir else os.unlink(p)
        self.emit(Op.REMOVE, self.ino(p.parent), os.fsencode(p.name), ino, self.mt(p.parent))

    def rename(self, p: Path, q: Path, flags: int = 0) -> None:
        ino = self.ino(p)
        other = self.ino(q) if os.path.lexists(q) else None
        if other == ino:
            return
        syscalls.renameat2(syscalls.AT_FDCWD, os.fsencode(p), syscalls.AT_FDCWD,
                           os.fsencode(q), flags)
        self.emit(Op.RENAME, self.ino(p.parent), os.fsencode(p.name), self.ino(q.parent),
                  os.fsencode(q.name), flags, ino, other, self.mt(p.parent), self.mt(q.parent))

    def setattr(self, p: Path, mode: int | None = None, uid: int | None = None,
                mtime: int | None = None) -> None:
        if uid is not None:
            os.chown(p, uid, uid, follow_symlinks=False)
        if mode is not None:
            os.chmod(p, mode)
        if mtime is not None:
            os.utime(p, ns=(mtime, mtime), follow_symlinks=False)
        st = os.lstat(p)
        self.emit(Op.SETATTR, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)

    def setxattr(self, p: Path, name: bytes, value: bytes | None) -> None:
        if value is None:
            try:
                os.removexattr(p, name)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
            self.emit(Op.REMOVEXATTR, self.ino(p), name)
        else:
            os.setxattr(p, name, value)
            self.emit(Op.SETXATTR, self.ino(p), name, value)

    def close(self) -> None:
        for fd, _ in self.open_unlinked:
            os.close(fd)
        self.open_unlinked.clear()


def text(rng: random.Random, n: int) -> bytes:
    words = [b"the", b"journal", b"keeps", b"every", b"write", b"checkpoint", b"volume",
             b"recovery", b"site", b"protected", b"block", b"of", b"a", b"file", b"and"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:n])


def payload(rng: random.Random, n: int) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return rng.randbytes(n)
    if kind < 0.8:
        return text(rng, n)
    return bytes(n)


def random_workload(cap: FsCapture, rng: random.Random, steps: int) -> None:
    src = cap.src
    for _ in range(steps):
        files, dirs = [], [src]
        for dp, dn, fn in os.walk(src):
            dirs += [Path(dp, d) for d in dn]
            files += [Path(dp, f) for f in fn]
        regs = [f for f in files if stat.S_ISREG(os.lstat(f).st_mode)]
        op = rng.choices(
            ["create", "write", "pwrite", "truncate", "falloc", "link", "unlink", "rename",
             "exchange", "mkdir", "rmdir", "attr", "xattr", "special", "unlinked_write"],
            [6, 8, 8, 4, 4, 2, 3, 3, 1, 2, 1, 2, 2, 1, 1])[0]
        name = f"n{rng.randrange(25)}"
        try:
            if op == "create" or (op in ("write", "pwrite", "truncate", "falloc", "link",
                                         "unlinked_write") and not regs):
                p = rng.choice(dirs) / name
                if not os.path.lexists(p):
                    cap.new(p, "file", payload(rng, rng.choice([0, 10, 4096, 9000, 70000])))
            elif op == "write":
                p = rng.choice(regs)
                off = rng.choice([0, 4096, rng.randrange(200_000)])
                cap.write(p, off, payload(rng, rng.choice([1, 100, 4096, 5000, 150_000])))
            elif op == "pwrite":  # small writes inside existing blocks
                p = rng.choice(regs)
                size = os.lstat(p).st_size
                cap.write(p, rng.randrange(size + 1), payload(rng, rng.randrange(1, 300)))
            elif op == "truncate":
                p = rng.choice(regs)
                cap.truncate(p, rng.choice([0, rng.randrange(300_000), rng.randrange(5000)]))
            elif op == "falloc":
                p = rng.choice(regs)
                size = os.lstat(p).st_size
                mode = rng.choice([0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                                   FALLOC_ZERO_RANGE, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE,
                                   FALLOC_COLLAPSE_RANGE, FALLOC_INSERT_RANGE])
                if mode in (FALLOC_COLLAPSE_RANGE, FALLOC_INSERT_RANGE):
                    if size < 3 * 4096:
                        continue
                    off = rng.randrange(size // 4096 - 1) * 4096
                    length = 4096 * rng.randrange(1, max(2, (size - off) // 4096))
                    if mode == FALLOC_COLLAPSE_RANGE and off + length >= size:
                        continue
                else:
                    off = rng.randrange(size + 10_000)
                    length = rng.randrange(1, 40_000)
                cap.fallocate(p, mode, off, length)
            elif op == "link":
                cap.link(rng.choice(regs), rng.choice(dirs) / name)
            elif op == "unlink" and files:
                cap.remove(rng.choice(files))
            elif op == "rename" and files + dirs[1:]:
                p = rng.choice(files + dirs[1:])
                q = rng.choice(dirs) / name
                if p.is_dir() and not p.is_symlink() and (q.parent == p or p in q.parents):
                    continue
                cap.rename(p, q)
            elif op == "exchange" and len(files + dirs[1:]) >= 2:
                p, q = rng.sample(files + dirs[1:], 2)
                if p in q.parents or q in p.parents:
                    continue
                cap.rename(p, q, RENAME_EXCHANGE)
            elif op == "mkdir":
                p = rng.choice(dirs) / f"d{rng.randrange(6)}"
                if not os.path.lexists(p):
                    cap.new(p, "dir")
            elif op == "rmdir" and len(dirs) > 1:
                cap.remove(rng.choice(dirs[1:]))
            elif op == "attr" and files + dirs:
                p = rng.choice(files + dirs)
                if stat.S_ISLNK(os.lstat(p).st_mode):
                    cap.setattr(p, uid=rng.randrange(3))
                else:
                    cap.setattr(p, mode=rng.choice([0o600, 0o755, 0o4711, 0o1777]),
                                uid=rng.randrange(3), mtime=T + rng.randrange(10**9))
            elif op == "xattr" and regs + dirs:
                p = rng.choice(regs + dirs)
                cap.setxattr(p, b"user.x%d" % rng.randrange(3),
                             None if rng.random() < 0.3 else rng.randbytes(rng.randrange(50)))
            elif op == "special":
                p = rng.choice(dirs) / name
                if not os.path.lexists(p):
                    kind = rng.choice(["link", "fifo", "chr"])
                    cap.new(p, kind, target=rng.choice([b"/etc/passwd", b"../../x", b"n1"]))
            elif op == "unlinked_write":
                p = rng.choice(regs)
                fd = os.open(p, os.O_RDWR)
                ino = os.fstat(fd).st_ino
                nlink = os.fstat(fd).st_nlink
                cap.remove(p)
                os.pwrite(fd, b"ghost", 0)
                cap.emit(Op.WRITE, ino, 0, b"ghost", None, os.fstat(fd).st_mtime_ns)
                if nlink == 1:
                    cap.open_unlinked.append((fd, ino))
                else:
                    os.close(fd)
                if len(cap.open_unlinked) > 3:
                    os.close(cap.open_unlinked.pop(0)[0])
        except OSError as e:
            assert e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EISDIR,
                               errno.ENOTDIR, errno.EINVAL, errno.EXDEV), e


# ---- helpers ----------------------------------------------------------------------------
def index_in_frames(voldir: Path, root: int, records: list[list], rng: random.Random,
                    ) -> VolumeIndex:
    idx = VolumeIndex(voldir, root)
    i = 0
    while i < len(records):
        n = rng.randrange(1, 40)
        idx.apply(records[i:i + n])
        idx.commit()
        i += n
    assert idx.indexed_seq == len(records)
    return idx


def replay_to(dest: Path, root: int, records: list[list]) -> Path:
    dest.mkdir()
    Replayer(dest, root).apply_all(records)
    return dest


def restored_at(voldir: Path, seq: int, dest: Path) -> Path:
    with IndexView(voldir, seq) as v:
        restore_tree(v, b"/", dest)
    return dest


class Stream:
    def __init__(self) -> None:
        self.records: list[list] = []

    def add(self, op: int, *args: object) -> Stream:
        seq = len(self.records) + 1
        self.records.append([seq, 1_700_000_000_000_000_000 + seq, op, *args])
        return self

    def new(self, parent: int, name: bytes, ident: int, mode: int, *, target=None,
            mtime: int = T) -> Stream:
        return self.add(Op.NEW, parent, name, ident, mode, 0, 0, 0, target, mtime, T)

    def write(self, ident: int, offset: int, data: bytes, mtime: int = T) -> Stream:
        return self.add(Op.WRITE, ident, offset, data, None, mtime)


def check_against_replay(tmp_path: Path, root: int, records: list[list], cuts, tag=""):
    voldir = tmp_path / f"vol{tag}"
    idx = index_in_frames(voldir, root, records, random.Random(len(records)))
    idx.close()
    for s in cuts:
        expected = replay_to(tmp_path / f"replay{tag}-{s}", root, records[:s])
        actual = restored_at(voldir, s, tmp_path / f"restored{tag}-{s}")
        assert_same_tree(expected, actual, f"index view at {s}")


# ---- the oracle: random workloads on a real filesystem -------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_views_at_random_cuts_equal_replay(tmp_path: Path, seed: int):
    src = tmp_path / "source"
    src.mkdir()
    cap = FsCapture(src)
    rng = random.Random(seed)
    random_workload(cap, rng, 250)
    cap.close()
    n = len(cap.records)
    cuts = sorted({1, n // 7, n // 3, n // 2, (2 * n) // 3, n - 1, n,
                   *rng.sample(range(1, n + 1), 4)})
    check_against_replay(tmp_path, cap.root, cap.records, cuts)
    assert_same_tree(src, tmp_path / f"restored-{n}", "restored newest checkpoint")


def test_every_position_of_a_short_stream(tmp_path: Path):
    src = tmp_path / "source"
    src.mkdir()
    cap = FsCapture(src)
    random_workload(cap, random.Random(99), 40)
    cap.close()
    check_against_replay(tmp_path, cap.root, cap.records, range(1, len(cap.records) + 1))


# ---- hand-built streams for the tricky operations ---------------------------------------------
def test_partial_writes_truncate_down_up_and_fallocate(tmp_path: Path):
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"f", 11, REG | 0o644)
    s.write(11, 0, b"A" * 10000)
    s.write(11, 100, b"b" * 50)              # inside block 0
    s.write(11, 4090, b"c" * 20)             # across blocks 0 and 1
    s.add(Op.TRUNCATE, 11, 5000, T)          # block 1 cut in the middle
    s.add(Op.TRUNCATE, 11, 9000, T)          # up again: the tail reads as zeros
    s.write(11, 20000, b"sparse tail")       # a hole between
    s.add(Op.FALLOCATE, 11, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 50, 100, T)
    s.add(Op.FALLOCATE, 11, FALLOC_ZERO_RANGE, 19000, 10000, T)  # extends the size
    s.add(Op.FALLOCATE, 11, FALLOC_KEEP_SIZE, 0, 1 << 20, T)
    s.write(11, 0, b"x" * 12288)
    s.add(Op.FALLOCATE, 11, FALLOC_COLLAPSE_RANGE, 4096, 4096, T)
    s.add(Op.FALLOCATE, 11, FALLOC_INSERT_RANGE, 0, 8192, T)
    s.write(11, 9000, b"after insert")
    s.add(Op.TRUNCATE, 11, 4097, T)
    s.write(11, 8192, b"!")
    check_against_replay(tmp_path, ROOT, s.records, range(1, len(s.records) + 1))


def test_unaligned_shift_moves_bytes(tmp_path: Path):
    """A collapse by less than a block (1 KiB filesystems) is applied byte-exactly."""
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T).new(ROOT, b"f", 11, REG | 0o644)
    data = bytes(range(256)) * 40
    s.write(11, 0, data)
    s.add(Op.FALLOCATE, 11, FALLOC_COLLAPSE_RANGE, 1024, 1024, T)
    s.add(Op.FALLOCATE, 11, FALLOC_INSERT_RANGE, 2048, 3072, T)
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(s.records)
    idx.commit()
    idx.close()
    expect = data[:1024] + data[2048:]
    expect = expect[:2048] + bytes(3072) + expect[2048:]
    with IndexView(voldir, len(s.records)) as v:
        assert v.read(11, 0, 1 << 20) == expect
    with IndexView(voldir, 4) as v4:
        assert v4.read(11, 0, 1 << 20) == data[:1024] + data[2048:]
    with IndexView(voldir, 3) as v3:
        assert v3.read(11, 0, 1 << 20) == data


def test_reused_identity_starts_empty(tmp_path: Path):
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T).new(ROOT, b"a", 11, REG | 0o644)
    s.write(11, 0, b"old content" * 1000).add(Op.SETXATTR, 11, b"user.old", b"1")
    s.add(Op.REMOVE, ROOT, b"a", 11, T)
    s.new(ROOT, b"b", 11, REG | 0o600)       # the inode number comes back
    s.write(11, 8192, b"new")                # blocks 0 and 1 must read as holes
    s.write(11, 10, b"x")                    # partial write into a block of the old life
    check_against_replay(tmp_path, ROOT, s.records, range(1, len(s.records) + 1))
    with IndexView(tmp_path / "vol", len(s.records)) as v:
        node = v.lookup(ROOT, b"b")
        assert v.read(node.ident, 0, 20) == bytes(10) + b"x" + bytes(9)
        buf = bytearray(b"\xee" * 30000)
        assert v.read_into(node.ident, 0, 30000, buf) == 8195
        assert buf[:8195] == bytes(10) + b"x" + bytes(8181) + b"new"
        assert v.read_into(node.ident, 9000, 100, buf) == 0
        assert v.listxattr(node.ident) == []


def test_renames_exchange_links_and_nlink(tmp_path: Path):
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"d", 12, DIR | 0o755).new(12, b"sub", 13, DIR | 0o700)
    s.new(ROOT, b"f", 11, REG | 0o644).write(11, 0, b"file")
    s.add(Op.LINK, 11, 12, b"f2", T).add(Op.LINK, 11, 13, b"f3", T)
    s.new(ROOT, b"g", 14, REG | 0o644).write(14, 0, b"g")
    s.add(Op.RENAME, ROOT, b"f", ROOT, b"d", RENAME_EXCHANGE, 11, 12, T, T)
    s.add(Op.RENAME, ROOT, b"g", 13, b"f3", 0, 14, 11, T, T)   # replaces one link of 11
    s.add(Op.RENAME, 12, b"sub", ROOT, b"sub2", 0, 13, None, T, T)
    check_against_replay(tmp_path, ROOT, s.records, range(1, len(s.records) + 1))
    with IndexView(tmp_path / "vol", len(s.records)) as v:
        assert v.getattr(11).nlink == 2
        assert v.getattr(ROOT).nlink == 4  # ., d, sub2
        assert v.getattr(12).nlink == 2
        assert [n for n, _ in v.readdir(ROOT)] == [b"d", b"f", b"sub2"]
        assert [n for n, _ in v.readdir(ROOT, after=b"d", limit=1)] == [b"f"]
    with IndexView(tmp_path / "vol", 9) as v:   # before the exchange
        assert v.getattr(11).nlink == 3
        assert v.getattr(12).nlink == 3
        assert v.lookup(ROOT, b"f").ident == 11


def test_writes_to_unlinked_open_files_are_skipped(tmp_path: Path):
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T).new(ROOT, b"f", 11, REG | 0o644)
    s.write(11, 0, b"before").add(Op.REMOVE, ROOT, b"f", 11, T)
    s.write(11, 0, b"while unlinked").add(Op.TRUNCATE, 11, 0, T)
    s.add(Op.SETATTR, 11, REG | 0o600, 0, 0, T).write(77, 0, b"never named")
    check_against_replay(tmp_path, ROOT, s.records, range(1, len(s.records) + 1))
    with IndexView(tmp_path / "vol", 3) as v:
        assert v.read(11, 0, 100) == b"before"
    with IndexView(tmp_path / "vol", 5) as v, pytest.raises(NotFoundError):
        v.getattr(11)


# ---- positions, crashes, hostile input ------------------------------------------------------
def _simple(n_files: int = 5) -> Stream:
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    for i in range(n_files):
        s.new(ROOT, b"f%d" % i, 100 + i, REG | 0o644).write(100 + i, 0, b"%d" % i * 5000)
    return s


def test_view_of_unindexed_position_or_missing_volume_is_refused(tmp_path: Path):
    with pytest.raises(NotFoundError):
        IndexView(tmp_path / "nothing", 0)
    s = _simple()
    idx = VolumeIndex(tmp_path / "vol", ROOT)
    idx.apply(s.records[:4])
    with pytest.raises(StateError):
        IndexView(tmp_path / "vol", 1)  # applied, not committed
    idx.commit()
    IndexView(tmp_path / "vol", 4).close()
    with pytest.raises(StateError):
        IndexView(tmp_path / "vol", 5)
    idx.close()


def test_old_views_stay_correct_while_indexing_goes_on(tmp_path: Path):
    s = _simple(1)
    for i in range(20):
        s.write(100, 0, b"v%02d" % i * 3000).add(Op.TRUNCATE, 100, 1000 + i, T)
    idx = VolumeIndex(tmp_path / "vol", ROOT)
    idx.apply(s.records[:4])
    idx.commit()
    view = IndexView(tmp_path / "vol", 4)  # open before the rest is indexed
    first = view.read(100, 0, 1 << 20)
    for i in range(4, len(s.records), 3):
        idx.apply(s.records[i:i + 3])
        idx.commit()
    assert view.read(100, 0, 1 << 20) == first == b"v00" * 3000
    for i in range(20):
        with IndexView(tmp_path / "vol", 5 + 2 * i) as v:
            assert v.read(100, 0, 1 << 20) == (b"v%02d" % i * 3000)[:1000 + i]
    view.close()
    idx.close()


def test_reopen_after_a_crash_keeps_the_committed_state_and_continues(tmp_path: Path):
    s = _simple(8)
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(s.records[:7])
    idx.commit()
    committed = idx.stats()["data_bytes"]
    idx.apply(s.records[7:12])  # applied, never committed: lost in the crash
    idx.packs.sync()
    # a crash: the process dies (no close), the pack has a garbage tail
    with open(pack_path(voldir, 0), "ab") as f:
        f.write(os.urandom(5000))
    idx.db.close()
    idx = VolumeIndex(voldir, ROOT)
    assert idx.indexed_seq == 7
    assert idx.stats()["data_bytes"] == committed
    idx.apply(s.records[7:])
    idx.commit()
    idx.close()
    check_against_replay(tmp_path, ROOT, s.records, [len(s.records)], tag="again")
    for seq in (7, len(s.records)):
        expected = replay_to(tmp_path / f"e{seq}", ROOT, s.records[:seq])
        assert_same_tree(expected, restored_at(voldir, seq, tmp_path / f"r{seq}"))


def test_reopen_with_another_root_is_refused(tmp_path: Path):
    VolumeIndex(tmp_path / "vol", ROOT).close()
    with pytest.raises(StateError):
        VolumeIndex(tmp_path / "vol", ROOT + 1)


HOSTILE = {
    "gap": lambda s: s.records[-1].__setitem__(0, 99),
    "empty name": lambda s: s.new(ROOT, b"", 50, REG | 0o644),
    "dot": lambda s: s.new(ROOT, b".", 50, REG | 0o644),
    "dotdot": lambda s: s.new(ROOT, b"..", 50, DIR | 0o755),
    "slash": lambda s: s.new(ROOT, b"a/b", 50, REG | 0o644),
    "nul": lambda s: s.new(ROOT, b"a\0b", 50, REG | 0o644),
    "str name": lambda s: s.new(ROOT, "text", 50, REG | 0o644),
    "unknown parent": lambda s: s.new(999, b"x", 50, REG | 0o644),
    "file as parent": lambda s: s.new(100, b"x", 50, REG | 0o644),
    "live ident": lambda s: s.new(ROOT, b"x", 101, REG | 0o644),
    "root ident": lambda s: s.new(ROOT, b"x", ROOT, DIR | 0o755),
    "existing name": lambda s: s.new(ROOT, b"f1", 50, REG | 0o644),
    "link unknown": lambda s: s.add(Op.LINK, 999, ROOT, b"x", T),
    "link dir": lambda s: s.new(ROOT, b"d", 60, DIR | 0o755).add(Op.LINK, 60, ROOT, b"y", T),
    "remove wrong id": lambda s: s.add(Op.REMOVE, ROOT, b"f1", 102, T),
    "rmdir nonempty": lambda s: s.new(ROOT, b"d", 60, DIR | 0o755).new(60, b"z", 61, REG)
    .add(Op.REMOVE, ROOT, b"d", 60, T),
    "rename into itself": lambda s: s.new(ROOT, b"d", 60, DIR | 0o755)
    .new(60, b"e", 61, DIR | 0o755).add(Op.RENAME, ROOT, b"d", 61, b"x", 0, 60, None, T, T),
    "rename wrong other": lambda s: s.add(Op.RENAME, ROOT, b"f1", ROOT, b"f2", 0, 101, None,
                                          T, T),
    "write to dir": lambda s: s.write(ROOT, 0, b"x"),
    "negative offset": lambda s: s.write(101, -1, b"x"),
    "unknown op": lambda s: s.add(42, 1, 2),
    "short record": lambda s: s.records.append([len(s.records) + 1, 0]),
    "missing args": lambda s: s.add(Op.TRUNCATE, 101),
    "setattr type change": lambda s: s.add(Op.SETATTR, 101, DIR | 0o755, 0, 0, T),
    "bad xattr name": lambda s: s.add(Op.SETXATTR, 101, b"noprefix", b"v"),
    "punch without keep": lambda s: s.add(Op.FALLOCATE, 101, FALLOC_PUNCH_HOLE, 0, 10, T),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_records_are_refused_and_change_nothing(tmp_path: Path, case: str):
    base = _simple(3)
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(base.records)
    idx.commit()
    before = restored_at(voldir, idx.indexed_seq, tmp_path / "before")
    data_before = idx.stats()["data_bytes"]
    bad = Stream()
    bad.records = [list(r) for r in base.records]
    bad.write(100, 0, b"good record in the same batch" * 300)
    HOSTILE[case](bad)
    batch = bad.records[len(base.records):]
    with pytest.raises(CorruptDataError):
        idx.apply(batch)
    idx.commit()
    assert idx.indexed_seq == len(base.records)
    assert idx.stats()["data_bytes"] == data_before
    assert tree_snapshot(restored_at(voldir, idx.indexed_seq, tmp_path / "after")) == \
        tree_snapshot(before)
    # the stream goes on as if the batch had never come
    more = Stream()
    more.records = [list(r) for r in base.records]
    more.write(101, 0, b"next")
    idx.apply(more.records[-1:])
    idx.commit()
    idx.close()
    check_against_replay(tmp_path, ROOT, more.records, [len(more.records)], tag="more")


def test_a_refused_batch_keeps_earlier_uncommitted_batches(tmp_path: Path):
    s = _simple(4)
    idx = VolumeIndex(tmp_path / "vol", ROOT)
    idx.apply(s.records[:5])
    with pytest.raises(CorruptDataError):
        idx.apply([[6, 0, Op.NEW, ROOT, b"..", 50, REG, 0, 0, 0, None, T, T]])
    idx.apply(s.records[5:])
    idx.commit()
    idx.close()
    check_against_replay(tmp_path, ROOT, s.records, [len(s.records)], tag="x")


# ---- cost and size ------------------------------------------------------------------------------
def test_reading_an_old_checkpoint_costs_what_the_newest_does(tmp_path: Path):
    """Not timed: the number of SQL statements and pack reads for reading one file is the
    same at an old position as at the newest, however often its blocks were rewritten."""
    s = _simple(1)
    s.write(100, 0, os.urandom(1 << 20))
    old = len(s.records)
    rng = random.Random(5)
    for _ in range(300):
        s.write(100, rng.randrange(256) * 4096, os.urandom(8192))
    idx = VolumeIndex(tmp_path / "vol", ROOT)
    idx.apply(s.records)
    idx.commit()
    idx.close()
    costs = []
    for seq in (old, len(s.records)):
        with IndexView(tmp_path / "vol", seq) as v:
            assert len(v.read(100, 0, 1 << 20)) == 1 << 20
            costs.append((v.queries, v.packs.preads))
    assert costs[0][0] == costs[1][0] == 2  # getattr + one block-range query
    assert costs[0][1] <= 1 and costs[1][1] <= costs[0][1] + 128  # coalesced preads


def _ratio(tmp_path: Path, make) -> float:
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    written = 0
    for i in range(40):
        s.new(ROOT, b"f%d" % i, 100 + i, REG | 0o644)
        for off in range(0, 256 * 1024, 64 * 1024):
            data = make(64 * 1024)
            s.write(100 + i, off, data)
            written += len(data)
    idx = VolumeIndex(tmp_path / "vol", ROOT)
    for i in range(0, len(s.records), 50):
        idx.apply(s.records[i:i + 50])
        idx.commit()
    st = idx.stats()
    idx.close()
    return (st["data_bytes"] + st["index_bytes"]) / written


def test_store_bytes_per_written_byte(tmp_path: Path):
    rng = random.Random(1)
    assert _ratio(tmp_path / "r", os.urandom) <= 1.05
    assert _ratio(tmp_path / "t", lambda n: text(rng, n)) <= 0.5


def test_small_reads_in_any_order_equal_the_file_at_every_position(tmp_path: Path,
                                                                   monkeypatch):
    """Reads are served from a window of block rows fetched by one query: reads across
    windows, backwards, of two files in turn and at two positions see exactly the data."""
    from zfsrep import indexview

    monkeypatch.setattr(indexview, "MAP_WINDOW", 5)
    rng = random.Random(7)
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"a", 11, REG | 0o644).new(ROOT, b"b", 12, REG | 0o644)
    model = {11: bytearray(), 12: bytearray()}
    states = {}
    for _ in range(40):
        ident = rng.choice((11, 12))
        off, data = rng.randrange(0, 30 * 4096), rng.randbytes(rng.randrange(1, 20000))
        s.write(ident, off, data)
        f = model[ident]
        f.extend(bytes(max(0, off + len(data) - len(f))))
        f[off:off + len(data)] = data
        states[len(s.records)] = {k: bytes(v) for k, v in model.items()}
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(s.records)
    idx.commit()
    idx.close()
    for seq in (sorted(states)[10], len(s.records)):
        with IndexView(voldir, seq) as v:
            for _ in range(300):
                ident = rng.choice((11, 12))
                want = states[seq][ident]
                off = rng.randrange(0, len(want) + 4096)
                size = rng.choice((1, 100, 4096, 4097, 30000, 131072))
                assert v.read(ident, off, size) == want[off:off + size], (seq, ident, off)
                # the snapshot mount's way: into a reused buffer holding an earlier answer
                # (holes must be zeroed, not left as they were)
                buf = bytearray(b"\xee" * size)
                n = v.read_into(ident, off, size, buf)
                assert bytes(buf[:n]) == want[off:off + size], (seq, ident, off, "into")



def test_pack_compression_backs_off_on_random_data_and_resumes_on_text() -> None:
    """Group compression on the indexer's workers: a long run of random groups is tried only
    at probes that grow further apart (almost no compression time), and compressible groups
    after it are compressed again within PROBE_MAX groups."""
    from concurrent.futures import ThreadPoolExecutor

    from zfsrep import blockstore

    tried = []

    class Counting:
        def __init__(self, real) -> None:
            self.real = real

        def compress(self, raw):
            tried.append(len(raw))
            return self.real.compress(raw)

    def run() -> None:
        blockstore._compress_all([b"x"])  # this thread's compressor and state
        blockstore._local.cctx = Counting(blockstore._local.cctx)
        rng = random.Random(7)
        groups = [rng.randbytes(blockstore.GROUP_RAW_MAX) for _ in range(72)]
        for i in range(500):
            blockstore._compress_all(groups[i % 64:i % 64 + 8])
        assert len(tried) < 40, len(tried)  # of 4000 (a fixed 1 in 17 would try 235)
        line = b"the quick brown fox jumps over the lazy dog\n"
        text = (line * (blockstore.GROUP_RAW_MAX // len(line) + 1))[:blockstore.GROUP_RAW_MAX]
        outs = [blockstore._compress_all([text])[0] for _ in range(blockstore.PROBE_MAX + 8)]
        first = next(i for i, o in enumerate(outs) if len(o) < len(text) // 2)
        assert first <= blockstore.PROBE_MAX
        assert all(len(o) < len(text) // 2 for o in outs[first:])  # compressing again

    with ThreadPoolExecutor(1) as pool:  # fresh thread-local state, as a worker has
        pool.submit(run).result()


def test_extents_from_one_row_per_run_equal_the_block_by_block_ones(tmp_path: Path):
    """IndexView.extents takes runs of blocks from SQLite (one row per run) when no block of
    the range has two versions or a hole; the extents are then those the block rows give,
    and a range where a block was rewritten, truncated or holed falls back to them."""
    rng = random.Random(11)
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"a", 11, REG | 0o644).new(ROOT, b"b", 12, REG | 0o644)
    for i in range(8):  # b: written once, front to back, a short last block
        s.write(12, i * 70_000, rng.randbytes(70_000) if i % 2 else b"text " * 14_000)
    for _ in range(30):  # a: overwrites, truncates down and up, holes
        what = rng.random()
        if what < 0.15:
            s.add(Op.TRUNCATE, 11, rng.randrange(0, 40 * 4096), T)
        else:
            off = rng.randrange(0, 40 * 4096)
            data = rng.randbytes(rng.randrange(1, 60_000)) if what < 0.6 else \
                b"abc" * rng.randrange(1, 20_000)
            s.write(11, off, data)
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(s.records)
    idx.commit()
    idx.close()
    used = {"runs": 0, "rows": 0}
    for seq in range(4, len(s.records) + 1):
        with IndexView(voldir, seq) as v:
            for ident in (11, 12):
                size = v.getattr(ident).size
                for off, n in ((0, size + 1), (4095, 5 * 4096 + 7), (size // 3, size)):
                    fast = v.extents(ident, off, n)
                    runs = v._whole_runs(ident, v._node(ident)[1], off // 4096,
                                         max(off, min(size, off + n) - 1) // 4096)
                    used["runs" if runs is not None else "rows"] += 1
                    end, rows = v._range(ident, off, n)
                    assert fast == v._extents(v._runs(rows, off, end)), (seq, ident, off, n)
                    got = bytearray(max(0, end - off))
                    for at, length, pack_no, src in fast:
                        got[at - off:at - off + length] = src if pack_no is None else \
                            os.pread(v.pack_fd(pack_no), length, src)
                    assert bytes(got) == v.read(ident, off, n), (seq, ident, off, n)
    assert used["runs"] > 20 and used["rows"] > 20, used
