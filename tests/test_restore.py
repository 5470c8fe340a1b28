"""File-level restore: content, metadata, sparse files, hard links, and never writing
outside DEST whatever the checkpoint holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_index import DIR, FIFO, LNK, REG, ROOT, Stream, T
from treesnap import tree_snapshot

from zfsrep.errors import NotFoundError, UnsafePathError
from zfsrep.index import IndexView, VolumeIndex
from zfsrep.records import Op
from zfsrep.restore import restore_tree
from zfsrep.view import Node


def stored(tmp_path: Path, s: Stream) -> IndexView:
    voldir = tmp_path / "vol"
    idx = VolumeIndex(voldir, ROOT)
    idx.apply(s.records)
    idx.commit()
    idx.close()
    return IndexView(voldir, len(s.records))


def sample() -> Stream:
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"docs", 12, DIR | 0o750, mtime=T + 1)
    s.new(12, b"a.txt", 11, REG | 0o640).write(11, 0, b"hello" * 1000, mtime=T + 2)
    s.add(Op.SETXATTR, 11, b"user.tag", b"blue")
    s.add(Op.SETATTR, 11, REG | 0o640, 1234, 5678, T + 3)
    s.new(12, b"sparse", 13, REG | 0o600).write(13, 10 << 20, b"end", mtime=T + 4)
    s.add(Op.LINK, 11, ROOT, b"hard", T + 5)
    s.new(12, b"link", 14, LNK | 0o777, target=b"/etc/passwd")
    s.new(12, b"up", 15, LNK | 0o777, target=b"../../../../x")
    s.new(12, b"pipe", 16, FIFO | 0o644)
    s.add(Op.SETATTR, 12, DIR | 0o750, 7, 8, T + 9)
    return s


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_bytes(b"precious")
    return o


def around(tmp_path: Path, dest: Path) -> dict:
    rel = os.path.relpath(dest, tmp_path)
    return {k: v for k, v in tree_snapshot(tmp_path).items()
            if k not in ("", rel) and not k.startswith((rel + "/", "vol"))}


def test_whole_volume_restores_with_metadata_sparse_files_and_links(tmp_path: Path):
    view = stored(tmp_path, sample())
    dest = tmp_path / "dest"
    stats = restore_tree(view, b"/", dest)
    a = dest / "docs" / "a.txt"
    st = os.lstat(a)
    assert a.read_bytes() == b"hello" * 1000
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o640, 1234, 5678, T + 3)
    assert os.getxattr(a, "user.tag") == b"blue"
    assert os.lstat(dest / "hard").st_ino == st.st_ino and st.st_nlink == 2
    sp = os.lstat(dest / "docs" / "sparse")
    assert sp.st_size == (10 << 20) + 3 and sp.st_blocks * 512 <= 64 * 1024
    assert os.readlink(dest / "docs" / "link") == "/etc/passwd"
    assert os.readlink(dest / "docs" / "up") == "../../../../x"
    assert stat.S_ISFIFO(os.lstat(dest / "docs" / "pipe").st_mode)
    d = os.lstat(dest / "docs")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_mtime_ns) == (0o750, 7, T + 9)
    assert (stats.files, stats.hardlinks, stats.symlinks, stats.specials, stats.dirs) == (
        2, 1, 2, 1, 2)
    assert stats.bytes == 5000 + 3


def test_a_file_restores_into_an_existing_directory_under_its_name(tmp_path: Path):
    view = stored(tmp_path, sample())
    dest = tmp_path / "dest"
    dest.mkdir()
    restore_tree(view, b"/docs/a.txt", dest)
    assert (dest / "a.txt").read_bytes() == b"hello" * 1000
    restore_tree(view, b"docs/a.txt", tmp_path / "renamed")
    assert (tmp_path / "renamed").read_bytes() == b"hello" * 1000


def test_a_directory_restores_as_dest_or_below_it(tmp_path: Path):
    view = stored(tmp_path, sample())
    restore_tree(view, b"/docs", tmp_path / "new")
    assert sorted(os.listdir(tmp_path / "new")) == ["a.txt", "link", "pipe", "sparse", "up"]
    (tmp_path / "there").mkdir()
    restore_tree(view, b"/docs/", tmp_path / "there")
    assert os.path.isdir(tmp_path / "there" / "docs")


def test_missing_path_or_a_path_through_a_symlink_is_not_found(tmp_path: Path):
    view = stored(tmp_path, sample())
    for path in (b"/nope", b"/docs/nope", b"/docs/a.txt/x", b"/docs/link/x"):
        with pytest.raises(NotFoundError):
            restore_tree(view, path, tmp_path / "dest")
    with pytest.raises(UnsafePathError):
        restore_tree(view, b"/docs/../docs", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path):
    view = stored(tmp_path, sample())
    dest = tmp_path / "dest"
    (dest / "docs").mkdir(parents=True)
    (dest / "docs" / "a.txt").write_bytes(b"mine")
    before = tree_snapshot(dest)
    with pytest.raises(UnsafePathError) as e:
        restore_tree(view, b"/", dest)
    assert e.value.exit_code == 7
    assert tree_snapshot(dest) == before  # nothing at all was written
    restore_tree(view, b"/", dest, force=True)
    assert (dest / "docs" / "a.txt").read_bytes() == b"hello" * 1000


def test_force_never_replaces_a_directory_with_a_file(tmp_path: Path):
    view = stored(tmp_path, sample())
    dest = tmp_path / "dest"
    (dest / "hard").mkdir(parents=True)
    (dest / "hard" / "keep").write_bytes(b"x")
    with pytest.raises(UnsafePathError):
        restore_tree(view, b"/", dest, force=True)
    assert (dest / "hard" / "keep").read_bytes() == b"x"
    assert not (dest / "docs").exists()


def test_an_existing_symlink_in_dest_is_replaced_not_followed(tmp_path: Path, outside: Path):
    view = stored(tmp_path, sample())
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "docs")  # where the checkpoint has a directory
    os.symlink(outside / "victim", dest / "hard")  # where it has a file
    before = around(tmp_path, dest)
    with pytest.raises(UnsafePathError):
        restore_tree(view, b"/", dest)
    restore_tree(view, b"/", dest, force=True)
    assert not os.path.islink(dest / "docs") and os.path.isdir(dest / "docs")
    assert (dest / "hard").read_bytes() == b"hello" * 1000
    assert around(tmp_path, dest) == before
    assert sorted(os.listdir(outside)) == ["victim"]


class FakeView:
    """A view that lies: arbitrary names in one directory."""

    def __init__(self, names: list[bytes]) -> None:
        self.root, self.seq = 1, 1
        self.names = names

    def getattr(self, ident: int) -> Node:
        if ident == 1:
            return Node(1, stat.S_IFDIR | 0o755, 0, 0, 0, T, 2)
        if ident == 3:
            return Node(3, stat.S_IFLNK | 0o777, 0, 0, 4, T, 1)
        return Node(ident, stat.S_IFREG | 0o644, 0, 0, 5, T, 1)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        return None

    def readdir(self, parent: int, after: bytes = b"", limit: int = 1 << 30):
        if parent != 1:
            return []
        items = [(b"aaa", self.getattr(2)), (b"evil", self.getattr(3))]
        items += [(n, self.getattr(2)) for n in self.names]
        return [(n, node) for n, node in items if not after or n > after][:limit]

    def readlink(self, ident: int) -> bytes:
        return b"/etc"

    def read(self, ident: int, offset: int, size: int) -> bytes:
        return b"pwned"[offset:offset + size]

    def listxattr(self, ident: int) -> list[bytes]:
        return []

    def getxattr(self, ident: int, name: bytes) -> bytes | None:
        return None

    def close(self) -> None:
        pass


@pytest.mark.parametrize("name", [b"../x", b"a/b", b"..", b".", b"", b"/abs", b"a\0b",
                                  b"../../outside/victim"], ids=repr)
def test_hostile_names_from_a_view_are_refused_before_writing(tmp_path: Path, outside: Path,
                                                              name: bytes):
    dest = tmp_path / "dest"
    dest.mkdir()
    before = around(tmp_path, dest)
    with pytest.raises(UnsafePathError):
        restore_tree(FakeView([name]), b"/", dest)
    assert os.listdir(dest) == []  # refused in the first pass: nothing written at all
    assert around(tmp_path, dest) == before
    assert (outside / "victim").read_bytes() == b"precious"


def test_symlinks_in_the_checkpoint_are_never_written_through(tmp_path: Path, outside: Path):
    """A checkpoint symlink named like a directory that later entries would go into: the
    restore creates the symlink and writes nothing through it."""
    dest = tmp_path / "dest"
    before = around(tmp_path, dest)
    stats = restore_tree(FakeView([b"zzz"]), b"/", dest)
    assert os.readlink(dest / "evil") == "/etc"
    assert (dest / "aaa").read_bytes() == b"pwned"
    assert stats.symlinks == 1 and stats.files == 2
    assert around(tmp_path, dest) == before


def test_progress_is_reported(tmp_path: Path):
    view = stored(tmp_path, sample())
    seen = []
    restore_tree(view, b"/", tmp_path / "dest", progress=lambda st: seen.append(st.files))
    assert seen and seen[-1] == 2


@pytest.mark.parametrize("parallel", [True, False])
def test_progress_is_reported_inside_a_large_file(tmp_path: Path, monkeypatch,
                                                  parallel: bool):
    """A long copy reports the bytes copied so far as it goes (by every copying process),
    not only when the file is done; the final count is the exact one."""
    from zfsrep import restore

    monkeypatch.setattr(restore, "PIPELINE_MIN", 1 << 20)
    monkeypatch.setattr(restore, "PROGRESS_STEP", 1 << 20)
    monkeypatch.setattr(restore, "EXTENT_SPAN", 1 << 20)
    monkeypatch.setattr(restore, "PARALLEL_MIN", (4 << 20) if parallel else (1 << 40))
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"big", 20, REG | 0o644)
    s.write(20, 0, __import__("random").Random(7).randbytes(16 << 20))
    view = stored(tmp_path, s)
    seen: list[int] = []
    stats = restore_tree(view, b"/", tmp_path / "dest", progress=lambda st: seen.append(st.bytes))
    during = seen[:-1]
    assert len(during) >= 3 and during == sorted(during) and 0 < during[0] < 16 << 20
    monkeypatch.setattr(restore, "PARALLEL_MIN", 1 << 40)
    assert stats.bytes == restore_tree(view, b"/", tmp_path / "again").bytes
    assert (tmp_path / "dest" / "big").read_bytes() == (tmp_path / "again" / "big").read_bytes()


def test_a_large_file_is_copied_by_several_processes_holes_kept(tmp_path: Path, monkeypatch):
    from zfsrep import restore

    monkeypatch.setattr(restore, "PARALLEL_MIN", 2 << 20)  # 12 MiB: parallel and pipelined
    monkeypatch.setattr(restore, "PIPELINE_MIN", 1 << 20)
    monkeypatch.setattr(restore, "WRITEBACK_STEP", 1 << 20)
    rng = __import__("random").Random(5)
    pieces = {(6 << 20) + 100: b"compressible text " * 40000,  # stored compressed
              0: rng.randbytes(300_000), (3 << 20) - 7: rng.randbytes(2 << 20),
              (9 << 20) + 4096: rng.randbytes(5000), (12 << 20) - 10: rng.randbytes(10)}
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"big", 20, REG | 0o644)
    for off, data in pieces.items():
        s.write(20, off, data)
    view = stored(tmp_path, s)
    expected = bytearray(12 << 20)
    for off, data in pieces.items():
        expected[off:off + len(data)] = data
    stats = restore_tree(view, b"/", tmp_path / "dest")
    big = tmp_path / "dest" / "big"
    assert big.read_bytes() == bytes(expected)
    assert os.lstat(big).st_blocks * 512 < 5 << 20  # the holes stayed holes
    assert stats.bytes < 4 << 20
    assert view.extents(20, 0, 12 << 20)[0][2] is not None  # random: straight from a pack
    assert any(e[2] is None for e in view.extents(20, 6 << 20, 1 << 20))  # text: decoded

    # a copying process that fails fails the restore, with its reason
    monkeypatch.setattr(IndexView, "reopen", lambda self: 1 / 0)
    with pytest.raises(Exception, match="division by zero"):
        restore_tree(view, b"/", tmp_path / "dest2")


@pytest.mark.parametrize("refuse_after", [0, 1])
def test_bytes_go_through_a_buffer_where_the_kernel_cannot_copy(tmp_path: Path, monkeypatch,
                                                                 refuse_after: int):
    """Pack extents are copied with copy_file_range; when the kernel refuses (EXDEV between
    file systems, ENOSYS, ...), from the first call or in the middle of a file, the rest is
    read and written through a buffer, and the file is the same."""
    import errno

    from zfsrep import restore

    monkeypatch.setattr(restore, "PARALLEL_MIN", 1 << 40)
    data = __import__("random").Random(3).randbytes((5 << 20) + 123)
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"f", 20, REG | 0o644).write(20, 0, data)
    view = stored(tmp_path, s)
    calls = []
    real = os.copy_file_range

    def refusing(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append(count)
        if len(calls) > refuse_after:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, min(count, 1 << 20), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", refusing)
    restore_tree(view, b"/", tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_bytes() == data
    assert len(calls) == refuse_after + 1  # once refused, not asked again


def test_pack_extents_are_copied_inside_the_kernel(tmp_path: Path, monkeypatch):
    from zfsrep import restore

    monkeypatch.setattr(restore, "PARALLEL_MIN", 1 << 40)
    data = __import__("random").Random(4).randbytes(3 << 20)
    s = Stream().add(Op.SETATTR, ROOT, DIR | 0o755, 0, 0, T)
    s.new(ROOT, b"f", 20, REG | 0o644).write(20, 0, data)
    view = stored(tmp_path, s)
    copied = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range",
                        lambda *a: copied.append(real(*a)) or copied[-1])
    monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("read through a buffer"))
    stats = restore_tree(view, b"/", tmp_path / "dest")
    assert (tmp_path / "dest" / "f").read_bytes() == data
    # (a block's trailing zero bytes are not stored: they stay a hole, as in the pack)
    assert sum(copied) == stats.bytes == sum(e[1] for e in view.extents(20, 0, len(data)))
    assert stats.bytes > len(data) - 100
