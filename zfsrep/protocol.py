"""The framed protocol between mounts, the CLI and the journal server (docs/protocol.md), on
trio streams (the framing itself, and the CLI's blocking request, are in ``zfsrep.wire``).

Every message is a 4-byte big-endian length followed by that many bytes of one msgpack map with
a string field ``t`` (the message type). Capture frames travel unchanged inside ``data``
messages, so the server checks the same checksums the spool has. Lengths are bounded before
anything is allocated; anything malformed is a :class:`ProtocolError` that ends that one
connection and nothing else.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio

from zfsrep.errors import ZfsrepError
from zfsrep.syscalls import IdleCPU
from zfsrep.wire import (  # noqa: F401  (the wire format, re-exported for the daemons)
    DEFAULT_PORT,
    DEFAULT_SERVER,
    LEN,
    MAX_MESSAGE,
    PROTOCOL,
    SERVER_ENV,
    ProtocolError,
    ServerUnreachable,
    call,
    error_reply,
    pack,
    pack_parts,
    parse_address,
    raise_for_error,
    server_address,
    unpack,
)

#: What one receive asks the socket for while a message is incomplete. Not more: Python's
#: recv(n) allocates n bytes before it knows what arrived, and a 1 MiB allocation for a
#: 40-byte acknowledgement cost 18 us against 3 us (large messages are read straight into
#: their own buffer, see _receive_direct).
_READ_CHUNK = 64 << 10
_DIRECT_MIN = 64 << 10
SEND_TIMEOUT = 60.0
_POOL_BUFFER = (4 << 20) + (64 << 10)  # a capture frame of the default size and its message
_POOL_MAX = 8  # messages at least this large are read straight into their buffer
# msgpack of {"t": "data", "frame": <bin32 of length N>} up to the length: fixmap(2), "t",
# "data", "frame", bin32 marker
_DATA_PREFIX = b"\x82\xa1t\xa4data\xa5frame\xc6"


def _sendall(sock: socket.socket, parts: list) -> None:
    for part in parts:
        sock.sendall(part)


def _sendfile_all(sock: socket.socket, head: bytes, fd: int, offset: int, size: int) -> None:
    """``head``, then ``size`` bytes of ``fd`` from ``offset`` (sendfile with an explicit
    offset: the file's own position is not moved). The socket has a timeout, so its
    descriptor is non-blocking: wait until it takes more, up to that timeout."""
    sock.sendall(head)
    out = sock.fileno()
    while size > 0:
        try:
            n = os.sendfile(out, fd, offset, min(size, 1 << 30))
        except BlockingIOError:
            poller = select.poll()
            poller.register(out, select.POLLOUT)
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise TimeoutError(f"the peer took nothing for {SEND_TIMEOUT:.0f} s") from None
            continue
        if n == 0:  # (the caller checked the file's length; it shrank since)
            raise OSError(errno.EIO, "the file ended before the frame did")
        offset += n
        size -= n


T = TypeVar("T")


def in_background(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` at background CPU priority (:class:`zfsrep.syscalls.IdleCPU`): for a
    worker thread's share of replication, which must not take the CPU from the application
    whose changes it ships."""
    with IdleCPU():
        return fn(*args)


def _data_head(size: int) -> bytes:
    """What goes before a frame of ``size`` bytes in a data message (MessageStream.send_frames)."""
    if size + len(_DATA_PREFIX) + 4 > MAX_MESSAGE:
        raise ValueError(f"frame of {size} bytes exceeds the message limit")
    return LEN.pack(len(_DATA_PREFIX) + 4 + size) + _DATA_PREFIX + struct.pack(">I", size)


def _send_jobs(sock: socket.socket, jobs: list[tuple]) -> None:
    for job in jobs:
        if len(job) == 4:
            _sendfile_all(sock, *job)
        else:
            _sendall(sock, [job[0], *job[1]])


def _pread_all(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, "the file ended before the frame did")
    return data


def _unpack_data(body: bytes | memoryview) -> dict[str, Any] | None:
    """A data message in the exact form :meth:`MessageStream.send_frames` writes, without
    copying its frame out (None for anything else: the general decoder handles it)."""
    n = len(_DATA_PREFIX)
    if len(body) < n + 4 or body[:n] != _DATA_PREFIX:
        return None
    (size,) = struct.unpack_from(">I", body, n)
    if size != len(body) - n - 4:
        raise ProtocolError("malformed data message: frame length does not match")
    return {"t": "data", "frame": memoryview(body)[n + 4:]}  # a view: no copy of the frame


class MessageStream:
    """Length-prefixed msgpack messages over a trio stream; sends are serialised."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._sock: socket.socket | None = None
        self._pool: list[bytearray] = []
        #: data sends run at background CPU priority (in_background)
        self.background = False

    async def send(self, msg: Mapping[str, Any]) -> None:
        head, body = pack_parts(msg)
        async with self._send_lock:
            sock = self._blocking_socket() if len(body) >= _DIRECT_MIN else None
            if sock is not None:  # a large answer (file data): as send_frames does
                await trio.to_thread.run_sync(_sendall, sock, [head, body])
                return
            await self.stream.send_all(head + body)

    async def send_frames(self, frames: Sequence[Any]) -> list[int]:
        """Send ``{"t": "data", "frame": frame}`` for each of ``frames`` in turn, without
        copying a frame into a message buffer: the msgpack prefix (a 2-entry map whose last
        value is a bin32) goes first, the frame's bytes right after it. A frame is bytes or
        buffers sent back to back, or a range of a file (an object with ``fd``, ``offset``
        and ``length``, such as :class:`zfsrep.spool.FileRange`) that the kernel sends
        itself (sendfile), with no copy through this process. Over a socket, all of them in
        one call of a worker thread: one hand-off for the event loop, which serves the
        application. Returns the frames' sizes."""
        jobs: list[tuple] = []
        sizes: list[int] = []
        for frame in frames:
            if hasattr(frame, "fd"):
                size = frame.length
                jobs.append((_data_head(size), frame.fd, frame.offset, size))
            else:
                parts = ([frame] if isinstance(frame, bytes | bytearray | memoryview)
                         else list(frame))
                size = sum(memoryview(p).nbytes for p in parts)
                jobs.append((_data_head(size), parts))
            sizes.append(size)
        async with self._send_lock:
            sock = self._blocking_socket()
            if sock is not None:
                await trio.to_thread.run_sync(self._worker, _send_jobs, sock, jobs)
                return sizes
            for job in jobs:  # not a socket (tests)
                if len(job) == 4:
                    data = await trio.to_thread.run_sync(_pread_all, *job[1:])
                    await self.stream.send_all(job[0] + data)
                else:
                    for part in [job[0], *job[1]]:
                        await self.stream.send_all(part)
        return sizes

    def _worker(self, fn: Callable[..., T], *args: object) -> T:
        return in_background(fn, *args) if self.background else fn(*args)

    async def in_worker(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread, at background CPU priority if :attr:`background`."""
        return await trio.to_thread.run_sync(self._worker, fn, *args)

    def _blocking_socket(self) -> socket.socket | None:
        """A second socket object on a duplicate of the connection's descriptor, used from
        worker threads with a timeout (so it polls: the descriptor stays non-blocking)."""
        if self._sock is None:
            trio_sock = getattr(self.stream, "socket", None)
            if trio_sock is None:
                return None
            self._sock = socket.socket(fileno=os.dup(trio_sock.fileno()))
            self._sock.settimeout(SEND_TIMEOUT)
        return self._sock

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(_READ_CHUNK, n - len(self._buf)))
            if not chunk:
                if self._buf:
                    raise ProtocolError(f"connection closed inside a message "
                                        f"({len(self._buf)} of {n} bytes)")
                return False
            self._buf += chunk
        return True

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed cleanly between messages."""
        if not await self._fill(LEN.size):
            return None
        (length,) = LEN.unpack_from(self._buf)
        if length > MAX_MESSAGE:
            raise ProtocolError(f"message length {length} exceeds limit {MAX_MESSAGE}")
        del self._buf[:LEN.size]
        body: bytes | memoryview
        if length >= _DIRECT_MIN and len(self._buf) < length:
            body = await self._receive_direct(length)
        else:
            if not await self._fill(length):
                raise ProtocolError("connection closed inside a message")
            body = bytes(memoryview(self._buf)[:length])
            del self._buf[:length]
        return _unpack_data(body) or unpack(body)

    async def _receive_direct(self, length: int) -> memoryview:
        """A large message read straight into a buffer (one copy from the kernel). Buffers
        come from a small pool that :meth:`release` refills, so a stream of frames does not
        allocate, zero and fault in fresh memory for every message."""
        buf = None
        while self._pool:
            candidate = self._pool.pop()
            if len(candidate) >= length:
                buf = candidate
                break
        if buf is None:
            buf = bytearray(max(length, _POOL_BUFFER))
        view = memoryview(buf)[:length]
        have = len(self._buf)
        view[:have] = self._buf
        self._buf.clear()
        sock = getattr(self.stream, "socket", None)
        while have < length:
            if sock is not None:
                n = await sock.recv_into(view[have:])
            else:
                chunk = await self.stream.receive_some(length - have)
                n = len(chunk)
                view[have:have + n] = chunk
            if not n:
                raise ProtocolError(f"connection closed inside a message ({have} of "
                                    f"{length} bytes)")
            have += n
        return view

    def release(self, msg: dict[str, Any]) -> None:
        """Give a received message's buffer back for reuse; its contents (``frame``) must
        not be used afterwards. Messages without a pooled buffer are ignored."""
        frame = msg.get("frame")
        if isinstance(frame, memoryview) and isinstance(frame.obj, bytearray) \
                and len(self._pool) < _POOL_MAX:
            self._pool.append(frame.obj)

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await self.stream.aclose()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def connect(address: tuple[str, int], hello: Mapping[str, Any], *,
                  timeout: float = 10.0) -> tuple[MessageStream, dict[str, Any]]:
    """Open a connection, send ``hello``, and return the stream and the server's welcome."""
    host, port = address
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise ServerUnreachable(
                f"cannot reach the journal server at {host}:{port}: "
                f"{e.strerror or e} (is `zfsrep serve` running? set --server or "
                f"${SERVER_ENV})") from None
        conn = MessageStream(stream)
        try:
            await conn.send({"t": "hello", "proto": PROTOCOL, **hello})
            welcome = await conn.receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            await conn.aclose()
            raise ServerUnreachable(f"the journal server at {host}:{port} closed the "
                                    f"connection: {e}") from None
        except BaseException:
            await conn.aclose()
            raise
        if welcome is None:
            await conn.aclose()
            raise ServerUnreachable(f"the journal server at {host}:{port} closed the "
                                    "connection during the handshake")
        try:
            raise_for_error(welcome)
        except ZfsrepError:
            await conn.aclose()
            raise
        return conn, welcome
    assert scope.cancelled_caught
    raise ServerUnreachable(f"the journal server at {host}:{port} did not answer within "
                            f"{timeout:g} s")
