"""The snapshot mount: its handlers called in-process against a fake view, and real mounts
(``python -m zfsrep.mountd.snapshot`` as a subprocess, always unmounted in ``finally``).

Run as a script, this file is that same daemon serving :func:`served_view` instead of a stored
volume, for the real-mount tests that are about the mount rather than the index."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest
from conftest import FUSERMOUNT, is_mounted
from treesnap import assert_same_tree
from zfsrep.mountd import snapshot
from zfsrep.mountd.snapshot import DirStream, InodeNumbers, SnapshotOperations

from zfsrep.errors import CorruptDataError, NotFoundError
from zfsrep.records import Op
from zfsrep.replay import Replayer
from zfsrep.view import Node

ROOT = 1000
T = 1_600_000_000_123_456_789
REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


class FakeView:
    """A SnapshotView held in dictionaries; counts the calls the adapter makes."""

    def __init__(self, root: int = ROOT, seq: int = 7) -> None:
        self.root, self.seq = root, seq
        self.attrs: dict[int, dict] = {root: dict(mode=DIR | 0o755, uid=0, gid=0, mtime_ns=T,
                                                  rdev=0)}
        self.children: dict[int, dict[bytes, int]] = {root: {}}
        self.data: dict[int, bytes] = {}
        self.targets: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.calls: list[tuple] = []
        self.closed = False

    def add(self, parent: int, name: bytes, ident: int, mode: int, *, data: bytes = b"",
            target: bytes | None = None, xattrs: dict[bytes, bytes] | None = None,
            uid: int = 0, gid: int = 0, mtime_ns: int = T, rdev: int = 0) -> FakeView:
        self.children[parent][name] = ident
        if ident in self.attrs:  # another name for the same object
            return self
        self.attrs[ident] = dict(mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, rdev=rdev)
        if stat.S_ISDIR(mode):
            self.children[ident] = {}
        self.data[ident] = data
        if target is not None:
            self.targets[ident] = target
        self.xattrs[ident] = dict(xattrs or {})
        return self

    def _node(self, ident: int) -> Node:
        a = self.attrs[ident]
        if stat.S_ISDIR(a["mode"]):
            nlink = 2 + sum(stat.S_ISDIR(self.attrs[c]["mode"])
                            for c in self.children[ident].values())
            size = 4096
        else:
            nlink = sum(list(kids.values()).count(ident) for kids in self.children.values())
            size = len(self.targets.get(ident, self.data.get(ident, b"")))
        return Node(ident, a["mode"], a["uid"], a["gid"], size, a["mtime_ns"], nlink, a["rdev"])

    # -- the SnapshotView protocol --
    def getattr(self, ident: int) -> Node:
        self.calls.append(("getattr", ident))
        if ident not in self.attrs:
            raise NotFoundError(f"no object {ident}")
        return self._node(ident)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        self.calls.append(("lookup", parent, name))
        ident = self.children[parent].get(name)
        return None if ident is None else self._node(ident)

    def readdir(self, parent: int, after: bytes = b"", limit: int = 1 << 30
                ) -> list[tuple[bytes, Node]]:
        self.calls.append(("readdir", parent, after, limit))
        names = sorted(n for n in self.children[parent] if n > after)[:limit]
        return [(n, self._node(self.children[parent][n])) for n in names]

    def readlink(self, ident: int) -> bytes:
        return self.targets[ident]

    def read(self, ident: int, offset: int, size: int) -> bytes:
        self.calls.append(("read", ident, offset, size))
        return self.data[ident][offset:offset + size]

    def listxattr(self, ident: int) -> list[bytes]:
        return sorted(self.xattrs.get(ident, {}))

    def getxattr(self, ident: int, name: bytes) -> bytes | None:
        return self.xattrs.get(ident, {}).get(name)

    def close(self) -> None:
        self.closed = True
        logging.getLogger(__name__).info("fake view closed")


def sample_view() -> FakeView:
    v = FakeView()
    v.add(ROOT, b"file", 11, REG | 0o640, data=b"hello world", uid=1234, gid=5678,
          mtime_ns=T + 1, xattrs={b"user.colour": b"blue", b"user.empty": b""})
    v.add(ROOT, b"dir", 12, DIR | 0o750, mtime_ns=T + 2)
    v.add(12, b"link", 13, LNK | 0o777, target=b"../file", mtime_ns=T + 3)
    v.add(12, b"hard", 11, REG)  # a second name of "file"
    v.add(ROOT, b"dev", 14, stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3))
    return v


CTX = pyfuse3.RequestContext()


async def errno_raised(handler, *args) -> int:
    """The errno the handler answers with (it must fail)."""
    try:
        await handler(*args)
    except pyfuse3.FUSEError as e:
        return e.errno
    raise AssertionError(f"{handler.__name__} did not fail")


# ---- inode numbers -------------------------------------------------------------------------
def test_root_identity_is_inode_one_and_others_keep_their_number():
    m = InodeNumbers(ROOT)
    assert m.inode(ROOT) == pyfuse3.ROOT_INODE == 1
    assert m.inode(11) == 11 and m.ident(11) == 11
    assert m.ident(1) == ROOT


def test_identity_one_takes_the_root_identity_as_its_number():
    m = InodeNumbers(ROOT)
    assert m.inode(1) == ROOT
    assert m.ident(ROOT) == 1
    assert m.ident(m.inode(1)) == 1 and m.ident(m.inode(ROOT)) == ROOT


def test_mapping_is_identity_when_the_root_is_one():
    m = InodeNumbers(1)
    assert [m.inode(i) for i in (1, 2, 1000)] == [1, 2, 1000]


async def test_object_with_identity_one_is_reachable_and_distinct_from_root():
    v = FakeView()
    v.add(ROOT, b"one", 1, REG | 0o644, data=b"x")
    ops = SnapshotOperations(v)
    e = await ops.lookup(1, b"one", CTX)
    assert e.st_ino == ROOT
    assert stat.S_ISREG((await ops.getattr(ROOT, CTX)).st_mode)
    assert stat.S_ISDIR((await ops.getattr(1, CTX)).st_mode)


# ---- lookup and attributes -----------------------------------------------------------------
async def test_lookup_returns_the_nodes_attributes():
    ops = SnapshotOperations(sample_view())
    e = await ops.lookup(pyfuse3.ROOT_INODE, b"file", CTX)
    assert e.st_ino == 11
    assert (e.st_mode, e.st_uid, e.st_gid, e.st_size) == (REG | 0o640, 1234, 5678, 11)
    assert e.st_mtime_ns == e.st_atime_ns == e.st_ctime_ns == T + 1
    assert e.st_nlink == 2 and e.st_blocks == 1
    assert e.attr_timeout >= 3600 and e.entry_timeout >= 3600


async def test_lookup_of_a_missing_name_is_a_cacheable_negative_entry():
    ops = SnapshotOperations(sample_view())
    e = await ops.lookup(pyfuse3.ROOT_INODE, b"nothing", CTX)
    assert e.st_ino == 0 and e.entry_timeout >= 3600


async def test_getattr_of_root_and_device():
    ops = SnapshotOperations(sample_view())
    root = await ops.getattr(pyfuse3.ROOT_INODE, CTX)
    assert stat.S_ISDIR(root.st_mode) and root.st_ino == 1 and root.st_nlink == 3
    dev = await ops.getattr(14, CTX)
    assert dev.st_rdev == os.makedev(1, 3) and stat.S_ISCHR(dev.st_mode)


async def test_getattr_of_an_unknown_object_is_enoent():
    ops = SnapshotOperations(sample_view())
    assert await errno_raised(ops.getattr, 999, CTX) == errno.ENOENT


async def test_corrupt_data_in_the_view_is_eio():
    class Broken(FakeView):
        def read(self, ident, offset, size):
            raise CorruptDataError("pack checksum mismatch")

    ops = SnapshotOperations(Broken())
    assert await errno_raised(ops.read, 11, 0, 10) == errno.EIO


async def test_readlink():
    ops = SnapshotOperations(sample_view())
    assert await ops.readlink(13, CTX) == b"../file"


# ---- directories ---------------------------------------------------------------------------
class Kernel:
    """Stands in for pyfuse3.readdir_reply: a reply buffer that takes ``room`` entries."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got: list[tuple[bytes, int, int]] = []  # (name, inode, next offset)

    def __call__(self, token, name, attrs, next_id) -> bool:
        if len(self.got) >= self.room:
            return False
        self.got.append((name, attrs.st_ino, next_id))
        return True


