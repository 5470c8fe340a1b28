"""A volume's index at the recovery site: every version of every node, entry, xattr and block,
so the tree at any stream position is read without replaying the journal (docs/store-index.md).

:class:`VolumeIndex` is the writer (one thread of the journal server owns it): it applies
records in seq order, batch by batch, to one SQLite database per volume (``index.sqlite``, WAL)
plus pack files of block data (``zfsrep.blockstore``). Every row is a **version** valid from its
``seq`` until the next row with the same key: the object at position S is the row with the
greatest ``seq <= S``. Rows are only ever inserted, so a reader at S never sees a row change.

:class:`IndexView` (``zfsrep.indexview``, re-exported here) is a reader at one position
(``zfsrep.view.SnapshotView``), safe in other processes while the writer goes on: each of its
lookups is one indexed seek per key, whatever the position, so an old checkpoint costs what the
newest does.

Records are checked as replay checks them (``zfsrep.replay``): names must be one path
component, namespace records must agree with the tree (unknown directory, wrong identity, a
directory moved into itself, a non-empty directory removed or replaced: CorruptDataError), and
a refused batch changes nothing. Data records (WRITE, TRUNCATE, FALLOCATE, SETATTR, xattrs) for
an identity that is not live (unlinked but still open, or an O_TMPFILE) are skipped, as in
replay: such an object can never be reached from the root again.
"""

from __future__ import annotations

import logging
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zfsrep.blockstore import GroupBuilder, PackReader, PackWriter, trim
from zfsrep.errors import CorruptDataError, OSFailure, StateError, ZfsrepError, shown
from zfsrep.indexview import (  # noqa: F401  (IndexView is re-exported)
    FORMAT,
    INDEX_NAME,
    NODE_COLS,
    SCHEMA,
    IndexView,
    index_path,
)
from zfsrep.records import ARGS, BLOCK_SIZE, RENAME_EXCHANGE, RENAME_NOREPLACE, Op

log = logging.getLogger(__name__)

BS = BLOCK_SIZE
MAX_FILE_SIZE = 1 << 62
MAX_NAME = 255
MAX_TARGET = 4095
MAX_XATTR_VALUE = 1 << 16
RENAME_WHITEOUT = 4
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_NO_HIDE_STALE = 0x01, 0x02, 0x04
FALLOC_COLLAPSE_RANGE, FALLOC_ZERO_RANGE, FALLOC_INSERT_RANGE = 0x08, 0x10, 0x20
FALLOC_UNSHARE_RANGE = 0x40
XATTR_PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")
KINDS = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
         stat.S_IFBLK)

# Writer node state: a list indexed by these (NAMES is not stored: entries naming the node).
MODE, UID, GID, SIZE, MTIME, RDEV, NLINK, BORN, PARENT, TARGET, NAMES = range(11)

# Writer only: the newest version since birth of every block in a range that has data.
BLOCK_EXTENTS_SQL = """
SELECT blk, gloc, glen, boff, blen FROM (
  SELECT blk, max(seq), gloc, glen, boff, blen FROM blocks
   WHERE ident = ? AND blk BETWEEN ? AND ? AND seq >= ? GROUP BY blk)
WHERE blen > 0
"""


def _uint(v: object, what: str, limit: int = 1 << 63) -> int:
    if type(v) is not int or not 0 <= v < limit:
        raise CorruptDataError(f"record has a bad {what} {v!r}")
    return v


def _sint(v: object, what: str) -> int:
    if type(v) is not int or not -(1 << 63) <= v < (1 << 63):
        raise CorruptDataError(f"record has a bad {what} {v!r}")
    return v


def check_name(name: object) -> bytes:
    if (not isinstance(name, bytes) or not name or len(name) > MAX_NAME or b"/" in name
            or b"\0" in name or name in (b".", b"..")):
        raise CorruptDataError(f"record names an unsafe entry {shown(name)}")
    return name


