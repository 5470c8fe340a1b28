"""A checkpoint's tree read from the journal server over the control protocol (the ``view``
request of ``zfsrep.inplace``), as a :class:`zfsrep.view.SnapshotView`.

A protected mount restoring its volume in place copies the tree with ``zfsrep.restore``
from this view, in a worker thread of its trio loop: every call goes over one control
connection owned by the loop (``trio.from_thread.run``). Whatever the server answers is
checked before it is used: a node is eight integers, names and contents are bytes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from zfsrep import protocol
from zfsrep.errors import CorruptDataError, ZfsrepError
from zfsrep.view import Node

#: bytes per read request (the server answers at most zfsrep.inplace.MAX_READ)
READ = 1 << 20
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
        self._conn: protocol.MessageStream | None = None
        self._xattrs: tuple[int, dict[bytes, bytes]] | None = None
        self.requests = 0
        self.root = _node(self._call("node", ident=None)).ident

    # ---- on the trio loop ------------------------------------------------------------------
    async def _request(self, args: dict) -> Any:
        if self._conn is None:
            self._conn, _ = await protocol.connect(self.address, {"role": "control"})
        try:
            with trio.fail_after(TIMEOUT):
                await self._conn.send({"t": "req", "op": "view", "args": args})
                reply = await self._conn.receive()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as e:
            await self._aclose()
            raise protocol.ServerUnreachable(
                f"lost the journal server while reading checkpoint data: "
                f"{str(e) or type(e).__name__}") from None
        if reply is None:
            await self._aclose()
            raise protocol.ServerUnreachable("the journal server closed the connection")
        return protocol.raise_for_error(reply).get("result")

    async def _aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    # ---- from the worker thread ------------------------------------------------------------
    def _call(self, what: str, **args: object) -> Any:
        self.requests += 1
        return trio.from_thread.run(self._request, {**self._args, "what": what, **args})

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
        parts = []
        while size > 0:
            data = self._call("read", ident=ident, offset=offset, size=min(size, READ))
            if not isinstance(data, bytes) or len(data) > size:
                raise CorruptDataError("the server sent malformed file data")
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

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
        with contextlib.suppress(ZfsrepError, trio.RunFinishedError):
            trio.from_thread.run(self._aclose)

