"""The checkpoint log of a VPG, checkpoint names, and the selector language of ``checkpoints``.

The log is one append-only file (see docs/journal-format.md)::

    header  : magic b"ZCKL", u16 version, u16 flags, u64 id floor, u32 crc32   (20 bytes)
    entries : u32 body length, u32 crc32(body), body = msgpack
              [id, time_ns, kind, tag, {volume: seq}, note, result]

An append is written and fsynced before it returns. Loading cuts a torn or corrupt tail with a
WARNING (a crash in the middle of an append). Removing checkpoints (dilution) rewrites the file
atomically; the header's *id floor* keeps ids from ever being reused.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgpack

from zfsrep.errors import CorruptDataError, NotFoundError, OSFailure, StateError, UsageError
from zfsrep.journal import REAL_FS, JournalFS, describe, write_all

log = logging.getLogger(__name__)

KINDS = ("auto", "tagged", "test")
MAGIC = b"ZCKL"
VERSION = 1
_HEAD = struct.Struct("<4sHHQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 20
_ENTRY = struct.Struct("<II")
MAX_ENTRY = 1 << 20  # bytes of one entry's body: thousands of volumes' positions

TAG_RE = re.compile(r"[A-Za-z0-9._:@+-]{1,64}")
_DURATION_RE = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Upper bound of VPG durations (history, RPO target, checkpoint interval).
MAX_DURATION_S = 30 * 86400


# --------------------------------------------------------------------------------------------
# Checkpoints


def format_time(time_ns: int) -> str:
    """ISO 8601 UTC with milliseconds and "Z": ``2026-11-22T03:33:12.123Z``."""
    secs, rest = divmod(time_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{rest // 1_000_000:03d}Z"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A crash-consistent cut across the volumes of a VPG."""

    id: int  # 1, 2, ... per VPG, never reused; 0 until the log assigns one
    time_ns: int  # wall-clock time of the cut, ns since the epoch (UTC)
    kind: str  # "auto", "tagged" or "test"
    tag: str | None
    positions: dict[str, int] = field(default_factory=dict)  # volume -> last seq in the cut
    note: str | None = None  # test checkpoints: what was tested
    result: str | None = None  # test checkpoints: the outcome

    @classmethod
    def new(cls, kind: str, positions: dict[str, int], *, tag: str | None = None,
            time_ns: int | None = None, note: str | None = None,
            result: str | None = None) -> Checkpoint:
        """A checkpoint to hand to :meth:`CheckpointLog.append` (which assigns the id)."""
        return cls(0, time.time_ns() if time_ns is None else time_ns, kind, tag,
                   dict(positions), note, result)

    def to_json(self) -> dict:
        out: dict = {"id": self.id, "time": format_time(self.time_ns), "time_ns": self.time_ns,
                     "kind": self.kind, "tag": self.tag, "positions": dict(self.positions)}
        if self.note is not None:
            out["note"] = self.note
        if self.result is not None:
            out["result"] = self.result
        return out


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag name, else raise UsageError."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise UsageError(f"bad tag name {tag!r}: use 1-64 letters, digits or ._-:@+")
    if tag.isdigit():
        raise UsageError(f"bad tag name {tag!r}: all digits would read as a checkpoint id")
    if tag.lower() == "latest":
        raise UsageError("bad tag name 'latest': it names the newest checkpoint")
    if tag.startswith("-"):
        raise UsageError(f"bad tag name {tag!r}: it may not start with '-'")
    return tag


def _validate(cp: Checkpoint) -> None:
    if cp.kind not in KINDS:
        raise UsageError(f"bad checkpoint kind {cp.kind!r}: expected one of {', '.join(KINDS)}")
    if cp.tag is not None:
        validate_tag(cp.tag)
    elif cp.kind == "tagged":
        raise UsageError("a tagged checkpoint needs a tag name")
    if type(cp.time_ns) is not int or cp.time_ns < 0:
        raise ValueError(f"bad checkpoint time {cp.time_ns!r}")
    for vol, seq in cp.positions.items():
        if not isinstance(vol, str) or type(seq) is not int or seq < 0:
            raise ValueError(f"bad checkpoint position {vol!r}: {seq!r}")
    for name in ("note", "result"):
        value = getattr(cp, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"checkpoint {name} must be a string")