def _xattr_name(name: object) -> bytes:
    if (not isinstance(name, bytes) or not name.startswith(XATTR_PREFIXES) or b"\0" in name
            or len(name) > MAX_NAME):
        raise CorruptDataError(f"record names a bad xattr {shown(name)}")
    return name


def _kind(st: list) -> int:
    return stat.S_IFMT(st[MODE])


class VolumeIndex:
    """The writer of one volume's index. Not thread-safe: one owner calls everything."""

    #: Flush staged block contents to the packs and rows to SQLite past this many bytes.
    OVERLAY_MAX = 64 << 20
    CACHE_MAX = 200_000

    def __init__(self, voldir: Path, root_ident: int) -> None:
        self.voldir = Path(voldir)
        self.voldir.mkdir(parents=True, exist_ok=True)
        self.root = _uint(root_ident, "root identity")
        try:
            self.db = sqlite3.connect(index_path(self.voldir), isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA cache_size=-65536")
            self.db.executescript(SCHEMA)
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as e:
            raise OSFailure(f"cannot open index {index_path(self.voldir)}: {e}") from None
        if not meta:
            meta = {"format": FORMAT, "root_ident": root_ident, "indexed_seq": 0,
                    "pack_no": 0, "pack_len": 0, "block_size": BS}
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            self.db.execute(f"INSERT INTO nodes (ident, seq, {NODE_COLS}) VALUES "
                            "(?, 0, ?, 0, 0, 0, 0, 0, 2, 0, ?, NULL)",
                            (root_ident, stat.S_IFDIR | 0o755, root_ident))
            self.db.execute("COMMIT")
        if meta.get("format") != FORMAT or meta.get("block_size") != BS:
            raise StateError(f"index {index_path(self.voldir)} has an unknown format")
        if meta["root_ident"] != root_ident:
            raise StateError(f"index {index_path(self.voldir)} is of a volume with root "
                             f"{meta['root_ident']}, not {root_ident}")
        self._indexed = int(meta["indexed_seq"])
        self._next = self._indexed + 1
        self.packs = PackWriter(self.voldir, int(meta["pack_no"]), int(meta["pack_len"]))
        self.reader = PackReader(self.voldir, cache_groups=16)
        self.builder = GroupBuilder(self.packs)
        self._in_txn = False
        self._closed = False
        self.written_bytes = 0  # WRITE payload bytes applied by this writer (for stats)
        self._reset_state()

    def _reset_state(self) -> None:
        self._nodes: dict[int, Any] = {}  # ident -> state list, None: never seen
        self._ents: dict[tuple[int, bytes], int | None] = {}
        self._blk: dict[tuple[int, int, int], bytes] = {}  # (ident, born, blk) -> content
        self._blk_bytes = 0
        self._touched: dict[int, None] = {}
        self._node_rows: list[tuple] = []
        self._ent_rows: dict[tuple[int, bytes, int], int | None] = {}
        self._xattr_rows: list[tuple] = []
        self._blk_rows: list[list] = []
        self.builder.discard()

    # ---- public API -------------------------------------------------------------------
    @property
    def indexed_seq(self) -> int:
        """The last committed seq (0 before the first commit)."""
        return self._indexed

    @property
    def applied_seq(self) -> int:
        """The last applied seq (committed or not)."""
        return self._next - 1

    def apply(self, records: list[list]) -> None:
        """Apply records continuing the stream; a refused batch changes nothing."""
        if self._closed:
            raise StateError("the volume index is closed")
        if not self._in_txn:
            self.db.execute("BEGIN")
            self._in_txn = True
        self.db.execute("SAVEPOINT batch")
        pos = self.packs.position()
        next_before = self._next
        try:
            for rec in records:
                self._apply_one(rec)
            self._flush()
        except BaseException as e:
            self.db.execute("ROLLBACK TO batch")
            self.db.execute("RELEASE batch")
            self.packs.rollback(*pos)
            self.reader.close()
            self._reset_state()
            self._next = next_before
            if isinstance(e, ZfsrepError):
                raise
            if isinstance(e, (TypeError, ValueError, KeyError, IndexError, OverflowError,
                              sqlite3.IntegrityError)):
                raise CorruptDataError(f"malformed record near seq {self._next}: {e}") from None
            if isinstance(e, OSError | sqlite3.Error):
                raise OSFailure(f"cannot index volume {self.voldir}: {e}") from None
            raise
        self.db.execute("RELEASE batch")

    def commit(self) -> None:
        """Make everything applied durable: fsync the packs, then commit the transaction that
        holds the rows and ``indexed_seq``."""
        if not self._in_txn:
            return
        self.packs.sync()
        pack_no, pack_len = self.packs.position()
        self.db.executemany("UPDATE meta SET value = ? WHERE key = ?", [
            (self._next - 1, "indexed_seq"), (pack_no, "pack_no"), (pack_len, "pack_len")])
        self.db.execute("COMMIT")
        self._in_txn = False
        self._indexed = self._next - 1

    def close(self) -> None:
        """Close without committing: applied but uncommitted records are dropped."""
        if self._closed:
            return
        self._closed = True
        if self._in_txn:
            self.db.execute("ROLLBACK")
            self._in_txn = False
        self.db.close()
        self.packs.close()
        self.reader.close()

    def stats(self) -> dict:
        packs = sorted(self.voldir.glob("packs/*.zpk"))
        index_bytes = sum(p.stat().st_size for p in self.voldir.glob(INDEX_NAME + "*"))
        return {"indexed_seq": self._indexed, "data_bytes": sum(p.stat().st_size for p in packs),
                "index_bytes": index_bytes, "packs": len(packs),
                "written_bytes": self.written_bytes}

    # ---- state --------------------------------------------------------------------------
    def _node(self, ident: int) -> list | None:
        """Current state of ``ident`` (a dead object has MODE None), None if never seen."""
        try:
            return self._nodes[ident]
        except KeyError:
            pass
        row = self.db.execute(f"SELECT {NODE_COLS} FROM nodes WHERE ident = ? "
                              "ORDER BY seq DESC LIMIT 1", (ident,)).fetchone()
        st = None
        if row is not None:
            st = [*row, 0]
            if st[MODE] is not None and ident != self.root:
                st[NAMES] = 1 if _kind(st) == stat.S_IFDIR else st[NLINK]
        self._nodes[ident] = st
        return st

    def _live(self, ident: object, want: int | None = None) -> list:
        st = self._node(ident) if type(ident) is int else None
        if st is None or st[MODE] is None or (want is not None and _kind(st) != want):
            raise CorruptDataError(f"record names {ident!r}, which is not a live "
                                   f"{'object' if want is None else 'directory'}")
        return st

    def _data_node(self, ident: object) -> list | None:
        """The live regular file ``ident``, or None if it is not live (data is skipped)."""
        st = self._node(_uint(ident, "identity"))
        if st is None or st[MODE] is None:
            return None
        if _kind(st) != stat.S_IFREG:
            raise CorruptDataError(f"record writes data to {ident}, which is not a file")
        return st

    def _entry(self, parent: int, name: bytes) -> int | None:
        key = (parent, name)
        try:
            return self._ents[key]
        except KeyError:
            pass
        row = self.db.execute("SELECT ident FROM entries WHERE parent = ? AND name = ? "
                              "ORDER BY seq DESC LIMIT 1", key).fetchone()
        self._ents[key] = ident = None if row is None else row[0]
        return ident

    def _expect(self, ident: int | None, parent: int, name: bytes) -> None:
        actual = self._entry(parent, name)
        if actual != ident:
            raise CorruptDataError(f"record says entry {shown(name)} of directory {parent} is "
                                   f"{ident}, but it is {actual}")

    def _touch(self, ident: int) -> None:
        self._touched[ident] = None

    def _set_entry(self, seq: int, parent: int, name: bytes, ident: int | None) -> None:
        self._ents[(parent, name)] = ident
        self._ent_rows[(parent, name, seq)] = ident

    def _add_name(self, seq: int, parent: int, name: bytes, ident: int, st: list) -> None:
        pst = self._nodes[parent]
        self._set_entry(seq, parent, name, ident)
        pst[SIZE] += 1
        st[NAMES] += 1
        if _kind(st) == stat.S_IFDIR:
            pst[NLINK] += 1
            st[PARENT] = parent
        else:
            st[NLINK] += 1
        self._touch(parent)
        self._touch(ident)

    def _drop_name(self, seq: int, parent: int, name: bytes, ident: int, st: list) -> None:
        pst = self._nodes[parent]
        self._set_entry(seq, parent, name, None)
        pst[SIZE] -= 1
        st[NAMES] -= 1
        if _kind(st) == stat.S_IFDIR:
            pst[NLINK] -= 1
        else:
            st[NLINK] -= 1
        self._touch(parent)
        self._touch(ident)

    def _is_ancestor(self, ident: int, node: int) -> bool:
        """Whether directory ``ident`` is ``node`` or one of its ancestors."""
        for _ in range(100_000):
            if node == ident:
                return True
            if node == self.root:
                return False
            st = self._node(node)
            if st is None or st[MODE] is None:
                return False
            node = st[PARENT]
        raise CorruptDataError("directory tree too deep or cyclic")

    # ---- records -------------------------------------------------------------------------
    def _apply_one(self, rec: object) -> None:
        if not isinstance(rec, list | tuple) or len(rec) < ARGS:
            raise CorruptDataError(f"malformed record {rec!r:.80}")
        seq, op = rec[0], rec[2]
        if type(seq) is not int or seq != self._next:
            raise CorruptDataError(f"record seq {seq!r} does not continue the stream at "
                                   f"{self._next}")
        handler = _HANDLERS.get(op) if isinstance(op, int) else None
        if handler is None:
            raise CorruptDataError(f"record {seq}: unknown operation {op!r}")
        try:
            handler(self, seq, *rec[ARGS:])
        except TypeError as e:
            raise CorruptDataError(f"record {seq}: malformed arguments ({e})") from None
        for ident in self._touched:
            st = self._nodes[ident]
            if st[MODE] is not None and st[NAMES] <= 0 and ident != self.root:
                st[MODE] = None  # its last name is gone: dead from this seq on
            self._node_rows.append((ident, seq, *st[:NAMES]))
        self._touched.clear()
        self._next += 1

    def _new(self, seq: int, parent: int, name: bytes, ident: int, mode: int, uid: int,
             gid: int, rdev: int, target: bytes | None, mtime_ns: int,
             parent_mtime_ns: int) -> None:
        pst = self._live(parent, stat.S_IFDIR)
        check_name(name)
        _uint(ident, "identity")
        _uint(mode, "mode", 1 << 32)
        kind = stat.S_IFMT(mode)
        if kind not in KINDS:
            raise CorruptDataError(f"record creates {shown(name)} of unknown type {mode:o}")
        old = self._node(ident)
        if ident == self.root or (old is not None and old[MODE] is not None):
            raise CorruptDataError(f"record creates {shown(name)} as {ident}, which is still live")
        self._expect(None, parent, name)
        size = 0
        if kind == stat.S_IFLNK:
            if not isinstance(target, bytes) or not target or len(target) > MAX_TARGET \
                    or b"\0" in target:
                raise CorruptDataError(f"symlink {shown(name)} without a valid target")
            mode, size = stat.S_IFLNK | 0o777, len(target)
        else:
            target = None
        rdev = _uint(rdev, "rdev") if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        st = [mode, _uint(uid, "uid", 1 << 32), _uint(gid, "gid", 1 << 32), size,
              _sint(mtime_ns, "mtime"), rdev, 2 if kind == stat.S_IFDIR else 0, seq, parent,
              target, 0]
        self._nodes[ident] = st
        self._add_name(seq, parent, name, ident, st)
        pst[MTIME] = _sint(parent_mtime_ns, "mtime")

    def _link(self, seq: int, ident: int, parent: int, name: bytes,
              parent_mtime_ns: int) -> None:
        st = self._live(ident)
        if _kind(st) == stat.S_IFDIR:
            raise CorruptDataError(f"record links directory {ident}")
        pst = self._live(parent, stat.S_IFDIR)
        self._expect(None, parent, check_name(name))
        self._add_name(seq, parent, name, ident, st)
        pst[MTIME] = _sint(parent_mtime_ns, "mtime")

    def _remove(self, seq: int, parent: int, name: bytes, ident: int,
                parent_mtime_ns: int) -> None:
        pst = self._live(parent, stat.S_IFDIR)
        self._expect(ident, parent, check_name(name))
        st = self._live(ident)
        if _kind(st) == stat.S_IFDIR and st[SIZE]:
            raise CorruptDataError(f"record removes non-empty directory {ident}")
        self._drop_name(seq, parent, name, ident, st)
        pst[MTIME] = _sint(parent_mtime_ns, "mtime")

    def _rename(self, seq: int, old_parent: int, old_name: bytes, new_parent: int,
                new_name: bytes, flags: int, ident: int, other: int | None,
                old_mtime_ns: int, new_mtime_ns: int) -> None:
        opst = self._live(old_parent, stat.S_IFDIR)
        npst = self._live(new_parent, stat.S_IFDIR)
        check_name(old_name)
        check_name(new_name)
        _uint(flags, "rename flags")
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & RENAME_NOREPLACE):
            raise CorruptDataError(f"record has bad rename flags {flags}")
        self._expect(ident, old_parent, old_name)
        self._expect(other, new_parent, new_name)
        if other == ident:
            raise CorruptDataError("record renames an object onto itself")
        st = self._live(ident)
        is_dir = _kind(st) == stat.S_IFDIR
        if is_dir and self._is_ancestor(ident, new_parent):
            raise CorruptDataError(f"record moves directory {ident} into itself")
        if flags & RENAME_EXCHANGE:
            if other is None:
                raise CorruptDataError("exchange without a second object")
            ost = self._live(other)
            if _kind(ost) == stat.S_IFDIR and self._is_ancestor(other, old_parent):
                raise CorruptDataError(f"record moves directory {other} into itself")
            self._drop_name(seq, old_parent, old_name, ident, st)
            self._drop_name(seq, new_parent, new_name, other, ost)
            self._add_name(seq, new_parent, new_name, ident, st)
            self._add_name(seq, old_parent, old_name, other, ost)
        else:
            if other is not None:
                if flags & RENAME_NOREPLACE:
                    raise CorruptDataError("no-replace rename over an existing entry")
                ost = self._live(other)
                o_dir = _kind(ost) == stat.S_IFDIR
                if o_dir != is_dir or (o_dir and ost[SIZE]):
                    raise CorruptDataError(f"record replaces {other} by {ident}, which the "
                                           "filesystem refuses")
                self._drop_name(seq, new_parent, new_name, other, ost)
            self._drop_name(seq, old_parent, old_name, ident, st)
            self._add_name(seq, new_parent, new_name, ident, st)
        opst[MTIME] = _sint(old_mtime_ns, "mtime")
        npst[MTIME] = _sint(new_mtime_ns, "mtime")

    def _setattr(self, seq: int, ident: int, mode: int, uid: int, gid: int,
                 mtime_ns: int) -> None:
        st = self._node(_uint(ident, "identity"))
        _uint(mode, "mode", 1 << 32)
        uid, gid = _uint(uid, "uid", 1 << 32), _uint(gid, "gid", 1 << 32)
        mtime_ns = _sint(mtime_ns, "mtime")
        if st is None or st[MODE] is None:
            return
        if stat.S_IFMT(mode) != _kind(st):
            raise CorruptDataError(f"record gives {ident} another type ({mode:o})")
        if _kind(st) != stat.S_IFLNK:
            st[MODE] = mode
        st[UID], st[GID], st[MTIME] = uid, gid, mtime_ns
        self._touch(ident)

    def _setxattr(self, seq: int, ident: int, name: bytes, value: bytes) -> None:
        st = self._node(_uint(ident, "identity"))
        _xattr_name(name)
        if not isinstance(value, bytes) or len(value) > MAX_XATTR_VALUE:
            raise CorruptDataError(f"record has a bad value for xattr {shown(name)}")
        if st is not None and st[MODE] is not None:
            self._xattr_rows.append((ident, name, seq, value))

    def _removexattr(self, seq: int, ident: int, name: bytes) -> None:
        st = self._node(_uint(ident, "identity"))
        _xattr_name(name)
        if st is not None and st[MODE] is not None:
            self._xattr_rows.append((ident, name, seq, None))

    # ---- data ----------------------------------------------------------------------------
    def _write(self, seq: int, ident: int, offset: int, data: bytes, digests: object,
               mtime_ns: int) -> None:
        st = self._data_node(ident)
        _uint(offset, "offset")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CorruptDataError(f"record {seq}: write data is not bytes")
        mtime_ns = _sint(mtime_ns, "mtime")
        if offset + len(data) > MAX_FILE_SIZE:
            raise CorruptDataError(f"record {seq}: write past the largest file size")
        if st is None:
            return
        self.written_bytes += len(data)
        self._put(seq, ident, st, offset, bytes(data))
        st[MTIME] = mtime_ns
        self._touch(ident)

    def _put(self, seq: int, ident: int, st: list, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` of the file (merging partial blocks)."""
        n = len(data)
        if not n:
            return
        size, born = st[SIZE], st[BORN]
        blk, pos = offset // BS, 0
        lo = offset % BS
        if lo or n < BS:  # a partial first block: merge with what the block holds now
            pos = min(BS - lo, n)
            cur = self._current(ident, st, blk) if blk * BS < size else b""
            if len(cur) < lo:
                cur += bytes(lo - len(cur))
            self._set_block(seq, ident, born, blk,
                            trim(cur[:lo] + data[:pos] + cur[lo + pos:]))
            blk += 1
        nfull = (n - pos) // BS
        if nfull:
            # views into the record's data: whole groups are cut from it without a copy
            span = memoryview(data)[pos:pos + nfull * BS]
            blocks = [span[p:p + BS] for p in range(0, nfull * BS, BS)]
            self._set_blocks(seq, ident, born, blk,
                             [c if c[-1] else bytes(c).rstrip(b"\0") for c in blocks], span)
            pos += nfull * BS
            blk += nfull
        if pos < n:  # a partial last block
            cur = self._current(ident, st, blk) if blk * BS < size else b""
            self._set_block(seq, ident, born, blk, trim(data[pos:] + cur[n - pos:]))
        if offset + n > size:
            st[SIZE] = offset + n

    def _current(self, ident: int, st: list, blk: int) -> bytes:
        """The file's block ``blk`` now (trimmed)."""
        if blk * BS >= st[SIZE]:
            return b""
        try:
            return bytes(self._blk[(ident, st[BORN], blk)])
        except KeyError:
            pass
        row = self.db.execute("SELECT seq, gloc, glen, boff, blen FROM blocks WHERE ident = ? "
                              "AND blk = ? ORDER BY seq DESC LIMIT 1", (ident, blk)).fetchone()
        if row is None or row[0] < st[BORN] or not row[4]:
            return b""
        return self.reader.block(*row[1:])

    def _set_block(self, seq: int, ident: int, born: int, blk: int, content: bytes) -> None:
        self._set_blocks(seq, ident, born, blk, [content])

    def _set_blocks(self, seq: int, ident: int, born: int, blk: int,
                    contents: list, span: memoryview | None = None) -> None:
        """New versions of consecutive blocks from ``blk`` on (b"" = a hole)."""
        blks = range(blk, blk + len(contents))
        rows = [[ident, b, seq, 0, 0, 0, 0] for b in blks]
        self._blk.update(zip([(ident, born, b) for b in blks], contents, strict=True))
        self._blk_bytes += sum(map(len, contents)) + 64 * len(contents)
        if span is None:
            self.builder.add_run(ident, contents, rows)
        else:
            self.builder.add_span(ident, span, contents, rows)
        self._blk_rows += rows
        if self._blk_bytes > self.OVERLAY_MAX:
            self._flush_blocks()
            self._blk.clear()
            self._blk_bytes = 0

    def _extents(self, ident: int, st: list, first: int, last: int) -> dict[int, Any]:
        """Blocks in [first, last] that hold data now: blk -> content bytes (staged) or a
        stored location tuple (gloc, glen, boff, blen)."""
        born = st[BORN]
        out: dict[int, Any] = {
            r[0]: r[1:] for r in self.db.execute(BLOCK_EXTENTS_SQL, (ident, first, last, born))}
        if last - first < len(self._blk):
            staged = ((b, self._blk.get((ident, born, b))) for b in range(first, last + 1))
        else:
            staged = ((k[2], v) for k, v in self._blk.items()
                      if k[0] == ident and k[1] == born and first <= k[2] <= last)
        for b, content in staged:
            if content is None:
                continue
            if content:
                out[b] = bytes(content)
            else:
                out.pop(b, None)
        return out

    def _zero(self, seq: int, ident: int, st: list, a: int, b: int) -> None:
        """Make [a, b) read as zeros (only what lies below the file size holds data)."""
        b = min(b, st[SIZE])
        if a >= b:
            return
        first, last = a // BS, (b - 1) // BS
        born = st[BORN]
        if a % BS:
            cur = self._current(ident, st, first)
            lo, hi = a % BS, min(BS, b - first * BS)
            if len(cur) > lo:
                self._set_block(seq, ident, born, first,
                                trim(cur[:lo] + bytes(hi - lo) + cur[hi:]))
            first += 1
        if last >= first and b % BS and b < st[SIZE]:
            cur = self._current(ident, st, last)
            hi = b % BS
            if cur:
                self._set_block(seq, ident, born, last, trim(bytes(hi) + cur[hi:]))
            last -= 1
        if last >= first:
            for blk in self._extents(ident, st, first, last):
                self._set_block(seq, ident, born, blk, b"")

    def _truncate(self, seq: int, ident: int, size: int, mtime_ns: int) -> None:
        st = self._data_node(ident)
        _uint(size, "size", MAX_FILE_SIZE)
        mtime_ns = _sint(mtime_ns, "mtime")
        if st is None:
            return
        if size < st[SIZE]:
            self._zero(seq, ident, st, size, st[SIZE])
        st[SIZE] = size
        st[MTIME] = mtime_ns
        self._touch(ident)

    def _fallocate(self, seq: int, ident: int, mode: int, offset: int, length: int,
                   mtime_ns: int) -> None:
        st = self._data_node(ident)
        _uint(mode, "fallocate mode", 1 << 32)
        _uint(offset, "offset", MAX_FILE_SIZE)
        _uint(length, "length", MAX_FILE_SIZE)
        mtime_ns = _sint(mtime_ns, "mtime")
        if length == 0 or offset + length > MAX_FILE_SIZE:
            raise CorruptDataError(f"record {seq}: bad fallocate range")
        if st is None:
            return
        end = offset + length
        keep = mode & FALLOC_KEEP_SIZE
        if mode & FALLOC_PUNCH_HOLE:
            if not keep or mode & (FALLOC_ZERO_RANGE | FALLOC_COLLAPSE_RANGE
                                   | FALLOC_INSERT_RANGE):
                raise CorruptDataError(f"record {seq}: bad fallocate mode {mode:#x}")
            self._zero(seq, ident, st, offset, end)
        elif mode & FALLOC_COLLAPSE_RANGE:
            if mode != FALLOC_COLLAPSE_RANGE or end >= st[SIZE]:
                raise CorruptDataError(f"record {seq}: bad collapse range")
            self._shift(seq, ident, st, offset, -length)
        elif mode & FALLOC_INSERT_RANGE:
            if mode != FALLOC_INSERT_RANGE or offset >= st[SIZE] \
                    or st[SIZE] + length > MAX_FILE_SIZE:
                raise CorruptDataError(f"record {seq}: bad insert range")
            self._shift(seq, ident, st, offset, length)
        else:
            if mode & FALLOC_ZERO_RANGE:
                self._zero(seq, ident, st, offset, end)
            if not keep and end > st[SIZE]:
                st[SIZE] = end
        st[MTIME] = mtime_ns
        self._touch(ident)

    def _shift(self, seq: int, ident: int, st: list, offset: int, delta: int) -> None:
        """Move everything from ``offset`` on by ``delta`` bytes (collapse < 0 < insert)."""
        size = st[SIZE]
        if offset % BS or delta % BS:
            # Not block-aligned (a filesystem with smaller blocks): move the bytes.
            start = offset - delta if delta < 0 else offset
            tail = self._get(ident, st, start, size - start)
            self._zero(seq, ident, st, offset, size)
            st[SIZE] = offset
            self._put(seq, ident, st, offset + max(delta, 0), tail)
            st[SIZE] = size + delta
            return
        k, s0, born = delta // BS, offset // BS, st[BORN]
        src = self._extents(ident, st, s0, (size - 1) // BS)
        if delta < 0:
            targets = {b for b in src} | {b + k for b in src if b + k >= s0}
        else:
            targets = {b for b in src} | {b + k for b in src}
        for t in sorted(targets):
            new = src.get(t - k) if t - k >= s0 else None
            if new is None:
                if t in src:
                    self._set_block(seq, ident, born, t, b"")
            elif isinstance(new, bytes):
                self._set_block(seq, ident, born, t, new)
            else:  # reuse the stored block: no data is copied
                self._blk.pop((ident, born, t), None)
                self._blk_rows.append([ident, t, seq, *new])
        st[SIZE] = size + delta
        self._flush_blocks()  # rows that point at stored blocks must be visible to lookups

    def _get(self, ident: int, st: list, offset: int, n: int) -> bytes:
        """Current content of the file (writer side; used for unaligned shifts)."""
        out = bytearray(n)
        blk = offset // BS
        while blk * BS < offset + n:
            content = self._current(ident, st, blk)
            a = max(offset, blk * BS)
            b = min(offset + n, blk * BS + len(content))
            if b > a:
                out[a - offset:b - offset] = content[a - blk * BS:b - blk * BS]
            blk += 1
        return bytes(out)

    # ---- flushing --------------------------------------------------------------------------
    def _flush_blocks(self) -> None:
        self.builder.seal()
        if self._blk_rows:
            self.db.executemany("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
                                self._blk_rows)
            self._blk_rows = []

    def _flush(self) -> None:
        self._flush_blocks()
        db = self.db
        if self._node_rows:
            db.executemany(f"INSERT OR REPLACE INTO nodes (ident, seq, {NODE_COLS}) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self._node_rows)
            self._node_rows = []
        if self._ent_rows:
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)",
                           [(*k, v) for k, v in self._ent_rows.items()])
            self._ent_rows = {}
        if self._xattr_rows:
            db.executemany("INSERT OR REPLACE INTO xattrs VALUES (?, ?, ?, ?)",
                           self._xattr_rows)
            self._xattr_rows = []
        if len(self._nodes) > self.CACHE_MAX:
            self._nodes.clear()
        if len(self._ents) > self.CACHE_MAX:
            self._ents.clear()
        if self._blk_bytes > self.OVERLAY_MAX // 2:
            self._blk.clear()
            self._blk_bytes = 0


_HANDLERS: dict[int, Callable[..., None]] = {
    Op.NEW: VolumeIndex._new,
    Op.LINK: VolumeIndex._link,
    Op.REMOVE: VolumeIndex._remove,
    Op.RENAME: VolumeIndex._rename,
    Op.WRITE: VolumeIndex._write,
    Op.TRUNCATE: VolumeIndex._truncate,
    Op.SETATTR: VolumeIndex._setattr,
    Op.SETXATTR: VolumeIndex._setxattr,
    Op.REMOVEXATTR: VolumeIndex._removexattr,
    Op.FALLOCATE: VolumeIndex._fallocate,
}