async def list_dir(ops: SnapshotOperations, inode: int, room: int,
                   monkeypatch) -> list[tuple[bytes, int, int]]:
    """Read a whole directory as the kernel does, ``room`` entries per request."""
    fh = await ops.opendir(inode, CTX)
    out: list[tuple[bytes, int, int]] = []
    offset = 0
    while True:
        kernel = Kernel(room)
        monkeypatch.setattr(pyfuse3, "readdir_reply", kernel)
        await ops.readdir(fh, offset, None)
        if not kernel.got:
            break
        out += kernel.got
        offset = kernel.got[-1][2]
    await ops.releasedir(fh)
    return out


def big_dir(n: int) -> FakeView:
    v = FakeView()
    for i in range(n):
        v.add(ROOT, b"f%04d" % i, 100 + i, REG | 0o644)
    return v


async def test_readdir_lists_every_entry_in_name_order_with_attributes(monkeypatch):
    ops = SnapshotOperations(sample_view())
    got = await list_dir(ops, pyfuse3.ROOT_INODE, 100, monkeypatch)
    assert [(n, ino) for n, ino, _ in got] == [(b"dev", 14), (b"dir", 12), (b"file", 11)]
    assert [i for *_, i in got] == [1, 2, 3]


@pytest.mark.parametrize("room", [1, 3, 7, 1000])
async def test_readdir_resumes_where_the_kernel_buffer_filled(monkeypatch, room):
    v = big_dir(50)
    ops = SnapshotOperations(v)
    monkeypatch.setattr(snapshot, "READDIR_BATCH", 8)
    got = await list_dir(ops, pyfuse3.ROOT_INODE, room, monkeypatch)
    assert [n for n, *_ in got] == sorted(v.children[ROOT])
    assert [i for *_, i in got] == list(range(1, 51))


