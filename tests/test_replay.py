"""Replayer on hand-built record lists: every operation, and hostile streams."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from treesnap import tree_snapshot

from zfsrep.errors import CorruptDataError, UnsafePathError
from zfsrep.records import RENAME_EXCHANGE, Op
from zfsrep.replay import Replayer

ROOT = 1000
T = 1_600_000_000_123_456_789  # an mtime with nanoseconds
REG, DIR, LNK, FIFO = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO


class Stream:
    """Builds records [seq, time_ns, op, *args] with consecutive seqs."""

    def __init__(self) -> None:
        self.records: list[list] = []

    def add(self, op: int, *args: object) -> Stream:
        seq = len(self.records) + 1
        self.records.append([seq, 1_700_000_000_000_000_000 + seq, op, *args])
        return self

    def new(self, parent: int, name: bytes, ident: int, mode: int, *, uid: int = 0,
            gid: int = 0, rdev: int = 0, target: bytes | None = None, mtime: int = T,
            parent_mtime: int = T) -> Stream:
        return self.add(Op.NEW, parent, name, ident, mode, uid, gid, rdev, target, mtime,
                        parent_mtime)

    def write(self, ident: int, offset: int, data: bytes, mtime: int = T) -> Stream:
        return self.add(Op.WRITE, ident, offset, data, None, mtime)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def replay(dest: Path, stream: Stream, **kw) -> Replayer:
    r = Replayer(dest, ROOT, **kw)
    assert r.apply_all(stream.records) == len(stream.records)
    return r


def test_new_creates_each_kind_with_its_attributes(dest: Path):
    s = Stream()
    s.new(ROOT, b"f", 11, REG | 0o640, uid=1234, gid=5678, mtime=T + 1, parent_mtime=T + 10)
    s.new(ROOT, b"d", 12, DIR | 0o750, uid=42, mtime=T + 2, parent_mtime=T + 11)
    s.new(ROOT, b"l", 13, LNK | 0o777, uid=7, target=b"f", mtime=T + 3, parent_mtime=T + 12)
    s.new(12, b"p", 14, FIFO | 0o600, mtime=T + 4, parent_mtime=T + 5)
    replay(dest, s)
    f, d, ln, p = (os.lstat(dest / n) for n in ("f", "d", "l", "d/p"))
    assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o640
    assert (f.st_uid, f.st_gid, f.st_size, f.st_mtime_ns) == (1234, 5678, 0, T + 1)
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o750 and d.st_uid == 42
    assert d.st_mtime_ns == T + 5  # touched by the fifo's creation
    assert stat.S_ISLNK(ln.st_mode) and os.readlink(dest / "l") == "f"
    assert (ln.st_uid, ln.st_mtime_ns) == (7, T + 3)
    assert stat.S_ISFIFO(p.st_mode) and stat.S_IMODE(p.st_mode) == 0o600
    assert p.st_mtime_ns == T + 4
    assert os.stat(dest).st_mtime_ns == T + 12


def test_link_adds_a_name_for_the_same_file(dest: Path):
    s = Stream().new(ROOT, b"a", 11, REG | 0o644).new(ROOT, b"d", 12, DIR | 0o755)
    s.add(Op.LINK, 11, 12, b"b", T + 7)
    s.write(11, 0, b"shared")
    replay(dest, s)
    a, b = os.stat(dest / "a"), os.stat(dest / "d" / "b")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (dest / "d" / "b").read_bytes() == b"shared"
    assert os.stat(dest / "d").st_mtime_ns == T + 7


def test_remove_unlinks_files_and_removes_directories(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644).new(ROOT, b"d", 12, DIR | 0o755)
    s.add(Op.REMOVE, ROOT, b"f", 11, T + 1).add(Op.REMOVE, ROOT, b"d", 12, T + 2)
    replay(dest, s)
    assert os.listdir(dest) == []
    assert os.stat(dest).st_mtime_ns == T + 2


def test_removing_one_hard_link_keeps_the_other_writable(dest: Path):
    s = Stream().new(ROOT, b"a", 11, REG | 0o644).add(Op.LINK, 11, ROOT, b"b", T)
    s.add(Op.REMOVE, ROOT, b"a", 11, T).write(11, 0, b"still here")
    replay(dest, s)
    assert os.listdir(dest) == ["b"]
    assert (dest / "b").read_bytes() == b"still here"


def test_rename_moves_a_name_and_sets_both_parent_mtimes(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644).new(ROOT, b"d", 12, DIR | 0o755)
    s.add(Op.RENAME, ROOT, b"f", 12, b"g", 0, 11, None, T + 1, T + 2)
    s.write(11, 0, b"after rename")
    replay(dest, s)
    assert sorted(os.listdir(dest)) == ["d"]
    assert (dest / "d" / "g").read_bytes() == b"after rename"
    assert os.stat(dest).st_mtime_ns == T + 1
    assert os.stat(dest / "d").st_mtime_ns == T + 2


def test_rename_over_an_existing_file_replaces_it(dest: Path):
    s = Stream().new(ROOT, b"a", 11, REG | 0o644).new(ROOT, b"b", 12, REG | 0o644)
    s.write(11, 0, b"from a").write(12, 0, b"old b")
    s.add(Op.RENAME, ROOT, b"a", ROOT, b"b", 0, 11, 12, T, T)
    s.write(12, 0, b"lost")  # the replaced file has no name any more: skipped
    replay(dest, s)
    assert os.listdir(dest) == ["b"]
    assert (dest / "b").read_bytes() == b"from a"


def test_rename_exchange_swaps_two_names(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644).new(ROOT, b"d", 12, DIR | 0o755)
    s.new(12, b"inner", 13, REG | 0o644)
    s.add(Op.RENAME, ROOT, b"f", ROOT, b"d", RENAME_EXCHANGE, 11, 12, T, T)
    s.write(11, 0, b"file now at d").write(13, 0, b"inner of dir now at f")
    replay(dest, s)
    assert (dest / "d").read_bytes() == b"file now at d"
    assert (dest / "f" / "inner").read_bytes() == b"inner of dir now at f"


def test_renamed_directory_moves_its_subtree(dest: Path):
    s = Stream().new(ROOT, b"a", 12, DIR | 0o755).new(12, b"f", 13, REG | 0o644)
    s.new(ROOT, b"b", 14, DIR | 0o755)
    s.add(Op.RENAME, ROOT, b"a", 14, b"moved", 0, 12, None, T, T)
    s.new(12, b"later", 15, REG | 0o600).write(13, 0, b"x")
    replay(dest, s)
    assert sorted(os.listdir(dest / "b" / "moved")) == ["f", "later"]
    assert (dest / "b" / "moved" / "f").read_bytes() == b"x"


def test_write_truncate_setattr_and_xattrs_land_with_their_mtimes(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644)
    s.write(11, 0, b"hello world", mtime=T + 1)
    s.write(11, 6, b"WORLD!", mtime=T + 2)
    s.write(11, 20, b"sparse", mtime=T + 3)
    s.add(Op.TRUNCATE, 11, 23, T + 4)
    s.add(Op.SETATTR, 11, REG | 0o4711, 99, 98, T + 5)
    s.add(Op.SETXATTR, 11, b"user.keep", b"v1")
    s.add(Op.SETXATTR, 11, b"user.drop", b"v2")
    s.add(Op.SETXATTR, 11, b"user.keep", b"v3")
    s.add(Op.REMOVEXATTR, 11, b"user.drop")
    replay(dest, s)
    p = dest / "f"
    assert p.read_bytes() == b"hello WORLD!" + bytes(8) + b"spa"
    st = os.stat(p)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4711, 99, 98)
    assert st.st_mtime_ns == T + 5
    assert os.listxattr(p) == ["user.keep"]
    assert os.getxattr(p, "user.keep") == b"v3"


def test_setattr_and_xattr_of_a_directory(dest: Path):
    s = Stream().new(ROOT, b"d", 12, DIR | 0o755)
    s.add(Op.SETXATTR, 12, b"user.dir", b"yes").add(Op.SETATTR, 12, DIR | 0o700, 5, 6, T + 9)
    replay(dest, s)
    st = os.stat(dest / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o700, 5, 6, T + 9)
    assert os.getxattr(dest / "d", "user.dir") == b"yes"


def test_writes_to_an_identity_with_no_name_left_are_skipped(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644).write(11, 0, b"before")
    s.add(Op.REMOVE, ROOT, b"f", 11, T)
    s.write(11, 0, b"while unlinked but open").add(Op.TRUNCATE, 11, 0, T)
    s.add(Op.SETATTR, 11, REG | 0o600, 0, 0, T).add(Op.SETXATTR, 11, b"user.x", b"1")
    s.write(77, 0, b"never named at all")
    r = replay(dest, s)
    assert os.listdir(dest) == []
    assert r.applied == len(s.records)


def test_many_files_with_a_small_descriptor_cache(dest: Path):
    s = Stream()
    for i in range(10):
        s.new(ROOT, b"f%d" % i, 100 + i, REG | 0o644)
    for rnd in range(3):
        for i in range(10):
            s.write(100 + i, rnd, b"%d" % i)
    replay(dest, s, max_open=2)
    for i in range(10):
        assert (dest / f"f{i}").read_bytes() == (b"%d" % i) * 3


# ---- hostile streams -------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to dest that a hostile stream must not touch."""
    o = tmp_path / "outside"
    (o / "sub").mkdir(parents=True)
    (o / "victim").write_bytes(b"precious")
    os.chmod(o / "victim", 0o600)
    return o


