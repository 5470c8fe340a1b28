"""CheckpointLog (append, reload, torn tails, resolve, remove), tag names, durations, selectors."""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import msgpack
import pytest
from conftest import checked_logs
from hypothesis import given
from hypothesis import strategies as st

from zfsrep.checkpoints import (
    MAX_DURATION_S,
    Checkpoint,
    CheckpointLog,
    Selector,
    _encode,
    _header,
    format_time,
    parse_duration,
    parse_selector,
    select,
    validate_tag,
)
from zfsrep.errors import CorruptDataError, NotFoundError, OSFailure, UsageError
from zfsrep.journal import FaultInjectingFS

S = 1_000_000_000
T0 = 1_795_000_000 * S  # 2026-11-18T...


@pytest.fixture(autouse=True)
def logs():
    yield from checked_logs()


@pytest.fixture
def lpath(tmp_path: Path) -> Path:
    return tmp_path / "vpg-a" / "checkpoints.log"


def _auto(i: int, **kw) -> Checkpoint:
    return Checkpoint.new("auto", {"v1": 10 * i, "v2": 20 * i}, time_ns=T0 + i * 5 * S, **kw)


# -- the log


def test_appends_get_increasing_ids_and_survive_reopening(lpath: Path):
    with CheckpointLog(lpath) as cl:
        assert cl.latest() is None
        a = cl.append(_auto(1))
        b = cl.append(Checkpoint.new("tagged", {"v1": 15}, tag="before-upgrade", time_ns=T0))
        c = cl.append(Checkpoint.new("test", {"v1": 15}, time_ns=T0, note="DR drill",
                                     result="passed"))
        assert [a.id, b.id, c.id] == [1, 2, 3]
    with CheckpointLog(lpath) as cl:
        assert cl.all() == [a, b, c]
        assert cl.latest() == c
        assert cl.vpg == "vpg-a"


def test_to_json_has_an_iso_utc_time_with_milliseconds():
    cp = Checkpoint(7, 1_795_314_792_123_456_789, "tagged", "x", {"v": 3})
    assert cp.to_json() == {"id": 7, "time": "2026-11-22T02:33:12.123Z",
                            "time_ns": 1_795_314_792_123_456_789, "kind": "tagged", "tag": "x",
                            "positions": {"v": 3}}
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    test = Checkpoint(8, 0, "test", None, {}, note="n", result="failed").to_json()
    assert (test["note"], test["result"]) == ("n", "failed")


def test_resolve_accepts_an_id_latest_or_a_tag_naming_its_newest_checkpoint(lpath: Path):
    with CheckpointLog(lpath, vpg="web") as cl:
        cl.append(_auto(1))
        cl.append(_auto(2, tag="nightly"))
        cl.append(_auto(3))
        cl.append(_auto(4, tag="nightly"))
        assert cl.resolve("1").id == 1
        assert cl.resolve(" 3 ").id == 3
        assert cl.resolve("latest").id == 4
        assert cl.resolve("LATEST").id == 4
        assert cl.resolve("nightly").id == 4
        assert cl.by_tag("nightly").id == 4
        assert [cp.id for cp in cl.since(2)] == [3, 4]


@pytest.mark.parametrize(("text", "error", "words"), [
    ("9", NotFoundError, "VPG web has no checkpoint 9"),
    ("weekly", NotFoundError, "VPG web has no checkpoint tagged 'weekly'"),
    ("no such", UsageError, "bad checkpoint 'no such'"),
    ("", UsageError, "bad checkpoint ''"),
])
def test_resolving_an_unknown_checkpoint_names_the_vpg(lpath: Path, text, error, words):
    with CheckpointLog(lpath, vpg="web") as cl:
        cl.append(_auto(1))
        with pytest.raises(error, match=words) as info:
            cl.resolve(text)
        assert "\n" not in str(info.value)


def test_latest_of_an_empty_log_is_not_found(lpath: Path):
    with CheckpointLog(lpath, vpg="web") as cl, \
            pytest.raises(NotFoundError, match="VPG web has no checkpoints yet"):
        cl.resolve("latest")


@pytest.mark.parametrize("tag", ["a", "before-upgrade", "v1.2.3", "db@host:5432", "x+y_z",
                                 "1a", "A" * 64])
def test_good_tag_names(tag: str):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "12", "latest", "Latest", "a b", "a/b", "-x", "é",
                                 "A" * 65, "a;b", "a\n"])
def test_bad_tag_names_are_usage_errors(tag: str, lpath: Path):
    with pytest.raises(UsageError, match="bad tag name"):
        validate_tag(tag)
    with CheckpointLog(lpath) as cl:
        with pytest.raises(UsageError):
            cl.append(_auto(1, tag=tag))
        assert len(cl) == 0


