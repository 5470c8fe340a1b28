"""A mount daemon that dies (kill -9, a crash) never leaves a spool that silently lacks
changes the directory has: a restart goes on (everything answered was written), records again
the files whose changes were lost (resync), or, when the loss is of another kind (names,
xattrs), refuses, marks the spool incomplete and says why."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import zfsrep

from zfsrep.spool import RUN_STATE, read_incomplete

pytestmark = pytest.mark.mount


def _start_refused(m) -> str:
    with pytest.raises(AssertionError, match="mount daemon exited 4") as info:
        m.start()
    return str(info.value)


def test_killed_when_everything_was_written_the_mount_goes_on(mount_factory, tmp_path):
    m = mount_factory()
    m.start()
    (m.mnt / "f").write_bytes(os.urandom(3 << 20))
    os.sync()
    _wait_spooled(m)
    m.kill()
    shown = json.loads(zfsrep("spool", "show", str(m.spool), "--json").stdout)
    assert shown["daemon"]["state"] == "died without a clean shutdown"
    assert shown["daemon"]["next_protect"].startswith("goes on")
    m.start()
    shown = json.loads(zfsrep("spool", "show", str(m.spool), "--json").stdout)
    assert shown["daemon"] == {"pid": m.proc.pid, "state": "running"}
    (m.mnt / "g").write_text("after the restart\n")
    assert m.stop() == 0
    shown = json.loads(zfsrep("spool", "show", str(m.spool), "--json").stdout)
    assert shown["daemon"]["state"] == "stopped in order"
    assert "stopped without a clean shutdown, but everything it captured is in the spool" \
        in m.log.read_text()
    m.expected_log.append("without a clean shutdown")
    m.replay_equals_source(tmp_path / "replayed")


def _forge(m, **fields) -> None:
    """Edit the run state a stopped daemon left (what a kill at some moment would leave)."""
    offsets = {"clean": 16, "queued": 24, "taken": 32, "numbered": 40, "py_busy": 56,
               "fast_written": 64, "other": 80, "overflow": 88}
    state = m.spool / RUN_STATE
    raw = bytearray(state.read_bytes())
    for name, value in fields.items():
        if name == "slot":  # (ident, fast-path mark, seq mark) in the table's first slot
            struct.pack_into("=QQQ", raw, 128, *value)
        else:
            struct.pack_into("=Q", raw, offsets[name], value)
    state.write_bytes(bytes(raw))


def test_a_lost_change_of_names_is_refused(mount_factory, tmp_path):
    """Records of a rename, a create or an xattr were lost (the run state says the last one
    was after the spool's end): recording files again cannot repair that."""
    m = mount_factory()
    m.start()
    (m.mnt / "f").write_text("written\n")
    assert m.stop() == 0
    _forge(m, clean=0, queued=7, taken=0, other=1000)
    shown = zfsrep("spool", "show", str(m.spool)).stdout
    assert "next protect: refuses (record 1000, lost, changed names" in shown
    message = _start_refused(m)
    assert "stopped without writing everything it had captured" in message
    assert "7 writes the fast path had answered were still in its queue" in message
    assert "record 1000, lost, changed names or extended attributes" in message
    assert "Protect again with a new spool" in message
    assert read_incomplete(m.spool) is not None
    assert "is incomplete" in _start_refused(m)  # and it stays refused


def test_too_many_changed_files_to_track_is_refused(mount_factory):
    m = mount_factory()
    m.start()
    (m.mnt / "f").write_text("written\n")
    assert m.stop() == 0
    _forge(m, clean=0, queued=3, taken=0, overflow=1)
    assert "more files had unwritten changes than the daemon could track" in _start_refused(m)


def test_lost_writes_are_recorded_again(mount_factory, tmp_path):
    """The fast path had answered writes to f that never reached the spool (made here by
    changing the backing file behind the stopped mount and forging the run state a kill
    would leave, with f in its table): the restart records f again, and the spool replays
    to the directory, holes and all."""
    m = mount_factory()
    m.start()
    with open(m.mnt / "f", "wb") as f:
        f.write(os.urandom(3 << 20))
    (m.mnt / "g").write_text("untouched\n")
    os.chmod(m.mnt / "g", 0o600)
    assert m.stop() == 0
    with open(m.source / "f", "r+b") as f:  # the lost writes: new data, a hole, a new size
        f.write(os.urandom(5000))
        f.truncate(8 << 20)
        f.seek(6 << 20)
        f.write(b"tail")
    os.chmod(m.source / "g", 0o644)  # a lost SETATTR of the Python path
    seq = _spooled_seq(m.spool)
    ident_f, ident_g = (m.source / "f").stat().st_ino, (m.source / "g").stat().st_ino
    _forge(m, clean=0, queued=9, taken=5, fast_written=5, slot=(ident_f, 9, 0))
    raw = bytearray((m.spool / RUN_STATE).read_bytes())
    struct.pack_into("=QQQ", raw, 128 + 24, ident_g, 0, seq + 2)
    (m.spool / RUN_STATE).write_bytes(bytes(raw))
    shown = json.loads(zfsrep("spool", "show", str(m.spool), "--json").stdout)
    assert shown["daemon"]["next_protect"].startswith("records 2 files again (resync")
    m.start()
    (m.mnt / "h").write_text("after the restart\n")
    assert m.stop() == 0
    log = m.log.read_text()
    assert "recording the 2 files it had changed again (resync)" in log
    assert "resync done: 2 files" in log
    m.expected_log.append("stopped without writing everything")
    m.replay_equals_source(tmp_path / "replayed")


def test_kill_9_right_after_fsync_never_loses_changes(mount_factory, tmp_path):
    """The realistic case: an application's fsync returned (the backing file has the data),
    and the daemon dies before its encoders wrote the records. The restart records the file
    again where records were lost; either way the spool replays to the directory."""
    outcomes = []
    for attempt in range(4):
        m = mount_factory(f"m{attempt}", extra=("--memory-limit", "256"))
        m.start()
        with open(m.mnt / "f", "wb") as f:
            for _ in range(48):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        m.kill()
        m.start()
        assert m.stop() == 0
        log = m.log.read_text()
        outcomes.append("resync" if "(resync)" in log else "went on")
        m.expected_log += ["without a clean shutdown", "stopped without writing everything"]
        m.replay_equals_source(tmp_path / f"replayed{attempt}")
    print("outcomes:", outcomes)


def _wait_spooled(m, timeout: float = 10.0) -> None:
    """Until the daemon has written every record it numbered (its run state says so)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = struct.unpack_from("=8sQQQQQ", (m.spool / RUN_STATE).read_bytes())
        queued, taken, numbered = fields[3:]
        if queued == taken and _spooled_seq(m.spool) >= numbered:
            return
        time.sleep(0.05)
    raise AssertionError("the daemon did not write its records in time")


def _spooled_seq(spool: Path) -> int:
    """The last record in the spool; 0 while a frame is being written (its header, written
    last, is still zeros: a reader of a live spool sees that as a bad frame)."""
    from zfsrep.errors import CorruptDataError
    from zfsrep.spool import spool_stats

    try:
        return spool_stats(spool).get("last_seq") or 0
    except CorruptDataError:
        return 0