def test_readdir_fetches_each_entry_from_the_view_once():
    v = big_dir(50)
    stream = DirStream(v, ROOT, batch=8)
    first = [name for _, name, _ in itertools.islice(stream.entries(0), 5)]
    rest = [name for _, name, _ in stream.entries(5)]
    assert first + rest == sorted(v.children[ROOT])
    reads = [c for c in v.calls if c[0] == "readdir"]
    assert [after for _, _, after, _ in reads] == [b"", b"f0007", b"f0015", b"f0023",
                                                    b"f0031", b"f0039", b"f0047"]


def test_readdir_from_an_earlier_offset_restarts_by_name():
    v = big_dir(20)
    stream = DirStream(v, ROOT, batch=4)
    everything = list(stream.entries(0))
    v.calls.clear()
    again = list(stream.entries(9))
    assert again == everything[9:]
    assert v.calls[0] == ("readdir", ROOT, b"f0008", 4)
    v.calls.clear()
    assert list(stream.entries(20)) == []
    assert v.calls == []  # the end is known


def test_readdir_offset_never_handed_out_is_einval():
    stream = DirStream(big_dir(3), ROOT)
    with pytest.raises(pyfuse3.FUSEError) as e:
        list(stream.entries(2))
    assert e.value.errno == errno.EINVAL


async def test_empty_directory_lists_nothing(monkeypatch):
    v = FakeView().add(ROOT, b"empty", 5, DIR | 0o755)
    assert await list_dir(SnapshotOperations(v), 5, 10, monkeypatch) == []


async def test_opendir_of_a_file_is_enotdir():
    ops = SnapshotOperations(sample_view())
    assert await errno_raised(ops.opendir, 11, CTX) == errno.ENOTDIR


# ---- files ---------------------------------------------------------------------------------
async def test_open_read_only_keeps_the_page_cache():
    ops = SnapshotOperations(sample_view())
    fi = await ops.open(11, os.O_RDONLY, CTX)
    assert fi.keep_cache and fi.fh == 11


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                                   os.O_WRONLY | os.O_APPEND])
async def test_open_for_writing_is_erofs(flags):
    ops = SnapshotOperations(sample_view())
    assert await errno_raised(ops.open, 11, flags, CTX) == errno.EROFS


