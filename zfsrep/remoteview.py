"""A checkpoint's tree read from the journal server over the control protocol (the ``view``
request of ``zfsrep.inplace``), as a :class:`zfsrep.view.SnapshotView`.

A protected mount restoring its volume in place copies the tree with ``zfsrep.restore``
from this view, in a worker thread: every call is a request on one blocking control
connection (``zfsrep.wire``), so the mount's event loop is not involved. Whatever the server
answers is checked before it is used: a node is eight integers, names and contents are
bytes.
"""

from __future__ import annotations

import threading
from typing import Any

from zfsrep import wire
from zfsrep.errors import CorruptDataError
from zfsrep.view import Node

#: bytes per read request (the server answers at most zfsrep.inplace.MAX_READ)
READ = 4 << 20
PAGE = 1024
TIMEOUT = 120.0


def _node(fields: object) -> Node:
    if not isinstance(fields, list) or len(fields) != 8 or any(
            type(f) is not int for f in fields):
        raise CorruptDataError(f"the server sent a malformed node: {fields!r:.80}")
    return Node(*fields)


class RemoteView:
    """The tree of ``volume`` of ``vpg`` at record ``seq``, on the server at ``address``."""

    def __init__(self, address: tuple[str, int], vpg: str, volume: str, seq: int) -> None:
        self.address = address
        self.seq = seq
        self._args = {"vpg": vpg, "volume": volume, "seq": seq}
        self._conn: wire.Connection | None = None
        self._lock = threading.Lock()
        self._xattrs: tuple[int, dict[bytes, bytes]] | None = None
        #: the last data fetched: (ident, offset, data, bytes asked; fewer means end of file)
        self._window: tuple[int, int, bytes, int] | None = None
        self.requests = 0
        self.root = _node(self._call("node", ident=None)).ident

    def _call(self, what: str, **args: object) -> Any:
        with self._lock:
            self.requests += 1
            if self._conn is None:
                self._conn = wire.Connection(self.address, timeout=TIMEOUT)
            try:
                return self._conn.request("view", {**self._args, "what": what, **args})
            except wire.ServerUnreachable:
                self._conn.close()
                self._conn = None
                raise

    def getattr(self, ident: int) -> Node:
        return _node(self._call("node", ident=ident))

    def lookup(self, parent: int, name: bytes) -> Node | None:
        for entry_name, node in self.readdir(parent, b"", 1 << 30):
            if entry_name == name:
                return node
        return None

    def readdir(self, parent: int, after: bytes = b"", limit: int = 1 << 30
                ) -> list[tuple[bytes, Node]]:
        out: list[tuple[bytes, Node]] = []
        while len(out) < limit:
            page = self._call("readdir", ident=parent, after=after,
                              limit=min(PAGE, limit - len(out)))
            if not isinstance(page, list):
                raise CorruptDataError("the server sent a malformed directory page")
            for item in page:
                if not isinstance(item, list) or len(item) != 2 or not isinstance(
                        item[0], bytes) or item[0] <= after:
                    raise CorruptDataError("the server sent a malformed directory entry")
                after = item[0]
                out.append((after, _node(item[1])))
            if len(page) < PAGE:
                break
        return out

    def readlink(self, ident: int) -> bytes:
        target = self._call("readlink", ident=ident)
        if not isinstance(target, bytes):
            raise CorruptDataError("the server sent a malformed symlink target")
        return target

    def read(self, ident: int, offset: int, size: int) -> bytes:
        """File data; a read past the window held is answered from READ bytes fetched at
        once (a file is copied front to back in smaller pieces: fewer round trips)."""
        held = self._window
        if held is not None and held[0] == ident and held[1] <= offset and (
                offset + size <= held[1] + len(held[2]) or len(held[2]) < held[3]):
            lo = offset - held[1]
            return held[2][lo:lo + size]
        want = max(size, READ)
        data = self._call("read", ident=ident, offset=offset, size=want)
        if not isinstance(data, bytes) or len(data) > want:
            raise CorruptDataError("the server sent malformed file data")
        self._window = (ident, offset, data, want)
        return data[:size]

    def _xattrs_of(self, ident: int) -> dict[bytes, bytes]:
        if self._xattrs is None or self._xattrs[0] != ident:
            got = self._call("xattrs", ident=ident)
            if not isinstance(got, dict) or not all(
                    isinstance(k, bytes) and isinstance(v, bytes) for k, v in got.items()):
                raise CorruptDataError("the server sent malformed extended attributes")
            self._xattrs = (ident, got)
        return self._xattrs[1]

    def listxattr(self, ident: int) -> list[bytes]:
        return sorted(self._xattrs_of(ident))

    def getxattr(self, ident: int, name: bytes) -> bytes | None:
        return self._xattrs_of(ident).get(name)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

