"""Unit tests of the message codec (no server): framing, bounds, the zero-copy data message,
server addresses."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing

from zfsrep import frames, protocol, wire
from zfsrep.errors import ZfsrepError
from zfsrep.spool import FileRange


def _pair() -> tuple[protocol.MessageStream, protocol.MessageStream]:
    a, b = trio.testing.memory_stream_pair()
    return protocol.MessageStream(a), protocol.MessageStream(b)


async def test_messages_round_trip_including_the_data_message() -> None:
    frame = frames.encode_frame([[1, 0, 9, 1, b"name", b"value"]])
    left, right = _pair()
    await left.send({"t": "hello", "n": 1, "b": b"\x00\xff"})
    await left.send_frames([frame])
    assert await right.receive() == {"t": "hello", "n": 1, "b": b"\x00\xff"}
    got = await right.receive()
    assert got is not None and got["t"] == "data" and bytes(got["frame"]) == frame
    await left.aclose()
    assert await right.receive() is None


@pytest.mark.parametrize("raw, match", [
    (struct.pack(">I", protocol.MAX_MESSAGE + 1), "exceeds limit"),
    (struct.pack(">I", 3) + b"\x92\x01\x02", "not a map"),
    (struct.pack(">I", 2) + b"\xc1\xc1", "malformed"),
    (struct.pack(">I", 10) + b"\x81", "closed inside a message"),
    (b"\x00\x00", "closed inside a message"),
])
async def test_malformed_input_is_a_protocol_error(raw: bytes, match: str) -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(raw)
    await a.aclose()
    with pytest.raises(protocol.ProtocolError, match=match):
        await protocol.MessageStream(b).receive()



def test_the_largest_message_holds_the_largest_frame() -> None:
    assert wire.MAX_FRAME == frames.HEADER_SIZE + frames.MAX_COMP_LEN

def test_error_replies_carry_the_exit_code() -> None:
    with pytest.raises(ZfsrepError, match="no VPG") as e:
        protocol.raise_for_error({"t": "error", "code": 3, "error": "no VPG named x"})
    assert e.value.exit_code == 3
    assert protocol.raise_for_error({"t": "result", "result": 1}) == {"t": "result",
                                                                      "result": 1}


def test_server_address_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(protocol.SERVER_ENV, raising=False)
    assert protocol.server_address(None) == ("127.0.0.1", 7450)
    monkeypatch.setenv(protocol.SERVER_ENV, "10.0.0.2:9000")
    assert protocol.server_address(None) == ("10.0.0.2", 9000)
    assert protocol.server_address("[::1]:7") == ("::1", 7)
    for bad in ("nohost", ":80", "h:0", "h:99999", "h:x"):
        with pytest.raises(ZfsrepError) as e:
            protocol.parse_address(bad)
        assert e.value.exit_code == 2


def test_unreachable_server_is_exit_code_8() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(protocol.ServerUnreachable) as e:
        protocol.call(("127.0.0.1", port), "ping")
    assert e.value.exit_code == 8


async def test_large_data_message_is_read_into_its_own_buffer() -> None:
    import os

    frame = frames.encode_frame([[1, 0, 5, 7, 0, os.urandom(300_000), None, 0]])
    left, right = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.send_frames, [[frame[:100], memoryview(frame)[100:]]])
        got = await right.receive()
    assert got is not None and bytes(got["frame"]) == frame
    header, records = frames.decode_frame(got["frame"])
    assert header.first_seq == 1 and records[0][5] == frames.decode_frame(frame)[1][0][5]


async def test_released_buffers_are_reused_for_later_large_messages() -> None:
    a, b = trio.testing.memory_stream_pair()
    receiver = protocol.MessageStream(b)
    buf = bytearray(300_000)
    receiver.release({"t": "data", "frame": memoryview(buf)[40:]})
    receiver.release({"t": "data", "frame": b"not pooled"})
    payload = bytes(range(256)) * 800  # 204,800 bytes
    await a.send_all(payload)
    view = await receiver._receive_direct(len(payload))
    assert view.obj is buf and bytes(view) == payload


def test_the_blocking_call_times_out_and_refuses_malformed_answers() -> None:
    import socket
    import threading

    from zfsrep import wire

    def serve(listener: socket.socket, answer: bytes | None) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)
            if answer is not None:
                conn.sendall(answer)  # and close: a truncated answer ends there
            else:
                conn.recv(1 << 16)  # until the client gives up

    for answer, code, text in ((None, 8, "did not answer"),
                               (b"\xff\xff\xff\xff", 5, "exceeds limit"),
                               (wire.pack({"t": "welcome"})[:-1], 8, "closed")):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            t = threading.Thread(target=serve, args=(listener, answer), daemon=True)
            t.start()
            with pytest.raises(ZfsrepError) as e:
                wire.call(listener.getsockname(), "ping", timeout=0.5, connect_timeout=0.5)
            assert e.value.exit_code == code and text in str(e.value), e.value
            t.join(5)


async def test_a_frame_in_a_file_is_sent_by_the_kernel_as_a_data_message(tmp_path) -> None:
    """send_frames of a file range over a real socket: the bytes at the offset arrive as one
    data message (the sender waits while the peer's small buffer is full), and the file's
    own position is left where it was."""
    import os
    import socket

    frame = frames.encode_frame([[1, 0, 5, 7, 0, os.urandom(3_000_000), None, 0]])
    path = tmp_path / "segment"
    path.write_bytes(b"x" * 1000 + frame + b"y" * 10)
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    left = protocol.MessageStream(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    right = protocol.MessageStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_frames, [FileRange(fd, 1000, len(frame))])
            await trio.sleep(0.2)  # the sender fills the buffers and waits for the reader
            got = await right.receive()
        assert got is not None and got["t"] == "data" and bytes(got["frame"]) == frame
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
    finally:
        os.close(fd)
        await left.aclose()
        await right.aclose()


def test_a_link_session_that_ends_as_expected_is_one_line_not_a_traceback() -> None:
    """The replication link's session tasks fail together (an exception group): a server
    that went away is logged by its message; anything unexpected keeps its traceback."""
    from zfsrep.link import _cause

    gone = protocol.ServerUnreachable("the journal server closed the connection")
    assert _cause(ExceptionGroup("session", [gone])) is gone
    assert _cause(ExceptionGroup("outer", [ExceptionGroup("inner", [gone]),
                                           ConnectionResetError()])) is gone
    assert _cause(ExceptionGroup("session", [gone, KeyError("bug")])) is None
    assert _cause(KeyError("bug")) is None
    assert _cause(BrokenPipeError()) is not None


def test_sending_a_file_frame_to_a_peer_that_reads_nothing_times_out(tmp_path, monkeypatch
                                                                      ) -> None:
    """A stalled peer does not hold the link's sending thread for ever: sendfile waits up to
    SEND_TIMEOUT for room, then the send fails (the link reconnects)."""
    import os
    import socket

    monkeypatch.setattr(protocol, "SEND_TIMEOUT", 0.5)
    path = tmp_path / "segment"
    path.write_bytes(os.urandom(8 << 20))
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        a.settimeout(protocol.SEND_TIMEOUT)  # as the link's blocking socket is
        with pytest.raises(TimeoutError):
            protocol._sendfile_all(a, b"head", fd, 0, 8 << 20)
    finally:
        os.close(fd)
        a.close()
        b.close()


async def test_a_frame_in_a_file_goes_over_a_stream_without_a_socket_too(tmp_path) -> None:
    """send_frames of a file range on a stream that has no socket (read, then sent) gives
    the same data message; a file shorter than the frame is an error, not a short message."""
    import os

    frame = frames.encode_frame([[1, 0, 5, 7, 0, os.urandom(300_000), None, 0]])
    path = tmp_path / "segment"
    path.write_bytes(b"x" * 10 + frame)
    left, right = _pair()
    fd = os.open(path, os.O_RDONLY)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.send_frames, [FileRange(fd, 10, len(frame))])
            got = await right.receive()
        assert got is not None and bytes(got["frame"]) == frame
        with pytest.raises(OSError, match="ended before the frame"):
            await left.send_frames([FileRange(fd, 11, len(frame))])
    finally:
        os.close(fd)


def test_background_work_runs_at_idle_cpu_priority_and_gives_the_thread_back() -> None:
    """A link's data sends run in trio's pooled worker threads: SCHED_IDLE while they send,
    the thread's own policy again afterwards (the next job on that thread is not one)."""
    import os
    import threading

    seen: list[int] = []

    def job() -> str:
        seen.append(os.sched_getscheduler(0))
        return "done"

    def in_thread() -> None:
        assert protocol.in_background(job) == "done"
        seen.append(os.sched_getscheduler(0))
        with pytest.raises(ZeroDivisionError):
            protocol.in_background(lambda: 1 / 0)
        seen.append(os.sched_getscheduler(0))

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen == [os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_OTHER]


@pytest.mark.parametrize("over_socket", [False, True])
async def test_send_frames_sends_buffers_and_file_ranges_in_order(tmp_path, over_socket) -> None:
    """The link's batch: frames as bytes, as buffers, and as ranges of a spool file, one
    hand-off to a worker thread over a socket (a memory stream: one send each)."""
    import os
    from types import SimpleNamespace

    a = frames.encode_frame([[1, 0, 9, 1, b"a" * 300_000, b"v"]])
    b = frames.encode_frame([[2, 0, 9, 1, b"b", b"v"]])
    c = frames.encode_frame([[3, 0, 9, 1, os.urandom(70_000), b"v"]])
    path = tmp_path / "seg"
    path.write_bytes(b"junk" + c + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        if over_socket:
            s1, s2 = trio.socket.socketpair()
            left = protocol.MessageStream(trio.SocketStream(s1))
            right = protocol.MessageStream(trio.SocketStream(s2))
        else:
            left, right = _pair()
        got: list[bytes] = []

        async def reader() -> None:
            for _ in range(3):
                msg = await right.receive()
                assert msg is not None and msg["t"] == "data"
                got.append(bytes(msg["frame"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            sizes = await left.send_frames(
                [a, [memoryview(b)[:10], memoryview(b)[10:]],
                 SimpleNamespace(fd=fd, offset=4, length=len(c))])
        assert sizes == [len(a), len(b), len(c)]
        assert got == [a, b, c]
        await left.aclose()
        await right.aclose()
    finally:
        os.close(fd)