async def test_read_makes_one_view_call_per_request_and_is_short_at_end():
    v = sample_view()
    ops = SnapshotOperations(v)
    fi = await ops.open(11, os.O_RDONLY, CTX)
    v.calls.clear()
    assert await ops.read(fi.fh, 6, 1 << 20) == b"world"
    assert await ops.read(fi.fh, 100, 10) == b""
    assert v.calls == [("read", 11, 6, 1 << 20), ("read", 11, 100, 10)]


# ---- xattrs, access, statfs ----------------------------------------------------------------
async def test_xattrs_are_listed_and_read():
    ops = SnapshotOperations(sample_view())
    assert await ops.listxattr(11, CTX) == [b"user.colour", b"user.empty"]
    assert await ops.getxattr(11, b"user.colour", CTX) == b"blue"
    assert await ops.getxattr(11, b"user.empty", CTX) == b""
    assert await ops.listxattr(12, CTX) == []


async def test_absent_xattr_is_enodata():
    ops = SnapshotOperations(sample_view())
    assert await errno_raised(ops.getxattr, 11, b"user.none", CTX) == errno.ENODATA


async def test_access_allows_reading_and_refuses_writing():
    ops = SnapshotOperations(sample_view())
    assert await ops.access(11, os.R_OK | os.X_OK, CTX)
    assert await errno_raised(ops.access, 11, os.W_OK, CTX) == errno.EROFS
    assert await errno_raised(ops.access, 999, os.R_OK, CTX) == errno.ENOENT


async def test_statfs_reports_no_free_space():
    out = await SnapshotOperations(sample_view()).statfs(CTX)
    assert out.f_bavail == 0 and out.f_bfree == 0 and out.f_namemax == 255
    assert out.f_bsize > 0 and out.f_frsize > 0


# ---- mount options -------------------------------------------------------------------------
def test_mount_options_are_read_only_and_allow_others_only_when_asked(tmp_path: Path):
    opts = snapshot.SnapshotOptions(tmp_path, 3, tmp_path, "vpg/vol,x\\y")
    options = snapshot.mount_options(opts)
    assert {"ro", "default_permissions", "subtype=zfsrep"} <= options
    assert "fsname=zfsrep-snapshot:vpg/vol\\,x\\\\y" in options  # libfuse unescapes it
    assert "allow_other" not in options
    opts.allow_other = True
    assert "allow_other" in snapshot.mount_options(opts)


# ---- every change is refused ---------------------------------------------------------------
MUTATIONS = [
    ("setattr", (11, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, CTX)),
    ("mknod", (1, b"n", REG | 0o644, 0, CTX)),
    ("mkdir", (1, b"n", 0o755, CTX)),
    ("unlink", (1, b"file", CTX)),
    ("rmdir", (1, b"dir", CTX)),
    ("symlink", (1, b"n", b"t", CTX)),
    ("rename", (1, b"file", 1, b"n", 0, CTX)),
    ("link", (11, 1, b"n", CTX)),
    ("create", (1, b"n", REG | 0o644, os.O_WRONLY | os.O_CREAT, CTX)),
    ("write", (11, 0, b"data")),
    ("setxattr", (11, b"user.x", b"v", CTX)),
    ("removexattr", (11, b"user.colour", CTX)),
]


