"""Unit tests of server pieces that need no process: a mark on a connection that just closed
is an answer ("disconnected"), never an exception that could stop the server."""

from __future__ import annotations

import trio
import trio.testing

from zfsrep import protocol
from zfsrep.server import VolumeConnection


async def test_mark_on_a_closed_connection_is_an_answer() -> None:
    a, _b = trio.testing.memory_stream_pair()
    conn = protocol.MessageStream(a)
    await conn.aclose()
    vc = VolumeConnection(conn, trio.CancelScope())
    assert await vc.mark() == (None, "the mount disconnected")


async def test_mark_returns_the_position_the_mount_answers() -> None:
    a, b = trio.testing.memory_stream_pair()
    server_side, mount_side = protocol.MessageStream(a), protocol.MessageStream(b)
    vc = VolumeConnection(server_side, trio.CancelScope())

    async def mount() -> None:
        msg = await mount_side.receive()
        assert msg is not None and msg["t"] == "mark"
        vc.marked({"t": "marked", "id": msg["id"], "seq": 42, "reason": None})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount)
        assert await vc.mark() == (42, None)
