"""A mount daemon that dies (kill -9, a crash) never leaves a spool that silently lacks
changes the directory has: a restart either goes on (everything answered was written) or
refuses, marks the spool incomplete and says why."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import FUSERMOUNT, is_mounted, zfsrep

from zfsrep.spool import RUN_STATE, read_incomplete

pytestmark = pytest.mark.mount


def _kill(m) -> None:
    """kill -9 the daemon, then clear the dead mount as an administrator would."""
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    if is_mounted(m.mnt):
        subprocess.run([FUSERMOUNT, "-u", "-z", str(m.mnt)], capture_output=True)


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
    _kill(m)
    shown = json.loads(zfsrep("spool", "show", str(m.spool), "--json").stdout)
    assert shown["daemon"]["state"] == "died without a clean shutdown"
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


def test_a_daemon_that_died_with_records_unwritten_is_refused(mount_factory, tmp_path):
    """The run state says the fast path had answered writes that never reached the spool
    (made here by editing it: what a kill between the answer and the spool write leaves)."""
    m = mount_factory()
    m.start()
    (m.mnt / "f").write_text("written\n")
    assert m.stop() == 0
    state = m.spool / RUN_STATE
    raw = bytearray(state.read_bytes())
    struct.pack_into("=QQQ", raw, 16, 0, 7, 0)  # not clean; 7 writes queued, none numbered
    state.write_bytes(bytes(raw))
    message = _start_refused(m)
    assert "stopped without writing everything it had captured" in message
    assert "7 writes the fast path had answered were still in its queue" in message
    assert "Protect again with a new spool" in message
    assert read_incomplete(m.spool) is not None
    assert "is incomplete" in _start_refused(m)  # and it stays refused


def test_kill_9_right_after_fsync_never_loses_changes_silently(mount_factory, tmp_path):
    """The realistic case: an application's fsync returned (the backing file has the data),
    and the daemon dies before its encoders wrote the records. Whichever way each attempt
    falls, the spool either replays to the directory or is refused."""
    outcomes = []
    for attempt in range(4):
        m = mount_factory(f"m{attempt}", extra=("--memory-limit", "256"))
        m.start()
        with open(m.mnt / "f", "wb") as f:
            for _ in range(48):
                f.write(os.urandom(1 << 20))
            os.fsync(f.fileno())
        _kill(m)
        try:
            m.start()
        except AssertionError as e:
            assert "stopped without writing everything it had captured" in str(e)
            assert read_incomplete(m.spool) is not None
            outcomes.append("refused")
            continue
        assert m.stop() == 0
        m.expected_log.append("without a clean shutdown")
        m.replay_equals_source(tmp_path / f"replayed{attempt}")
        outcomes.append("went on")
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