def test_a_tagged_checkpoint_needs_a_tag_and_kinds_are_checked(lpath: Path):
    with CheckpointLog(lpath) as cl:
        with pytest.raises(UsageError, match="needs a tag"):
            cl.append(Checkpoint.new("tagged", {}))
        with pytest.raises(UsageError, match="bad checkpoint kind"):
            cl.append(Checkpoint.new("manual", {}))
        assert len(cl) == 0


def test_remove_rewrites_the_log_and_ids_are_never_reused(lpath: Path):
    with CheckpointLog(lpath) as cl:
        for i in range(1, 6):
            cl.append(_auto(i))
        assert cl.remove([2, 4, 5, 99]) == 3
        assert [cp.id for cp in cl.all()] == [1, 3]
        assert cl.append(_auto(6)).id == 6
    assert not lpath.with_name(lpath.name + ".tmp").exists()
    with CheckpointLog(lpath) as cl:
        assert [cp.id for cp in cl.all()] == [1, 3, 6]
        assert cl.remove([1, 3, 6]) == 3
    with CheckpointLog(lpath) as cl:
        assert cl.all() == []
        assert cl.append(_auto(7)).id == 7


def test_a_failed_rewrite_changes_nothing(lpath: Path):
    fs = FaultInjectingFS()
    with CheckpointLog(lpath, fs=fs) as cl:
        for i in range(1, 4):
            cl.append(_auto(i))
        fs.fail("replace")
        with pytest.raises(OSFailure, match="rewrite failed"):
            cl.remove([1])
        assert [cp.id for cp in cl.all()] == [1, 2, 3]
        assert cl.append(_auto(4)).id == 4
    assert not lpath.with_name(lpath.name + ".tmp").exists()
    with CheckpointLog(lpath) as cl:
        assert len(cl) == 4


def _three(lpath: Path) -> tuple[int, int]:
    with CheckpointLog(lpath) as cl:
        cl.append(_auto(1))
        cl.append(_auto(2, tag="t"))
        size_two = lpath.stat().st_size
        cl.append(_auto(3, tag="t"))
    return size_two, lpath.stat().st_size - size_two


def test_a_tail_torn_at_every_byte_of_the_last_entry_is_cut(lpath: Path, logs):
    good, n = _three(lpath)
    for cut in range(n):
        os.truncate(lpath, good + cut)
        with CheckpointLog(lpath) as cl:
            assert [cp.id for cp in cl.all()] == [1, 2], cut
            assert cl.resolve("t").id == 2
            assert lpath.stat().st_size == good
            warned = logs.take()
            assert len(warned) == (1 if cut else 0), cut
            if cut:
                assert f"at byte {good}" in warned[0]
            assert cl.append(_auto(3, tag="t")).id == 3


@pytest.mark.parametrize("where", [0, 3, 4, 8, -1])
def test_a_corrupt_byte_in_the_last_entry_cuts_it(lpath: Path, logs, where: int):
    good, n = _three(lpath)
    data = bytearray(lpath.read_bytes())
    data[good + (where if where >= 0 else n + where)] ^= 0x10
    lpath.write_bytes(bytes(data))
    with CheckpointLog(lpath) as cl:
        assert len(cl) == 2
    (warned,) = logs.take()
    assert "cutting invalid tail" in warned


def test_a_damaged_header_or_an_undecodable_entry_is_refused_not_cut(lpath: Path):
    good, n = _three(lpath)
    original = lpath.read_bytes()
    data = bytearray(original)
    data[10] ^= 1
    lpath.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="header crc mismatch"):
        CheckpointLog(lpath)
    # An entry with a good CRC but a bad body: written by a bug, not torn by a crash.
    body = msgpack.packb([4, 0, "weird", None, {}, None, None])
    lpath.write_bytes(original + struct.pack("<II", len(body), zlib.crc32(body)) + body)
    with pytest.raises(CorruptDataError, match=f"at byte {good + n}: undecodable entry"):
        CheckpointLog(lpath)


def test_an_fsync_failure_is_not_durable_and_refuses_appends(lpath: Path, logs):
    fs = FaultInjectingFS()
    cl = CheckpointLog(lpath, fs=fs)
    cl.append(_auto(1))
    fs.fail("fsync", errno.EIO)
    with pytest.raises(OSFailure, match="fsync failed"):
        cl.append(_auto(2))
    assert len(cl) == 1
    with pytest.raises(OSFailure, match="until reopened"):
        cl.append(_auto(2))
    cl.close()
    assert len(logs.take(logging.ERROR)) == 1
    with CheckpointLog(lpath) as cl:
        assert [cp.id for cp in cl.all()] == [1]
        assert cl.append(_auto(2)).id == 2