@pytest.mark.parametrize(("handler", "args"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
async def test_mutating_request_is_erofs_and_changes_nothing(handler, args):
    v = sample_view()
    before = (dict(v.children[ROOT]), dict(v.xattrs[11]), v.data[11])
    ops = SnapshotOperations(v)
    assert await errno_raised(getattr(ops, handler), *args) == errno.EROFS
    assert (dict(v.children[ROOT]), dict(v.xattrs[11]), v.data[11]) == before


# ---- real mounts ---------------------------------------------------------------------------
READY_FD_ENV = "ZFSREP_READY_FD"
BIG = random.Random(7).randbytes(8 << 20 | 12345)


def served_view() -> FakeView:
    """What the script form of this file serves: the sample tree, a big file, a big directory."""
    v = sample_view()
    v.add(ROOT, b"big", 20, REG | 0o600, data=BIG, mtime_ns=T + 9)
    v.add(ROOT, b"many", 21, DIR | 0o755)
    for i in range(500):
        v.add(21, b"entry-with-a-longish-name-%04d" % i, 2000 + i, REG | 0o644, data=b"%d" % i)
    return v


class SnapshotDaemon:
    """One snapshot mount daemon in a subprocess, started the way the CLI starts it."""

    def __init__(self, base: Path, *, fake: bool, volume_dir: Path, seq: int,
                 label: str = "test") -> None:
        self.mnt = base / "mnt"
        self.log = base / "snapshot.log"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.fake = fake
        entry = [__file__] if fake else ["-m", "zfsrep.mountd.snapshot"]
        self.argv = [sys.executable, *entry, "--volume-dir", str(volume_dir), "--seq",
                     str(seq), "--label", label, "--log", str(self.log), str(self.mnt)]
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.ready_line = ""
        self.expected_log: list[str] = []  # log lines a test expects (warnings, errors)

    def start(self, timeout: float = 30.0, *, expect_ready: bool = True) -> None:
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=(w,), env={**os.environ, READY_FD_ENV: str(w)})
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as pipe:
            if not select.select([pipe], [], [], timeout)[0]:
                self.stop()
                raise AssertionError("no readiness report in time:\n" + self.log_text())
            self.ready_line = pipe.readline().decode().strip()
        if expect_ready:
            assert self.ready_line == "ready", self.ready_line + "\n" + self.log_text()
            assert is_mounted(self.mnt)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Unmount and wait; escalate to a lazy unmount, terminate and kill."""
        if self.proc is None:
            return self.returncode
        code = None
        try:
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True,
                               timeout=30)
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if is_mounted(self.mnt):
                subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mnt)], capture_output=True)
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.stderr = self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()
            self.proc, self.returncode = None, code
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_problems(self) -> list[str]:
        return [ln for ln in self.log_text().splitlines()
                if any(k in ln for k in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
                and not any(e in ln for e in self.expected_log)]


@pytest.fixture
def snapshot_daemons(tmp_path: Path):
    """Make SnapshotDaemon objects; all are stopped, and their logs checked, at the end."""
    made: list[SnapshotDaemon] = []

    def make(name: str = "snap", *, fake: bool = True, volume_dir: Path | None = None,
             seq: int = 7, label: str = "test") -> SnapshotDaemon:
        base = tmp_path / name
        base.mkdir()
        d = SnapshotDaemon(base, fake=fake, volume_dir=volume_dir or tmp_path, seq=seq,
                           label=label)
        made.append(d)
        return d

    yield make
    codes = [d.stop() for d in made]
    for d, code in zip(made, codes, strict=True):
        assert not is_mounted(d.mnt), f"{d.mnt} left mounted"
        if d.ready_line == "ready":
            assert code == 0, f"daemon exited {code}:\n{d.log_text()}"
            assert "view closed" in d.log_text() or not d.fake
        assert not d.log_problems(), "\n".join(d.log_problems())


@pytest.fixture
def fake_mount(snapshot_daemons) -> SnapshotDaemon:
    d = snapshot_daemons()
    d.start()
    return d


@pytest.mark.mount
def test_mount_shows_files_with_their_attributes(fake_mount: SnapshotDaemon):
    m = fake_mount.mnt
    assert sorted(os.listdir(m)) == ["big", "dev", "dir", "file", "many"]
    st = os.stat(m / "file")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o640, 1234,
                                                                             5678, 11)
    assert st.st_mtime_ns == st.st_atime_ns == st.st_ctime_ns == T + 1
    assert st.st_ino == 11
    assert (m / "file").read_bytes() == b"hello world"
    assert os.stat(m).st_ino == 1 and stat.S_ISDIR(os.stat(m).st_mode)
    assert os.stat(m / "dev", follow_symlinks=False).st_rdev == os.makedev(1, 3)


@pytest.mark.mount
def test_mount_shows_symlinks_hard_links_and_xattrs(fake_mount: SnapshotDaemon):
    m = fake_mount.mnt
    assert os.readlink(m / "dir" / "link") == "../file"
    assert (m / "dir" / "link").read_bytes() == b"hello world"
    a, b = os.stat(m / "file"), os.stat(m / "dir" / "hard")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    assert sorted(os.listxattr(m / "file")) == ["user.colour", "user.empty"]
    assert os.getxattr(m / "file", "user.colour") == b"blue"
    assert os.getxattr(m / "file", "user.empty") == b""
    with pytest.raises(OSError) as e:
        os.getxattr(m / "file", "user.none")
    assert e.value.errno == errno.ENODATA


@pytest.mark.mount
def test_mount_lists_a_directory_larger_than_one_kernel_buffer(fake_mount: SnapshotDaemon):
    names = os.listdir(fake_mount.mnt / "many")
    assert sorted(names) == [f"entry-with-a-longish-name-{i:04d}" for i in range(500)]
    with os.scandir(fake_mount.mnt / "many") as it:
        inodes = {e.inode() for e in it}
    assert inodes == set(range(2000, 2500))
    assert (fake_mount.mnt / "many" / "entry-with-a-longish-name-0321").read_bytes() == b"321"


@pytest.mark.mount
def test_mount_reads_a_big_file_in_large_requests(fake_mount: SnapshotDaemon):
    with open(fake_mount.mnt / "big", "rb") as f:
        assert f.read() == BIG
        f.seek(5_000_001)
        assert f.read(100) == BIG[5_000_001:5_000_101]
    device = os.stat(fake_mount.mnt).st_dev
    ra = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    if ra.exists():
        assert int(ra.read_text()) == snapshot.READAHEAD_KIB


def _refusals(m: Path) -> dict[str, object]:
    return {
        "open for writing": lambda: open(m / "file", "r+b"),
        "create": lambda: open(m / "new", "wb"),
        "truncate": lambda: os.truncate(m / "file", 0),
        "unlink": lambda: os.unlink(m / "file"),
        "rmdir": lambda: os.rmdir(m / "many"),
        "mkdir": lambda: os.mkdir(m / "d2"),
        "rename": lambda: os.rename(m / "file", m / "file2"),
        "chmod": lambda: os.chmod(m / "file", 0o777),
        "chown": lambda: os.chown(m / "file", 1, 1),
        "utime": lambda: os.utime(m / "file", ns=(1, 1)),
        "symlink": lambda: os.symlink("file", m / "sl"),
        "link": lambda: os.link(m / "file", m / "hl"),
        "mkfifo": lambda: os.mkfifo(m / "fifo"),
        "setxattr": lambda: os.setxattr(m / "file", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(m / "file", "user.colour"),
    }


@pytest.mark.mount
def test_every_change_through_the_mount_fails_with_erofs(fake_mount: SnapshotDaemon):
    m = fake_mount.mnt
    failures = {}
    for what, attempt in _refusals(m).items():
        try:
            attempt()
        except OSError as e:
            if e.errno != errno.EROFS:
                failures[what] = e
        else:
            failures[what] = "succeeded"
    assert not failures, failures
    assert not os.access(m / "file", os.W_OK) and os.access(m / "file", os.R_OK)
    assert (m / "file").read_bytes() == b"hello world"
    assert sorted(os.listdir(m)) == ["big", "dev", "dir", "file", "many"]


@pytest.mark.mount
def test_mount_is_read_only_and_named_after_its_label(snapshot_daemons):
    d = snapshot_daemons(label="vpg1/vol,a b")
    d.start()
    target = os.fsencode(d.mnt)
    with open("/proc/self/mountinfo", "rb") as f:
        line = next(ln for ln in f if ln.split()[4] == target)
    fields = line.split()
    sep = fields.index(b"-")
    assert b"ro" in fields[5].split(b",")
    assert fields[sep + 1] == b"fuse.zfsrep"
    assert fields[sep + 2] == b"zfsrep-snapshot:vpg1/vol,a\\040b"
    assert os.statvfs(d.mnt).f_flag & os.ST_RDONLY


@pytest.mark.mount
def test_several_snapshot_mounts_serve_at_once(snapshot_daemons):
    daemons = [snapshot_daemons(f"s{i}", label=f"cp{i}") for i in range(3)]
    for d in daemons:
        d.start()
    for d in daemons:
        assert (d.mnt / "file").read_bytes() == b"hello world"
        assert len(os.listdir(d.mnt / "many")) == 500
    assert daemons[1].stop() == 0
    assert not is_mounted(daemons[1].mnt)
    assert (daemons[2].mnt / "big").read_bytes()[:1000] == BIG[:1000]


@pytest.mark.mount
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_unmounts_and_exits_zero(snapshot_daemons, sig):
    d = snapshot_daemons()
    d.start()
    d.proc.send_signal(sig)
    assert d.proc.wait(timeout=30) == 0
    assert not is_mounted(d.mnt)
    assert "unmounted from" in d.log_text() and "fake view closed" in d.log_text()


@pytest.mark.mount
def test_missing_mount_point_is_reported_on_the_ready_pipe(snapshot_daemons):
    d = snapshot_daemons()
    d.mnt.rmdir()
    d.expected_log.append("does not exist")
    d.start(expect_ready=False)
    assert d.ready_line.startswith("error 3 ") and "does not exist" in d.ready_line
    assert d.stop() == 3
    assert d.stderr.startswith("zfsrep: mount point") and "Traceback" not in d.stderr


@pytest.mark.mount
def test_mount_point_already_mounted_is_refused(snapshot_daemons, fake_mount):
    d = snapshot_daemons("second")
    d.mnt = fake_mount.mnt
    d.argv[-1] = str(fake_mount.mnt)
    d.expected_log.append("already a mount point")
    d.start(expect_ready=False)
    assert d.ready_line.startswith("error 4 ") and "already a mount point" in d.ready_line
    d.mnt = d.mnt.parent / "unused"  # the first daemon's mount is not this one's to stop
    assert d.stop() == 4
    assert (fake_mount.mnt / "file").read_bytes() == b"hello world"


@pytest.mark.mount
def test_missing_volume_directory_is_reported(snapshot_daemons, tmp_path: Path):
    d = snapshot_daemons(volume_dir=tmp_path / "no-such-volume")
    d.expected_log.append("does not exist")
    d.start(expect_ready=False)
    assert d.ready_line.startswith("error 3 ") and "volume directory" in d.ready_line
    assert d.stop() == 3
    assert not is_mounted(d.mnt)



# ---- real mounts of a stored volume --------------------------------------------------------
VOLUME_ROOT = 5000  # the volume root's identity (its backing inode number)
FIFO, CHR = stat.S_IFIFO, stat.S_IFCHR
DATA = random.Random(11).randbytes(3 << 20 | 777)


class Stream:
    """Records [seq, time_ns, op, *args] with consecutive seqs (docs/record-format.md)."""

    def __init__(self) -> None:
        self.records: list[list] = []

    def add(self, op: int, *args: object) -> Stream:
        seq = len(self.records) + 1
        # a plain int, as records arrive decoded from frames
        self.records.append([seq, 1_700_000_000_000_000_000 + seq, int(op), *args])
        return self

    def new(self, parent: int, name: bytes, ident: int, mode: int, *, uid: int = 0,
            gid: int = 0, rdev: int = 0, target: bytes | None = None, t: int = T) -> Stream:
        return self.add(Op.NEW, parent, name, ident, mode, uid, gid, rdev, target, t, t + 1)

    def write(self, ident: int, offset: int, data: bytes, t: int = T) -> Stream:
        return self.add(Op.WRITE, ident, offset, data, None, t)


def history() -> tuple[list[list], list[int]]:
    """A volume's records and two checkpoint positions in them."""
    r = VOLUME_ROOT
    s = Stream()
    s.new(r, b"docs", 10, DIR | 0o750, uid=1000, gid=100, t=T + 1)
    s.new(10, b"a.txt", 11, REG | 0o640, uid=1000, gid=100, t=T + 2)
    s.write(11, 0, b"first version\n", t=T + 3)
    s.new(r, b"one", 1, REG | 0o644, t=T + 4)  # identity 1, not the root's
    s.write(1, 0, b"the object numbered one", t=T + 5)
    s.new(r, b"big", 12, REG | 0o600, t=T + 6)
    s.write(12, 0, DATA, t=T + 7)
    s.write(12, 9 << 20, b"after a hole", t=T + 8)
    s.new(10, b"link", 13, LNK | 0o777, target=b"a.txt", t=T + 9)
    s.add(Op.LINK, 11, r, b"hard", T + 10)
    s.add(Op.SETXATTR, 11, b"user.kept", b"v1")
    s.add(Op.SETXATTR, 11, b"user.dropped", b"gone later")
    s.new(r, b"fifo", 14, FIFO | 0o600, t=T + 11)
    s.new(r, b"null", 15, CHR | 0o666, rdev=os.makedev(1, 3), t=T + 12)
    for i in range(300):
        s.new(10, f"n{i:03d}".encode(), 100 + i, REG | 0o644, t=T + 13)
    first = len(s.records)
    s.write(11, 0, b"second", t=T + 20)
    s.add(Op.TRUNCATE, 12, 5 << 20, T + 21)
    s.add(Op.SETATTR, 11, REG | 0o600, 1001, 101, T + 22)
    s.add(Op.RENAME, 10, b"link", r, b"link2", 0, 13, None, T + 23, T + 24)
    s.add(Op.REMOVE, r, b"fifo", 14, T + 25)
    s.add(Op.REMOVEXATTR, 11, b"user.dropped")
    s.add(Op.SETXATTR, 10, b"user.on-a-dir", b"d" * 200)
    for i in range(0, 300, 3):
        s.add(Op.REMOVE, 10, f"n{i:03d}".encode(), 100 + i, T + 26)
    return s.records, [first, len(s.records)]


@pytest.fixture(scope="module")
def stored_volume(tmp_path_factory) -> tuple[Path, list[list], list[int]]:
    """A volume directory indexed from history()."""
    from zfsrep.index import VolumeIndex

    records, checkpoints = history()
    voldir = tmp_path_factory.mktemp("store") / "vol"
    index = VolumeIndex(voldir, VOLUME_ROOT)
    try:
        index.apply(records)
        index.commit()
    finally:
        index.close()
    return voldir, records, checkpoints


def replayed(records: list[list], dest: Path) -> Path:
    dest.mkdir()
    replayer = Replayer(dest, VOLUME_ROOT)
    try:
        replayer.apply_all(records)
    finally:
        replayer.close()
    return dest


@pytest.mark.mount
def test_snapshot_mount_equals_the_replayed_tree_at_each_checkpoint(
        snapshot_daemons, stored_volume, tmp_path: Path):
    voldir, records, checkpoints = stored_volume
    daemons = [snapshot_daemons(f"cp{seq}", fake=False, volume_dir=voldir, seq=seq,
                                label=f"vol@{seq}") for seq in checkpoints]
    for d in daemons:  # all mounted at once
        d.start()
    for seq, d in zip(checkpoints, daemons, strict=True):
        expected = replayed(records[:seq], tmp_path / f"replay{seq}")
        assert_same_tree(expected, d.mnt, f"snapshot mount at {seq}")


@pytest.mark.mount
def test_snapshot_mount_numbers_objects_by_identity(snapshot_daemons, stored_volume):
    voldir, _, checkpoints = stored_volume
    d = snapshot_daemons(fake=False, volume_dir=voldir, seq=checkpoints[-1])
    d.start()
    assert os.stat(d.mnt).st_ino == 1
    assert os.stat(d.mnt / "one").st_ino == VOLUME_ROOT  # identity 1 takes the root's number
    assert (d.mnt / "one").read_bytes() == b"the object numbered one"
    a, b = os.stat(d.mnt / "docs" / "a.txt"), os.stat(d.mnt / "hard")
    assert a.st_ino == b.st_ino == 11 and a.st_nlink == 2
    assert os.readlink(d.mnt / "link2") == "a.txt"


@pytest.mark.mount
def test_snapshot_mount_of_a_real_volume_refuses_changes(snapshot_daemons, stored_volume):
    voldir, _, checkpoints = stored_volume
    d = snapshot_daemons(fake=False, volume_dir=voldir, seq=checkpoints[0])
    d.start()
    for attempt in (lambda: os.open(d.mnt / "big", os.O_WRONLY | os.O_APPEND),
                    lambda: os.unlink(d.mnt / "one"),
                    lambda: os.setxattr(d.mnt / "hard", "user.x", b"1")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert (d.mnt / "big").read_bytes()[:len(DATA)] == DATA


@pytest.mark.mount
def test_position_not_yet_indexed_is_refused(snapshot_daemons, stored_volume):
    voldir, records, _ = stored_volume
    d = snapshot_daemons(fake=False, volume_dir=voldir, seq=len(records) + 1)
    d.expected_log.append("not indexed yet")
    d.start(expect_ready=False)
    assert d.ready_line.startswith("error 4 ") and "not indexed yet" in d.ready_line
    assert d.stop() == 4
    assert not is_mounted(d.mnt)

if __name__ == "__main__":
    # The snapshot daemon serving served_view() (see the module docstring).
    snapshot.open_view = lambda volume_dir, seq: served_view()
    sys.exit(snapshot.main())