def _around_dest(tmp_path: Path) -> dict[str, tuple]:
    snap = tree_snapshot(tmp_path)
    return {k: v for k, v in snap.items() if k != "dest" and not k.startswith("dest/")}


def _apply_expecting(dest: Path, records: list[list], errors) -> None:
    r = Replayer(dest, ROOT)
    with pytest.raises(errors):
        r.apply_all(records)


BAD_NAMES = [b"..", b".", b"a/b", b"/abs", b"", b"a\0b", b"\0", "text", None, 5]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("op", ["new", "link", "remove", "rename_old", "rename_new"])
def test_unsafe_names_are_refused(tmp_path: Path, dest: Path, outside: Path, op: str,
                                  name: object):
    base = Stream().new(ROOT, b"d", 12, DIR | 0o755).new(12, b"f", 11, REG | 0o644)
    before = _around_dest(tmp_path)
    dest_before = tree_snapshot(dest)
    bad = Stream()
    if op == "new":
        bad.new(12, name, 20, REG | 0o644)
    elif op == "link":
        bad.add(Op.LINK, 11, 12, name, T)
    elif op == "remove":
        bad.add(Op.REMOVE, 12, name, 11, T)
    elif op == "rename_old":
        bad.add(Op.RENAME, 12, name, 12, b"g", 0, 11, None, T, T)
    else:
        bad.add(Op.RENAME, 12, b"f", 12, name, 0, 11, None, T, T)
    r = Replayer(dest, ROOT)
    for rec in base.records:
        r.apply(rec)
    after_base = tree_snapshot(dest)
    with pytest.raises(UnsafePathError):
        r.apply(bad.records[0])
    r.close()
    assert tree_snapshot(dest) == after_base != dest_before
    assert _around_dest(tmp_path) == before