def test_ten_thousand_checkpoints_load_and_select_quickly(lpath: Path):
    cps = [_auto(i, tag=f"t{i}" if i % 1000 == 0 else None) for i in range(1, 10_001)]
    # Built through the same encoder as append, without 10,000 fsyncs.
    lpath.parent.mkdir(parents=True)
    lpath.write_bytes(_header(0) + b"".join(
        _encode(Checkpoint(i, cp.time_ns, cp.kind, cp.tag, cp.positions))
        for i, cp in enumerate(cps, 1)))
    t = time.perf_counter()
    cl = CheckpointLog(lpath)
    load = time.perf_counter() - t
    assert len(cl) == 10_000
    now = T0 + 10_000 * 5 * S
    t = time.perf_counter()
    got = select(cl.all(), parse_selector("vpg=vpg-a;minAge=5m;maxAge=3h"), now)
    sel = time.perf_counter() - t
    assert [cp.id for cp in got] == list(range(10_000 - 2160, 10_000 - 60 + 1))
    assert cl.resolve("t5000").id == 5000
    assert cl.append(_auto(10_001)).id == 10_001
    cl.close()
    assert load < 1.0 and sel < 0.05, (load, sel)


# -- durations and selectors


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("5m", 300), ("2h", 7200), ("3d", 259200), (" 8h ", 28800), ("0s", 0),
    ("30d", MAX_DURATION_S),
])
def test_durations(text: str, seconds: int):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "words"), [
    ("5", "expected a whole number and a unit"), ("5 m", "expected"), ("-5m", "expected"),
    ("1.5h", "expected"), ("5M", "expected"), ("5w", "expected"), ("", "expected"),
    ("h", "expected"), ("31d", "history 31d is more than 30d"),
    ("1234567890s", "expected"),
])
def test_bad_durations_are_usage_errors(text: str, words: str):
    with pytest.raises(UsageError, match=words):
        parse_duration(text, name="history")


def test_a_duration_can_have_a_lower_bound():
    with pytest.raises(UsageError, match="checkpoint interval 0s is less than 1s"):
        parse_duration("0s", name="checkpoint interval", min_s=1)


def test_selector_parsing():
    assert parse_selector("vpg=V;minAge=5m;maxAge=3d") == Selector("V", 300, 259200)
    assert parse_selector(" VPG = V ; MINAGE=90s ; ") == Selector("V", 90, None)
    assert parse_selector("") == Selector()
    assert parse_selector("kind=tagged;tag=nightly") == Selector(kind="tagged", tag="nightly")


@pytest.mark.parametrize(("text", "words"), [
    ("vpg=V;color=red", "unknown key 'color'"),
    ("minAge=5m;minage=6m", "minAge given twice"),
    ("minAge=5x", "bad minAge '5x'"),
    ("maxAge=", "maxAge has no value"),
    ("vpg", "'vpg' is not key=value"),
    ("minAge=3d;maxAge=5m", "minAge 3d is more than maxAge 5m"),
    ("kind=manual", "bad kind 'manual'"),
    ("tag=a b", "bad tag name"),
    ("vpg=" + "x" * 2000, "longer than"),
])
def test_bad_selectors_are_one_line_usage_errors(text: str, words: str):
    with pytest.raises(UsageError, match=words) as info:
        parse_selector(text)
    assert "\n" not in str(info.value)


def test_select_by_age_kind_and_tag():
    now = T0 + 1000 * S
    cps = [Checkpoint(1, now - 3 * 86400 * S - 1, "auto", None),
           Checkpoint(2, now - 3 * 86400 * S, "auto", None),
           Checkpoint(3, now - 300 * S, "tagged", "x"),
           Checkpoint(4, now - 299 * S, "auto", None),
           Checkpoint(5, now + 10 * S, "test", None)]  # a clock that jumped back
    ids = lambda sel: [cp.id for cp in select(cps, parse_selector(sel), now)]  # noqa: E731
    assert ids("minAge=5m;maxAge=3d") == [2, 3]
    assert ids("maxAge=5m") == [3, 4, 5]
    assert ids("minAge=0s") == [1, 2, 3, 4]
    assert ids("kind=tagged") == [3]
    assert ids("tag=x;minAge=1h") == []


@given(st.text(max_size=40))
def test_any_selector_text_parses_or_is_a_usage_error(text: str):
    try:
        sel = parse_selector(text)
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(sel, Selector)


@given(st.integers(0, 999_999), st.sampled_from("smhd"))
def test_durations_round_trip(n: int, unit: str):
    seconds = parse_duration(f"{n}{unit}", max_s=None)
    assert seconds == n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
