"""Reading a volume's index at one stream position (docs/store-index.md).

:class:`IndexView` implements ``zfsrep.view.SnapshotView`` over the index that
``zfsrep.index.VolumeIndex`` writes. This module also holds what both sides share: the schema
and the file names. Every row is a version valid from its ``seq`` until the next row with the
same key, so the object at position S is the row with the greatest ``seq <= S``: one indexed
seek per key, whatever the position. Rows are only ever inserted, so a view at S never sees a
row change while the writer goes on (in another process, through SQLite's WAL).
"""

from __future__ import annotations

import bisect
import errno
import os
import sqlite3
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from zfsrep.blockstore import GROUP_RAW_MAX, PACK_MASK, PACK_SHIFT, PackReader
from zfsrep.errors import CorruptDataError, NotFoundError, OSFailure, StateError
from zfsrep.records import BLOCK_SIZE
from zfsrep.view import Node

BS = BLOCK_SIZE
FORMAT = 1
INDEX_NAME = "index.sqlite"
NODE_COLS = "mode, uid, gid, size, mtime_ns, rdev, nlink, born, parent, target"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes(
    ident INTEGER NOT NULL, seq INTEGER NOT NULL,
    mode INTEGER, uid INTEGER, gid INTEGER, size INTEGER, mtime_ns INTEGER, rdev INTEGER,
    nlink INTEGER, born INTEGER, parent INTEGER, target BLOB,
    PRIMARY KEY (ident, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entries(
    parent INTEGER NOT NULL, name BLOB NOT NULL, seq INTEGER NOT NULL, ident INTEGER,
    PRIMARY KEY (parent, name, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS xattrs(
    ident INTEGER NOT NULL, name BLOB NOT NULL, seq INTEGER NOT NULL, value BLOB,
    PRIMARY KEY (ident, name, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks(
    ident INTEGER NOT NULL, blk INTEGER NOT NULL, seq INTEGER NOT NULL,
    gloc INTEGER NOT NULL, glen INTEGER NOT NULL, boff INTEGER NOT NULL, blen INTEGER NOT NULL,
    PRIMARY KEY (ident, blk, seq)) WITHOUT ROWID;
"""

# The latest version at or before a position (?4) of every block in [?1, ?2] of one object
# (?3), among the versions since its birth (?5): one range scan of the primary key.
#: blocks whose rows one query fetches for reads that follow (8 MiB)
MAP_WINDOW = 2048

BLOCK_RANGE_SQL = """
SELECT blk, gloc, glen, boff, blen FROM (
  SELECT blk, gloc, glen, boff, blen, max(seq) FROM blocks
   WHERE ident = ?3 AND blk BETWEEN ?1 AND ?2 AND seq <= ?4 AND seq >= ?5 GROUP BY blk)
WHERE blen > 0 ORDER BY blk
"""


#: The runs of a block range with one row per run (see IndexView._whole_runs): blocks stored
#: back to back in one group share ``blk * BS - boff``.
RUNS_SQL = f"""
SELECT min(blk), max(blk), gloc, glen, min(boff), count(*), sum(blen < {BS}),
       max(CASE WHEN blen < {BS} THEN blk END),
       max(blk * {BS * 2} + blen) - max(blk) * {BS * 2}, sum(blen = 0)
  FROM blocks WHERE ident = ?3 AND blk BETWEEN ?1 AND ?2 AND seq <= ?4 AND seq >= ?5
 GROUP BY gloc, blk * {BS} - boff
"""

_ZEROS = bytes(1 << 20)


def _clip(runs: list[tuple], offset: int, end: int):
    """:meth:`IndexView._whole_runs` runs clipped to ``offset..end``, as
    :meth:`IndexView._runs` gives them."""
    for start, stop, gloc, glen, boff in runs:
        a, b = max(offset, start), min(end, stop)
        if b > a:
            yield a, b, gloc, glen, boff + a - start


def _zero(dst: memoryview) -> None:
    for at in range(0, len(dst), len(_ZEROS)):
        part = dst[at:at + len(_ZEROS)]
        part[:] = _ZEROS[:len(part)]


def index_path(voldir: Path) -> Path:
    return voldir / INDEX_NAME


class IndexView:
    """The tree of a volume at position ``seq``, read from its index (read-only).

    Safe to use from several threads (one lock); the writer may go on in another process.
    ``queries`` counts SQL statements and ``packs.preads`` pack reads (cost accounting).
    """

    NODE_CACHE = 4096

    def __init__(self, voldir: Path, seq: int) -> None:
        self.voldir = Path(voldir)
        path = index_path(self.voldir)
        if not path.is_file():
            raise NotFoundError(f"no volume index in {self.voldir}")
        try:
            self._db = sqlite3.connect(f"file:{quote(os.fsdecode(path))}?mode=ro", uri=True,
                                       check_same_thread=False)
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as e:
            raise OSFailure(f"cannot open index {path}: {e}") from None
        if meta.get("format") != FORMAT:
            self._db.close()
            raise StateError(f"index {path} has an unknown format")
        if type(seq) is not int or not 0 <= seq <= meta["indexed_seq"]:
            self._db.close()
            raise StateError(f"position {seq} of volume {self.voldir} is not indexed yet "
                             f"(indexed up to {meta['indexed_seq']})")
        self.root: int = meta["root_ident"]
        self.seq = seq
        self.packs = PackReader(self.voldir)
        self.queries = 0
        self._lock = threading.Lock()
        self._nodes: OrderedDict[int, tuple[Node, int, bytes | None]] = OrderedDict()
        self._map: tuple[int, int, int, list[tuple]] | None = None  # (ident, first, last, rows)

    def _q(self, sql: str, args: tuple) -> sqlite3.Cursor:
        self.queries += 1
        return self._db.execute(sql, args)

    def _node(self, ident: int) -> tuple[Node, int, bytes | None]:
        hit = self._nodes.get(ident)
        if hit is not None:
            self._nodes.move_to_end(ident)
            return hit
        row = self._q(f"SELECT {NODE_COLS} FROM nodes WHERE ident = ? AND seq <= ? "
                      "ORDER BY seq DESC LIMIT 1", (ident, self.seq)).fetchone()
        if row is None or row[0] is None:
            raise NotFoundError(f"no object {ident} at position {self.seq}")
        return self._remember(ident, row)

    def _remember(self, ident: int, row: tuple) -> tuple[Node, int, bytes | None]:
        mode, uid, gid, size, mtime, rdev, nlink, born, _parent, target = row
        hit = (Node(ident, mode, uid, gid, size, mtime, nlink, rdev), born, target)
        self._nodes[ident] = hit
        if len(self._nodes) > self.NODE_CACHE:
            self._nodes.popitem(last=False)
        return hit

    def getattr(self, ident: int) -> Node:
        with self._lock:
            return self._node(ident)[0]

    def lookup(self, parent: int, name: bytes) -> Node | None:
        with self._lock:
            row = self._q("SELECT ident FROM entries WHERE parent = ? AND name = ? AND seq <= ? "
                          "ORDER BY seq DESC LIMIT 1", (parent, name, self.seq)).fetchone()
            if row is None or row[0] is None:
                return None
            return self._node(row[0])[0]

    def readdir(self, parent: int, after: bytes = b"", limit: int = 1 << 30
                ) -> list[tuple[bytes, Node]]:
        with self._lock:
            node = self._node(parent)[0]
            if not stat.S_ISDIR(node.mode):
                raise OSError(errno.ENOTDIR, f"object {parent} is not a directory")
            rows = self._q(
                f"""SELECT e.name, e.ident, {', '.join('n.' + c for c in NODE_COLS.split(', '))}
                FROM (SELECT name, ident, max(seq) FROM entries
                       WHERE parent = ?1 AND name > ?2 AND seq <= ?3 GROUP BY name) e
                JOIN nodes n ON n.ident = e.ident AND n.seq = (
                     SELECT max(seq) FROM nodes WHERE ident = e.ident AND seq <= ?3)
                WHERE e.ident IS NOT NULL ORDER BY e.name LIMIT ?4""",
                (parent, after, self.seq, limit)).fetchall()
            return [(r[0], self._remember(r[1], r[2:])[0]) for r in rows]

    def readlink(self, ident: int) -> bytes:
        with self._lock:
            node, _, target = self._node(ident)
        if not stat.S_ISLNK(node.mode) or target is None:
            raise OSError(errno.EINVAL, f"object {ident} is not a symlink")
        return target

    def _span(self, ident: int, offset: int, size: int) -> tuple[int, int]:
        """(born, end) of a read of ``offset..offset+size``, ``end`` clipped to the size."""
        node, born, _ = self._node(ident)
        if stat.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, f"object {ident} is a directory")
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative read range")
        return born, min(node.size, offset + size)

    def _range(self, ident: int, offset: int, size: int) -> tuple[int, list[tuple]]:
        """(end, block rows) of a read of ``offset..offset+size`` (clipped to the size)."""
        born, end = self._span(ident, offset, size)
        if end <= offset:
            return end, []
        return end, self._block_rows(ident, born, offset // BS, (end - 1) // BS)

    def _runs(self, rows: list[tuple], offset: int, end: int):
        """Runs of consecutive whole blocks stored back to back in one group, clipped to
        ``offset..end``: (file start, file end, gloc, glen, offset in the raw group)."""
        i, n = 0, len(rows)
        while i < n:
            blk, gloc, glen, boff, blen = rows[i]
            j = i
            while (j + 1 < n and rows[j][4] == BS and rows[j + 1][0] == rows[j][0] + 1
                   and rows[j + 1][1] == gloc and rows[j + 1][3] == rows[j][3] + BS):
                j += 1
            run_len = (rows[j][0] - blk) * BS + rows[j][4]
            a = max(offset, blk * BS)
            b = min(end, blk * BS + run_len)
            if b > a:
                if boff + run_len > GROUP_RAW_MAX:
                    raise CorruptDataError(f"block outside its group at {gloc:#x}")
                yield a, b, gloc, glen, boff + a - blk * BS
            i = j + 1

    def read(self, ident: int, offset: int, size: int) -> bytes:
        """File content (short at the end, holes as zeros). Bytes a pack holds as they are
        are read from it straight into the answer; compressed ones come from the cache."""
        buf = bytearray(size)
        return bytes(memoryview(buf)[:self.read_into(ident, offset, size, buf)])

    def read_into(self, ident: int, offset: int, size: int, buf: bytearray) -> int:
        """:meth:`read` into ``buf`` (at least ``size`` bytes, reused by the caller: the
        snapshot mount answers every request from one buffer instead of allocating, zeroing
        and copying two new ones per MiB); returns the length read. Holes are zeroed here,
        since the buffer may hold an earlier answer."""
        with self._lock:
            end, rows = self._range(ident, offset, size)
            if end <= offset:
                return 0
            dst = memoryview(buf)[:end - offset]
            pos = offset  # first byte not yet filled
            for at, length, pack_no, src in self._extents(self._runs(rows, offset, end)):
                if at > pos:
                    _zero(dst[pos - offset:at - offset])
                pos = at + length
                piece = dst[at - offset:at - offset + length]
                if pack_no is None:
                    piece[:] = src
                    continue
                fd = self.packs.fd(pack_no)
                while piece:
                    got = os.preadv(fd, [piece], src)
                    if not got:
                        raise CorruptDataError(f"pack {pack_no} ends inside a block")
                    piece, src = piece[got:], src + got
            if pos < end:
                _zero(dst[pos - offset:])
            return end - offset

    def extents(self, ident: int, offset: int, size: int) -> list[tuple]:
        """The data of ``offset..offset+size`` as extents, holes left out: ``(file offset,
        length, pack_no, pack offset)`` for bytes a pack holds as they are (to be copied
        straight from :meth:`pack_fd`, adjacent ones merged), ``(file offset, length, None,
        bytes)`` for bytes decompressed here."""
        with self._lock:
            born, end = self._span(ident, offset, size)
            if end <= offset:
                return []
            first, last = offset // BS, (end - 1) // BS
            runs = self._whole_runs(ident, born, first, last)
            if runs is not None:
                return self._extents(_clip(runs, offset, end))
            return self._extents(self._runs(self._block_rows(ident, born, first, last),
                                            offset, end))

    def _whole_runs(self, ident: int, born: int, first: int, last: int
                    ) -> list[tuple] | None:
        """The runs of blocks ``first..last`` stored back to back, one row per run from
        SQLite instead of one per block (a GiB has 262,144 blocks, and building their rows
        in Python cost ~0.9 CPU-s): ``(file start, file end, gloc, glen, offset in the raw
        group)`` like :meth:`_runs` (unclipped). None when a block of the range has more than
        one version or a hole (the rows then say which version wins, block by block): the
        runs are sorted and must neither overlap nor have a gap inside, every block but a
        run's last must be whole, and no block may be empty; two versions of a block are in
        two runs, which then overlap."""
        found = self._q(RUNS_SQL, (first, last, ident, self.seq, born)).fetchall()
        found.sort()
        out: list[tuple] = []
        prev_end = -1
        for lo_blk, hi_blk, gloc, glen, boff, count, short, short_blk, last_len, empty in found:
            if (empty or lo_blk <= prev_end or count != hi_blk - lo_blk + 1
                    or short > 1 or (short == 1 and short_blk != hi_blk)):
                return None
            run_len = (hi_blk - lo_blk) * BS + last_len
            if boff + run_len > GROUP_RAW_MAX:
                raise CorruptDataError(f"block outside its group at {gloc:#x}")
            out.append((lo_blk * BS, lo_blk * BS + run_len, gloc, glen, boff))
            prev_end = hi_blk
        return out

    def _extents(self, pieces: Iterable[tuple]) -> list[tuple]:
        """Extents from clipped runs ``(file start, file end, gloc, glen, offset in the raw
        group)`` (:meth:`_runs` or :func:`_clip`), compressed groups loaded in few reads."""
        pieces = list(pieces)
        self.packs.prefetch([(p[2], p[3]) for p in pieces if p[3] & 1])
        out: list[tuple] = []
        for a, b, gloc, glen, lo in pieces:
            if glen & 1:
                raw = self.packs.group(gloc, glen)
                if lo + b - a > len(raw):
                    raise CorruptDataError(f"block outside its group at {gloc:#x}")
                out.append((a, b - a, None, raw[lo:lo + b - a]))
                continue
            if lo + b - a > glen >> 1:
                raise CorruptDataError(f"block outside its group at {gloc:#x}")
            pack_no, at = gloc >> PACK_SHIFT, (gloc & PACK_MASK) + lo
            last = out[-1] if out else None
            if (last is not None and last[2] == pack_no and last[0] + last[1] == a
                    and last[3] + last[1] == at):
                out[-1] = (last[0], last[1] + b - a, pack_no, last[3])
            else:
                out.append((a, b - a, pack_no, at))
        return out

    def pack_fd(self, pack_no: int) -> int:
        """A descriptor of pack ``pack_no`` (owned by the view: do not close it)."""
        return self.packs.fd(pack_no)

    def _block_rows(self, ident: int, born: int, first: int, last: int) -> list[tuple]:
        """The block rows of ``first..last``. One query fetches a window of MAP_WINDOW
        blocks, and the reads that follow within it (a file read front to back in 128 KiB
        requests) are served from it: the view never changes."""
        m = self._map
        if m is None or m[0] != ident or first < m[1] or last > m[2]:
            hi = max(last, first + MAP_WINDOW - 1)
            m = self._map = (ident, first, hi, self._q(
                BLOCK_RANGE_SQL, (first, hi, ident, self.seq, born)).fetchall())
        rows = m[3]
        return rows[bisect.bisect_left(rows, (first,)):bisect.bisect_left(rows, (last + 1,))]

    def listxattr(self, ident: int) -> list[bytes]:
        with self._lock:
            born = self._node(ident)[1]
            rows = self._q("SELECT name FROM (SELECT name, value, max(seq) FROM xattrs "
                           "WHERE ident = ? AND seq <= ? AND seq >= ? GROUP BY name) "
                           "WHERE value IS NOT NULL ORDER BY name",
                           (ident, self.seq, born)).fetchall()
            return [r[0] for r in rows]

    def getxattr(self, ident: int, name: bytes) -> bytes | None:
        with self._lock:
            born = self._node(ident)[1]
            row = self._q("SELECT value, seq FROM xattrs WHERE ident = ? AND name = ? "
                          "AND seq <= ? ORDER BY seq DESC LIMIT 1",
                          (ident, name, self.seq)).fetchone()
            if row is None or row[1] < born:
                return None
            return row[0]

    def reopen(self) -> IndexView:
        """A new view of the same tree (for another process: a connection is not shared)."""
        view = IndexView(self.voldir, self.seq)
        view.packs.sequential = self.packs.sequential
        return view

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.packs.close()
            self._nodes.clear()

    def __enter__(self) -> IndexView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