@pytest.mark.parametrize("parent", [11, 999, None, b"x"], ids=["file", "unknown", "none",
                                                               "bytes"])
def test_entries_under_a_non_directory_or_unknown_parent_are_refused(
        tmp_path: Path, dest: Path, outside: Path, parent: object):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644)
    s.new(parent, b"x", 20, REG | 0o644)
    before = _around_dest(tmp_path)
    _apply_expecting(dest, s.records, CorruptDataError)
    assert os.listdir(dest) == ["f"]
    assert _around_dest(tmp_path) == before


@pytest.mark.parametrize("rec", [[1, 0, 99, 1], [1, 0, "NEW"], [1, 0], [1], [],
                                 [1, 0, [1]], [1, 0, None]], ids=repr)
def test_unknown_operations_are_refused(dest: Path, rec: list):
    _apply_expecting(dest, [rec], CorruptDataError)
    assert os.listdir(dest) == []


@pytest.mark.parametrize("op,args", [
    (Op.NEW, (ROOT, b"x", 20, REG | 0o644)),
    (Op.NEW, (ROOT, b"x", 20, REG | 0o644, 0, 0, 0, None, T, T, "extra")),
    (Op.LINK, (11,)),
    (Op.REMOVE, (ROOT, b"f")),
    (Op.RENAME, (ROOT, b"f", ROOT, b"g")),
    (Op.WRITE, (11, 0)),
    (Op.TRUNCATE, (11,)),
    (Op.SETATTR, (11, REG | 0o644)),
    (Op.SETXATTR, (11, b"user.a")),
    (Op.REMOVEXATTR, ()),
], ids=lambda v: v.name if isinstance(v, Op) else str(len(v)))
def test_records_with_wrong_argument_counts_are_refused(dest: Path, op: Op, args: tuple):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644).add(op, *args)
    before = tree_snapshot(dest / "..")
    _apply_expecting(dest, s.records, CorruptDataError)
    assert sorted(os.listdir(dest)) == ["f"]
    after = tree_snapshot(dest / "..")
    assert {k: v for k, v in after.items() if not k.startswith("dest")} == {
        k: v for k, v in before.items() if not k.startswith("dest")}