def _encode(cp: Checkpoint) -> bytes:
    body = msgpack.packb([cp.id, cp.time_ns, cp.kind, cp.tag, cp.positions, cp.note,
                          cp.result], use_bin_type=True)
    if len(body) > MAX_ENTRY:
        raise ValueError(f"checkpoint entry of {len(body)} bytes exceeds {MAX_ENTRY}")
    return _ENTRY.pack(len(body), zlib.crc32(body)) + body


def _decode(body: memoryview) -> Checkpoint:
    fields = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    if type(fields) is not list or len(fields) != 7:
        raise ValueError("not an array of 7 fields")
    cp = Checkpoint(*fields)
    if type(cp.id) is not int or cp.id < 1 or type(cp.positions) is not dict:
        raise ValueError("bad id or positions")
    _validate(cp)
    return cp


def _header(id_floor: int) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, id_floor)
    return head + _CRC.pack(zlib.crc32(head))


# --------------------------------------------------------------------------------------------
# The log


class CheckpointLog:
    """The checkpoints of one VPG, in id order, backed by one append-only file.

    Thread-safe. Keeps every checkpoint in memory (10,000 entries are a few MB).
    """

    def __init__(self, path: Path, *, vpg: str | None = None,
                 fs: JournalFS | None = None) -> None:
        self.path = Path(path)
        self.vpg = vpg if vpg is not None else self.path.parent.name
        self._fs: JournalFS = REAL_FS if fs is None else fs
        self._lock = threading.Lock()
        self._cps: list[Checkpoint] = []
        self._ids: list[int] = []
        self._by_id: dict[int, Checkpoint] = {}
        self._by_tag: dict[str, Checkpoint] = {}
        self._floor = 0
        self._fd: int | None = None
        self._broken: str | None = None
        try:
            self._load()
        except OSError as e:
            raise OSFailure(f"checkpoint log {self.path}: cannot open: {describe(e)}") from None

    # -- loading

    def _load(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite([], 0)
            return
        data = self.path.read_bytes()
        if len(data) < HEADER_SIZE:
            raise CorruptDataError(f"checkpoint log {self.path}: header truncated, "
                                   f"{len(data)} of {HEADER_SIZE} bytes")
        magic, version, _flags, floor = _HEAD.unpack_from(data)
        (crc,) = _CRC.unpack_from(data, _HEAD.size)
        if magic != MAGIC:
            raise CorruptDataError(f"checkpoint log {self.path}: bad magic {magic!r}")
        if version != VERSION:
            raise CorruptDataError(f"checkpoint log {self.path}: unsupported version {version}")
        if crc != zlib.crc32(memoryview(data)[:_HEAD.size]):
            raise CorruptDataError(f"checkpoint log {self.path}: header crc mismatch")
        self._floor = floor
        cps, good, problem = self._parse(data)
        fd = self._fs.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            if problem is not None:
                log.warning("checkpoint log %s: cutting invalid tail at byte %d (%d bytes "
                            "cut): %s", self.path, good, len(data) - good, problem)
                self._fs.truncate(fd, good)
                self._fs.fsync(fd)
        except BaseException:
            self._fs.close(fd)
            raise
        self._fd = fd
        self._set(cps)

    def _parse(self, data: bytes) -> tuple[list[Checkpoint], int, str | None]:
        """The entries, the offset after the last valid one and why the rest is invalid."""
        view = memoryview(data)
        size = len(data)
        off = HEADER_SIZE
        cps: list[Checkpoint] = []
        last_id = 0
        unpack, crc32 = _ENTRY.unpack_from, zlib.crc32
        while off < size:
            if size - off < _ENTRY.size:
                return cps, off, f"entry header truncated, {size - off} of {_ENTRY.size} bytes"
            length, crc = unpack(data, off)
            if not 0 < length <= MAX_ENTRY:
                return cps, off, f"entry length {length} out of range"
            end = off + _ENTRY.size + length
            if end > size:
                return cps, off, f"entry truncated, {size - off - _ENTRY.size} of {length} bytes"
            body = view[off + _ENTRY.size:end]
            if crc32(body) != crc:
                return cps, off, "entry crc mismatch"
            # A whole entry with a good CRC is not a torn write: refuse rather than cut.
            try:
                cp = _decode(body)
            except Exception as e:  # untrusted bytes: any decoder failure means corrupt
                raise CorruptDataError(f"checkpoint log {self.path} at byte {off}: "
                                       f"undecodable entry ({e})") from None
            if cp.id <= last_id:
                raise CorruptDataError(f"checkpoint log {self.path} at byte {off}: id {cp.id} "
                                       f"after id {last_id}")
            last_id = cp.id
            cps.append(cp)
            off = end
        return cps, off, None

    def _set(self, cps: list[Checkpoint]) -> None:
        self._cps = cps
        self._ids = [cp.id for cp in cps]
        self._by_id = {cp.id: cp for cp in cps}
        self._by_tag = {cp.tag: cp for cp in cps if cp.tag is not None}  # the newest wins

    # -- queries

    def __len__(self) -> int:
        return len(self._cps)

    def all(self) -> list[Checkpoint]:
        """Every checkpoint, oldest (smallest id) first."""
        return list(self._cps)

    def latest(self) -> Checkpoint | None:
        cps = self._cps
        return cps[-1] if cps else None

    def by_id(self, cp_id: int) -> Checkpoint:
        cp = self._by_id.get(cp_id)
        if cp is None:
            raise NotFoundError(f"VPG {self.vpg} has no checkpoint {cp_id}")
        return cp

    def by_tag(self, tag: str) -> Checkpoint:
        """The newest checkpoint tagged ``tag``."""
        cp = self._by_tag.get(tag)
        if cp is None:
            raise NotFoundError(f"VPG {self.vpg} has no checkpoint tagged {tag!r}")
        return cp

    def resolve(self, text: str) -> Checkpoint:
        """A checkpoint named by its id, ``latest``, or a tag (its newest checkpoint)."""
        text = text.strip()
        if text.isascii() and text.isdigit():
            return self.by_id(int(text))
        if text.lower() == "latest":
            cp = self.latest()
            if cp is None:
                raise NotFoundError(f"VPG {self.vpg} has no checkpoints yet")
            return cp
        if not TAG_RE.fullmatch(text):
            raise UsageError(f"bad checkpoint {text!r}: expected an id, 'latest' or a tag name")
        return self.by_tag(text)

    def since(self, cp_id: int) -> list[Checkpoint]:
        """The checkpoints with an id greater than ``cp_id``."""
        i = bisect.bisect_right(self._ids, cp_id)
        return self._cps[i:]

    # -- changes

    def append(self, cp: Checkpoint) -> Checkpoint:
        """Record ``cp`` under the next id; returns it once it is on stable storage."""
        _validate(cp)
        with self._lock:
            self._check_usable()
            last = self._ids[-1] if self._ids else 0
            cp = dataclasses.replace(cp, id=max(last, self._floor) + 1)
            entry = _encode(cp)
            assert self._fd is not None
            size = os.fstat(self._fd).st_size
            try:
                write_all(self._fs, self._fd, entry)
            except OSError as e:
                try:
                    self._fs.truncate(self._fd, size)
                except OSError as e2:
                    self._broken = f"write failed and so did undoing it ({describe(e2)})"
                raise OSFailure(f"checkpoint log {self.path}: write failed: "
                                f"{describe(e)}") from None
            try:
                self._fs.fsync(self._fd)
            except OSError as e:
                self._broken = f"fsync failed ({describe(e)})"
                # not durable, not to be trusted: cut it (best effort)
                with contextlib.suppress(OSError):
                    self._fs.truncate(self._fd, size)
                log.error("checkpoint log %s: %s; refusing appends until reopened",
                          self.path, self._broken)
                raise OSFailure(f"checkpoint log {self.path}: {self._broken}") from None
            self._cps.append(cp)
            self._ids.append(cp.id)
            self._by_id[cp.id] = cp
            if cp.tag is not None:
                self._by_tag[cp.tag] = cp
            return cp

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise OSFailure(f"checkpoint log {self.path} refuses changes until reopened: "
                            f"{self._broken}")
        if self._fd is None:
            raise StateError(f"checkpoint log {self.path} is closed")

    def remove(self, ids: Iterable[int]) -> int:
        """Remove the checkpoints with these ids (unknown ids are ignored); returns how many
        were removed. The file is rewritten atomically; ids are never reused."""
        drop = set(ids)
        with self._lock:
            self._check_usable()
            keep = [cp for cp in self._cps if cp.id not in drop]
            removed = len(self._cps) - len(keep)
            if removed:
                floor = max(self._floor, self._ids[-1] if self._ids else 0)
                self._rewrite(keep, floor)
                self._set(keep)
            return removed

    def _rewrite(self, cps: list[Checkpoint], floor: int) -> None:
        """Replace the file by one holding ``cps`` (write temp, fsync, rename, fsync dir)."""
        fs = self._fs
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            try:
                write_all(fs, fd, b"".join([_header(floor), *map(_encode, cps)]))
                fs.fsync(fd)
            finally:
                fs.close(fd)
            fs.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                fs.unlink(tmp)
            raise OSFailure(f"checkpoint log {self.path}: rewrite failed: {describe(e)}"
                            ) from None
        # The new file is in place: from here on a failure leaves the log unusable.
        old, self._fd = self._fd, None
        try:
            if old is not None:
                fs.close(old)
            fs.fsync_dir(self.path.parent)
            self._fd = fs.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            self._broken = f"rewrite not durable ({describe(e)})"
            raise OSFailure(f"checkpoint log {self.path}: {self._broken}") from None
        self._floor = floor

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                self._fs.close(fd)

    def __enter__(self) -> CheckpointLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Durations and selectors


def format_duration(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_duration(text: str, *, name: str = "duration", min_s: int = 0,
                   max_s: int | None = MAX_DURATION_S) -> int:
    """Seconds in ``90s``, ``5m``, ``2h`` or ``3d``, between ``min_s`` and ``max_s``
    (default at most 30 days; None: unbounded). UsageError otherwise."""
    m = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UsageError(f"bad {name} {text!r}: expected a whole number and a unit s, m, h "
                         "or d (e.g. 90s, 5m, 2h, 3d)")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds < min_s:
        raise UsageError(f"{name} {text.strip()} is less than {format_duration(min_s)}")
    if max_s is not None and seconds > max_s:
        raise UsageError(f"{name} {text.strip()} is more than {format_duration(max_s)}")
    return seconds


@dataclass(frozen=True, slots=True)
class Selector:
    """Which checkpoints to list: ``vpg=V;minAge=5m;maxAge=3d;kind=tagged;tag=T``."""

    vpg: str | None = None
    min_age_s: int | None = None  # at least this old
    max_age_s: int | None = None  # at most this old
    kind: str | None = None
    tag: str | None = None


_KEYS = {"vpg": "vpg", "minage": "minAge", "maxage": "maxAge", "kind": "kind", "tag": "tag"}
MAX_SELECTOR_LEN = 1024


def parse_selector(text: str) -> Selector:
    """Parse ``key=value`` items separated by ``;`` (keys case-insensitive; empty items and
    spaces around items are ignored). UsageError with a one-line message otherwise."""
    if len(text) > MAX_SELECTOR_LEN:
        raise UsageError(f"selector: longer than {MAX_SELECTOR_LEN} characters")
    seen: dict[str, str] = {}
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        canon = _KEYS.get(key.lower())
        if not eq:
            raise UsageError(f"selector: {item!r} is not key=value")
        if canon is None:
            raise UsageError(f"selector: unknown key {key!r} (known: {', '.join(_KEYS.values())})")
        if canon in seen:
            raise UsageError(f"selector: {canon} given twice")
        if not value:
            raise UsageError(f"selector: {canon} has no value")
        seen[canon] = value
    min_age = max_age = None
    if "minAge" in seen:
        min_age = parse_duration(seen["minAge"], name="minAge", max_s=None)
    if "maxAge" in seen:
        max_age = parse_duration(seen["maxAge"], name="maxAge", max_s=None)
    if min_age is not None and max_age is not None and min_age > max_age:
        raise UsageError(f"selector: minAge {seen['minAge']} is more than maxAge "
                         f"{seen['maxAge']}: nothing could match")
    kind = seen.get("kind")
    if kind is not None and kind not in KINDS:
        raise UsageError(f"selector: bad kind {kind!r}: expected one of {', '.join(KINDS)}")
    tag = seen.get("tag")
    if tag is not None:
        validate_tag(tag)
    return Selector(seen.get("vpg"), min_age, max_age, kind, tag)


def select(checkpoints: Iterable[Checkpoint], selector: Selector,
           now_ns: int | None = None) -> list[Checkpoint]:
    """The checkpoints matching ``selector`` (its ``vpg`` is for the caller: it picks the log).

    A checkpoint's age is ``now_ns - time_ns``; minAge keeps those at least that old, maxAge
    those at most that old.
    """
    now = time.time_ns() if now_ns is None else now_ns
    newest = None if selector.min_age_s is None else now - selector.min_age_s * 1_000_000_000
    oldest = None if selector.max_age_s is None else now - selector.max_age_s * 1_000_000_000
    kind, tag = selector.kind, selector.tag
    return [cp for cp in checkpoints
            if (newest is None or cp.time_ns <= newest)
            and (oldest is None or cp.time_ns >= oldest)
            and (kind is None or cp.kind == kind)
            and (tag is None or cp.tag == tag)]
