"""BackingVolume driven in-process (no FUSE): records, descriptors, errors; each test ends by
replaying what was recorded and comparing the rebuilt tree with the backing directory."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from treesnap import assert_same_tree

from zfsrep.records import RENAME_EXCHANGE, RENAME_NOREPLACE, Op
from zfsrep.replay import Replayer
from zfsrep.volume import ROOT_NODE, BackingVolume

UMASK = 0o022


class ListRecorder:
    """A Recorder that keeps records as [op, *args]."""

    over_limit = False

    def __init__(self) -> None:
        self.records: list[list] = []

    def emit(self, op: int, *args: object) -> None:
        self.records.append([op, *args])

    def emit_write(self, ident: int, offset: int, data: bytes, mtime_ns: int) -> None:
        self.records.append([Op.WRITE, ident, offset, bytes(data), None, mtime_ns])

    def ops(self) -> list[int]:
        return [r[0] for r in self.records]

    def stream(self) -> list[list]:
        return [[seq, 1_700_000_000_000_000_000 + seq, *r]
                for seq, r in enumerate(self.records, 1)]


class Volume:
    """A backing directory, its BackingVolume, and the records it produced."""

    def __init__(self, base: Path, *, writeback: bool = True) -> None:
        self.base = base
        self.src = base / "src"
        self.src.mkdir()
        self.rec = ListRecorder()
        self.vol = BackingVolume(str(self.src), self.rec, writeback=writeback)
        self.root_ident = os.stat(self.src).st_ino

    def ino(self, rel: str) -> int:
        return os.lstat(self.src / rel).st_ino

    def create(self, parent: int, name: bytes, mode: int = 0o644) -> tuple[int, int]:
        fh, inode, _ = self.vol.create(parent, name, mode, os.O_WRONLY, 0, 0, UMASK)
        return fh, inode.node

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> int:
        inode, _ = self.vol.mkdir(parent, name, mode, 0, 0, UMASK)
        return inode.node

    def write_file(self, parent: int, name: bytes, data: bytes) -> int:
        fh, node = self.create(parent, name)
        self.vol.write(fh, 0, data)
        self.vol.release(fh)
        return node

    def replay_matches(self) -> None:
        replica = self.base / "replica"
        replica.mkdir()
        Replayer(replica, self.root_ident).apply_all(self.rec.stream())
        assert_same_tree(self.src, replica)


@pytest.fixture
def v(tmp_path: Path):
    vol = Volume(tmp_path)
    try:
        yield vol
    finally:
        vol.vol.close()


def test_create_and_write_record_new_and_write_with_backing_inode_ids(v: Volume):
    fh, node = v.create(ROOT_NODE, b"f", 0o666)
    v.vol.write(fh, 0, b"hello ")
    v.vol.write(fh, 6, b"world")
    v.vol.release(fh)
    ident = v.ino("f")
    assert v.vol.inode(node).ident == ident
    new, w1, w2 = v.rec.records
    assert new[:9] == [Op.NEW, v.root_ident, b"f", ident, stat.S_IFREG | 0o644, 0, 0, 0,
                       None]
    st, pst = os.stat(v.src / "f"), os.stat(v.src)
    assert new[9:] == [st.st_mtime_ns, pst.st_mtime_ns]
    assert w1[:5] == [Op.WRITE, ident, 0, b"hello ", None]
    assert w2[:5] == [Op.WRITE, ident, 6, b"world", None]
    assert (v.src / "f").read_bytes() == b"hello world"
    v.replay_matches()


def test_writes_without_writeback_record_the_mtime_after_the_write(tmp_path: Path):
    v = Volume(tmp_path, writeback=False)
    try:
        fh, _ = v.create(ROOT_NODE, b"f")
        v.vol.write(fh, 0, b"data")
        v.vol.release(fh)
        assert v.rec.records[-1][-1] == os.stat(v.src / "f").st_mtime_ns
        v.replay_matches()
    finally:
        v.vol.close()


def test_mkdir_symlink_and_mknod_record_new(v: Volume):
    d = v.mkdir(ROOT_NODE, b"d", 0o777)
    v.vol.symlink(d, b"l", b"../target", 0, 0)
    v.vol.mknod(d, b"p", stat.S_IFIFO | 0o666, 0, 0, 0, UMASK)
    assert v.rec.ops() == [Op.NEW] * 3
    nd, nl, np_ = v.rec.records
    assert nd[1:5] == [v.root_ident, b"d", v.ino("d"), stat.S_IFDIR | 0o755]
    assert nl[1:4] == [v.ino("d"), b"l", v.ino("d/l")] and nl[8] == b"../target"
    assert stat.S_ISLNK(nl[4])
    assert np_[1:5] == [v.ino("d"), b"p", v.ino("d/p"), stat.S_IFIFO | 0o644]
    v.replay_matches()


def test_rename_records_both_ids_and_replaces_the_target(v: Volume):
    d = v.mkdir(ROOT_NODE, b"d")
    v.write_file(ROOT_NODE, b"a", b"new content")
    v.write_file(d, b"b", b"old content")
    a_ino, b_ino = v.ino("a"), v.ino("d/b")
    count = len(v.rec.records)
    v.vol.rename(ROOT_NODE, b"a", d, b"b", 0)
    assert len(v.rec.records) == count + 1
    ren = v.rec.records[-1]
    assert ren[:8] == [Op.RENAME, v.root_ident, b"a", v.ino("d"), b"b", 0, a_ino, b_ino]
    assert ren[8:] == [os.stat(v.src).st_mtime_ns, os.stat(v.src / "d").st_mtime_ns]
    assert (v.src / "d" / "b").read_bytes() == b"new content"
    v.replay_matches()


def test_rename_sequence_replays_to_the_same_tree(v: Volume):
    d = v.mkdir(ROOT_NODE, b"d")
    e = v.mkdir(ROOT_NODE, b"e")
    v.write_file(d, b"x", b"x data")
    v.write_file(ROOT_NODE, b"y", b"y data")
    v.vol.rename(ROOT_NODE, b"d", e, b"moved", 0)  # a directory with its content
    v.vol.rename(ROOT_NODE, b"y", e, b"moved2", RENAME_NOREPLACE)
    v.write_file(d, b"later", b"written after the move")  # d's node survives the rename
    assert v.rec.ops().count(Op.RENAME) == 2
    assert (v.src / "e" / "moved" / "later").read_bytes() == b"written after the move"
    v.replay_matches()


def test_rename_exchange_records_flags_and_the_other_id(v: Volume):
    v.write_file(ROOT_NODE, b"f", b"file")
    d = v.mkdir(ROOT_NODE, b"d")
    v.write_file(d, b"inner", b"in dir")
    f_ino, d_ino = v.ino("f"), v.ino("d")
    v.vol.rename(ROOT_NODE, b"f", ROOT_NODE, b"d", RENAME_EXCHANGE)
    ren = v.rec.records[-1]
    assert ren[:8] == [Op.RENAME, v.root_ident, b"f", v.root_ident, b"d", RENAME_EXCHANGE,
                       f_ino, d_ino]
    assert (v.src / "d").read_bytes() == b"file"
    v.replay_matches()


def test_rename_onto_a_hard_link_of_itself_records_nothing(v: Volume):
    node = v.write_file(ROOT_NODE, b"a", b"same")
    v.vol.link(node, ROOT_NODE, b"b")
    count = len(v.rec.records)
    v.vol.rename(ROOT_NODE, b"a", ROOT_NODE, b"b", 0)
    assert len(v.rec.records) == count
    v.replay_matches()


def test_unlink_and_rmdir_record_remove_with_the_removed_id(v: Volume):
    v.write_file(ROOT_NODE, b"f", b"bye")
    v.mkdir(ROOT_NODE, b"d")
    f_ino, d_ino = v.ino("f"), v.ino("d")
    v.vol.unlink(ROOT_NODE, b"f")
    v.vol.rmdir(ROOT_NODE, b"d")
    rm_f, rm_d = v.rec.records[-2:]
    assert rm_f[:4] == [Op.REMOVE, v.root_ident, b"f", f_ino]
    assert rm_d[:4] == [Op.REMOVE, v.root_ident, b"d", d_ino]
    assert rm_d[4] == os.stat(v.src).st_mtime_ns
    assert os.listdir(v.src) == []
    v.replay_matches()


def test_link_records_the_file_id_and_new_name(v: Volume):
    node = v.write_file(ROOT_NODE, b"a", b"linked")
    d = v.mkdir(ROOT_NODE, b"d")
    inode, st = v.vol.link(node, d, b"b")
    assert st.st_nlink == 2
    assert v.rec.records[-1] == [Op.LINK, v.ino("a"), v.ino("d"), b"b",
                                 os.stat(v.src / "d").st_mtime_ns]
    v.replay_matches()


def test_write_to_an_unlinked_open_file_is_recorded_and_replay_skips_it(v: Volume):
    fh, _ = v.create(ROOT_NODE, b"tmp")
    v.vol.unlink(ROOT_NODE, b"tmp")
    v.vol.write(fh, 0, b"nameless")
    v.vol.release(fh)
    assert v.rec.ops() == [Op.NEW, Op.REMOVE, Op.WRITE]
    v.replay_matches()


def test_setattr_records_truncate_and_attributes(v: Volume):
    node = v.write_file(ROOT_NODE, b"f", b"0123456789")
    ident = v.ino("f")
    v.vol.setattr(node, None, size=4)
    assert v.rec.records[-1] == [Op.TRUNCATE, ident, 4, os.stat(v.src / "f").st_mtime_ns]
    st = v.vol.setattr(node, None, mode=0o600, uid=321, gid=654,
                       mtime_ns=1_500_000_000_987_654_321)
    assert v.rec.records[-1] == [Op.SETATTR, ident, stat.S_IFREG | 0o600, 321, 654,
                                 1_500_000_000_987_654_321]
    assert st.st_mtime_ns == 1_500_000_000_987_654_321
    assert (v.src / "f").read_bytes() == b"0123"
    v.replay_matches()


def test_setattr_through_an_open_file_truncates_it(v: Volume):
    fh, node = v.create(ROOT_NODE, b"f")
    v.vol.write(fh, 0, b"abcdef")
    v.vol.setattr(node, fh, size=2)
    v.vol.release(fh)
    assert v.rec.ops() == [Op.NEW, Op.WRITE, Op.TRUNCATE]
    assert (v.src / "f").read_bytes() == b"ab"
    v.replay_matches()


def test_open_with_o_trunc_records_a_truncate(v: Volume):
    node = v.write_file(ROOT_NODE, b"f", b"old data")
    fh = v.vol.open(node, os.O_WRONLY | os.O_TRUNC)
    v.vol.write(fh, 0, b"new")
    v.vol.release(fh)
    assert v.rec.ops()[-2:] == [Op.TRUNCATE, Op.WRITE]
    assert (v.src / "f").read_bytes() == b"new"
    v.replay_matches()


def test_xattrs_record_set_and_remove(v: Volume):
    node = v.write_file(ROOT_NODE, b"f", b"x")
    d = v.mkdir(ROOT_NODE, b"d")
    v.vol.setxattr(node, b"user.a", b"1")
    v.vol.setxattr(node, b"user.b", b"2")
    v.vol.removexattr(node, b"user.a")
    v.vol.setxattr(d, b"user.dir", b"3")
    assert v.rec.records[-4:] == [[Op.SETXATTR, v.ino("f"), b"user.a", b"1"],
                                  [Op.SETXATTR, v.ino("f"), b"user.b", b"2"],
                                  [Op.REMOVEXATTR, v.ino("f"), b"user.a"],
                                  [Op.SETXATTR, v.ino("d"), b"user.dir", b"3"]]
    assert v.vol.getxattr(node, b"user.b") == b"2"
    assert v.vol.listxattr(node) == [b"user.b"]
    v.replay_matches()


def test_lookup_of_dotdot_at_the_root_stays_at_the_root(v: Volume):
    inode, st = v.vol.lookup(ROOT_NODE, b"..")
    assert inode.node == ROOT_NODE and st.st_ino == v.root_ident
    d = v.mkdir(ROOT_NODE, b"d")
    up, st = v.vol.lookup(d, b"..")
    assert up.node == ROOT_NODE and st.st_ino == v.root_ident
    assert v.vol.lookup(ROOT_NODE, b"d")[0].node == d
    v.replay_matches()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_forget_closes_the_descriptor_after_the_last_lookup(v: Volume):
    v.write_file(ROOT_NODE, b"f", b"x")
    node = v.vol.lookup(ROOT_NODE, b"f")[0].node
    v.vol.forget([(node, 1)])  # the create's lookup and this one
    v.vol.forget([(node, 1)])
    with pytest.raises(KeyError):
        v.vol.inode(node)
    before = _fd_count()
    for _ in range(3):
        assert v.vol.lookup(ROOT_NODE, b"f")[0].node == node
    assert _fd_count() == before + 1  # one descriptor per object, however many lookups
    v.vol.forget([(node, 2)])
    assert _fd_count() == before + 1
    v.vol.forget([(node, 1)])
    assert _fd_count() == before
    v.vol.forget([(node, 1), (123456789, 1)])  # unknown or already forgotten: ignored
    v.vol.forget([(ROOT_NODE, 10)])  # the root stays
    assert v.vol.getattr(ROOT_NODE).st_ino == v.root_ident
    v.replay_matches()


def _fails_with(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, info.value


def test_failures_raise_the_backing_errno_and_record_nothing(v: Volume):
    d = v.mkdir(ROOT_NODE, b"d")
    v.write_file(d, b"f", b"x")
    count = len(v.rec.records)
    _fails_with(errno.ENOENT, v.vol.lookup, ROOT_NODE, b"missing")
    _fails_with(errno.ENOENT, v.vol.unlink, ROOT_NODE, b"missing")
    _fails_with(errno.ENOENT, v.vol.rename, ROOT_NODE, b"missing", ROOT_NODE, b"x", 0)
    _fails_with(errno.EEXIST, v.vol.mkdir, ROOT_NODE, b"d", 0o755, 0, 0, UMASK)
    _fails_with(errno.EEXIST, v.vol.create, d, b"f", 0o644, os.O_WRONLY, 0, 0, UMASK)
    _fails_with(errno.EEXIST, v.vol.symlink, ROOT_NODE, b"d", b"t", 0, 0)
    _fails_with(errno.ENOTEMPTY, v.vol.rmdir, ROOT_NODE, b"d")
    v.mkdir(ROOT_NODE, b"e")
    _fails_with(errno.EEXIST, v.vol.rename, ROOT_NODE, b"e", ROOT_NODE, b"d",
                RENAME_NOREPLACE)
    _fails_with(errno.EINVAL, v.vol.rename, ROOT_NODE, b"e", ROOT_NODE, b"z", 4)
    _fails_with(errno.ENOTDIR, v.vol.rmdir, d, b"f")
    assert len(v.rec.records) == count + 1  # only the mkdir of e
    v.replay_matches()