def _with_evil_symlink(outside: Path) -> Stream:
    return Stream().new(ROOT, b"evil", 13, LNK | 0o777, target=os.fsencode(outside))


def test_entries_under_a_symlink_identity_are_refused(tmp_path: Path, dest: Path,
                                                      outside: Path):
    s = _with_evil_symlink(outside).new(13, b"planted", 20, REG | 0o644)
    before = _around_dest(tmp_path)
    _apply_expecting(dest, s.records, CorruptDataError)
    assert not (outside / "planted").exists()
    assert _around_dest(tmp_path) == before


def test_link_under_a_symlink_identity_is_refused(tmp_path: Path, dest: Path, outside: Path):
    s = _with_evil_symlink(outside).new(ROOT, b"f", 11, REG | 0o644)
    s.add(Op.LINK, 11, 13, b"planted", T)
    before = _around_dest(tmp_path)
    _apply_expecting(dest, s.records, CorruptDataError)
    assert _around_dest(tmp_path) == before


@pytest.mark.parametrize("op,args", [
    (Op.WRITE, (0, b"pwned", None, T)),
    (Op.TRUNCATE, (0, T)),
    (Op.SETXATTR, (b"user.pwned", b"1")),
], ids=["write", "truncate", "setxattr"])
def test_data_operations_on_a_symlink_identity_do_not_follow_it(
        tmp_path: Path, dest: Path, outside: Path, op: Op, args: tuple):
    victim_link = Stream().new(ROOT, b"evil", 13, LNK | 0o777,
                               target=os.fsencode(outside / "victim"))
    victim_link.add(op, 13, *args)
    before = _around_dest(tmp_path)
    # Refused one way or another (ELOOP/EPERM from the OS today): never written through.
    _apply_expecting(dest, victim_link.records, (CorruptDataError, UnsafePathError, OSError))
    assert (outside / "victim").read_bytes() == b"precious"
    assert os.listxattr(outside / "victim") == []
    assert _around_dest(tmp_path) == before


def test_setattr_on_a_symlink_identity_does_not_chmod_its_target(
        tmp_path: Path, dest: Path, outside: Path):
    s = Stream().new(ROOT, b"evil", 13, LNK | 0o777, target=os.fsencode(outside / "victim"))
    s.add(Op.SETATTR, 13, REG | 0o666, 0, 0, T)  # lies that the object is a regular file
    with contextlib.suppress(CorruptDataError, UnsafePathError, OSError):
        Replayer(dest, ROOT).apply_all(s.records)
    assert stat.S_IMODE(os.stat(outside / "victim").st_mode) == 0o600


def test_rename_naming_the_wrong_identity_cannot_redirect_later_records(
        tmp_path: Path, dest: Path, outside: Path):
    s = Stream().new(ROOT, b"d", 12, DIR | 0o755)
    s.new(ROOT, b"s", 13, LNK | 0o777, target=os.fsencode(outside))
    # exchange s and d, but claim the directory (12) was the one at s, and no other
    s.add(Op.RENAME, ROOT, b"s", ROOT, b"d", RENAME_EXCHANGE, 12, None, T, T)
    s.new(12, b"planted", 20, REG | 0o644)
    before = _around_dest(tmp_path)
    with contextlib.suppress(CorruptDataError, UnsafePathError, OSError):
        Replayer(dest, ROOT).apply_all(s.records)
    assert not (outside / "planted").exists()
    assert _around_dest(tmp_path) == before


def test_new_reusing_a_live_identity_cannot_redirect_its_children(
        tmp_path: Path, dest: Path, outside: Path):
    s = Stream().new(ROOT, b"d", 12, DIR | 0o755).new(12, b"sub", 14, DIR | 0o755)
    s.new(ROOT, b"evil", 12, LNK | 0o777, target=os.fsencode(outside))  # id 12 again
    s.new(14, b"planted", 20, REG | 0o644)  # path of 14 is now dest/evil/sub
    before = _around_dest(tmp_path)
    with contextlib.suppress(CorruptDataError, UnsafePathError, OSError):
        Replayer(dest, ROOT).apply_all(s.records)
    assert not (outside / "sub" / "planted").exists()
    assert _around_dest(tmp_path) == before


def test_rename_of_an_unknown_identity_is_corrupt_data(dest: Path):
    s = Stream().new(ROOT, b"f", 11, REG | 0o644)
    s.add(Op.RENAME, ROOT, b"f", ROOT, b"g", 0, 999, None, T, T)
    _apply_expecting(dest, s.records, CorruptDataError)
