"""The wire format of the protocol (docs/protocol.md), without trio: message framing,
addresses, error replies, and the blocking request the command line uses.

Every message is a 4-byte big-endian length followed by that many bytes of one msgpack map
with a string field ``t``. ``zfsrep.protocol`` adds the trio streams of the daemons; the CLI
needs only :func:`call`, so a command does not pay for importing trio.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import msgpack

from zfsrep.errors import CorruptDataError, ExitCode, UsageError, ZfsrepError

PROTOCOL = "zfsrep/1"
DEFAULT_PORT = 7450
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
SERVER_ENV = "ZFSREP_SERVER"

LEN = struct.Struct(">I")
#: A data message carries one capture frame plus a few fields: the largest frame is
#: ``frames.HEADER_SIZE + frames.MAX_COMP_LEN`` (a test keeps the two equal; written out
#: here so that a CLI command, which sends no frames, does not import zstd for them).
MAX_FRAME = 48 + (64 << 20) + (64 << 12)
MAX_MESSAGE = MAX_FRAME + 4096

class ProtocolError(CorruptDataError):
    """The peer sent something that is not a well-formed message of this protocol."""


class ServerUnreachable(ZfsrepError):
    exit_code = ExitCode.UNREACHABLE


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``) into a (host, port) pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad server address {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def server_address(explicit: str | None) -> tuple[str, int]:
    """``--server``, else ``$ZFSREP_SERVER``, else 127.0.0.1:7450."""
    return parse_address(explicit or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


def pack_parts(msg: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """A message as its length prefix and its body (sent back to back, without joining)."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return LEN.pack(len(body)), body


def pack(msg: Mapping[str, Any]) -> bytes:
    head, body = pack_parts(msg)
    return head + body


def unpack(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE,
                              max_str_len=1 << 20, max_array_len=1 << 20, max_map_len=1 << 20)
    except Exception as e:  # untrusted input: any decoder failure is a malformed message
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError("malformed message: not a map with a string field 't'")
    return msg


def error_reply(exc: ZfsrepError, **fields: Any) -> dict[str, Any]:
    return {"t": "error", "code": exc.exit_code, "error": str(exc), **fields}


def raise_for_error(msg: dict[str, Any]) -> dict[str, Any]:
    """Turn an ``error`` reply into the ZfsrepError it describes; pass other replies."""
    if msg.get("t") == "error":
        code = msg.get("code")
        raise ZfsrepError(str(msg.get("error", "the server refused the request")),
                          exit_code=code if isinstance(code, int) and 0 < code < 64 else 1)
    return msg



def _recv_exact(sock: socket.socket, n: int, deadline: float) -> memoryview:
    buf = bytearray(n)
    view = memoryview(buf)
    have = 0
    while have < n:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        got = sock.recv_into(view[have:])
        if not got:
            raise ServerUnreachable("the journal server closed the connection" +
                                    (" inside a message" if have else ""))
        have += got
    return view


def _receive(sock: socket.socket, deadline: float) -> dict[str, Any]:
    (length,) = LEN.unpack(_recv_exact(sock, LEN.size, deadline))
    if length > MAX_MESSAGE:
        raise ProtocolError(f"message length {length} exceeds limit {MAX_MESSAGE}")
    return unpack(_recv_exact(sock, length, deadline))


class Connection:
    """A blocking control connection: requests answered one at a time (the CLI, and a
    mount's worker thread reading a checkpoint's tree)."""

    def __init__(self, address: tuple[str, int], *, timeout: float = 60.0,
                 connect_timeout: float = 10.0) -> None:
        host, port = self.address = address
        self.timeout = timeout
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise ServerUnreachable(
                f"cannot reach the journal server at {host}:{port}: {e.strerror or e} (is "
                f"`zfsrep serve` running? set --server or ${SERVER_ENV})") from None
        try:
            self._exchange({"t": "hello", "proto": PROTOCOL, "role": "control"},
                           "the handshake", connect_timeout)
        except BaseException:
            self._sock.close()
            raise

    def _exchange(self, msg: Mapping[str, Any], what: str, timeout: float) -> dict[str, Any]:
        host, port = self.address
        deadline = time.monotonic() + timeout
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(pack(msg))
            return raise_for_error(_receive(self._sock, deadline))
        except TimeoutError:
            raise ServerUnreachable(f"the journal server at {host}:{port} did not answer "
                                    f"{what} within {timeout:g} s") from None
        except (ConnectionError, OSError) as e:
            raise ServerUnreachable(f"lost the connection to the journal server at "
                                    f"{host}:{port}: {e.strerror or e}") from None

    def request(self, op: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """The result of one request, or the server's error raised as a ZfsrepError."""
        return self._exchange({"t": "req", "op": op, "args": dict(args or {})}, repr(op),
                              self.timeout if timeout is None else timeout).get("result")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(address: tuple[str, int], op: str, args: Mapping[str, Any] | None = None, *,
         timeout: float = 60.0, connect_timeout: float = 10.0) -> Any:
    """One control request on its own connection, blocking: the result, or the server's
    error raised as the ZfsrepError it describes."""
    with Connection(address, timeout=timeout, connect_timeout=connect_timeout) as conn:
        return conn.request(op, args)
