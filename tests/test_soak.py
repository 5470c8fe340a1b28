"""An opt-in soak: a replicated mount under a random workload for ZFSREP_SOAK_SECONDS, the
journal server killed (SIGKILL) and restarted every few seconds, the mount daemon stopped
and started again, or killed (SIGKILL) and started again, now and then; a tag and an oracle
of the backing directory every few dozen operations. Afterwards every tag, restored whole,
equals its oracle, every acknowledged checkpoint is still listed, and the last tag also
equals its oracle through a snapshot mount.

Not run unless ZFSREP_SOAK_SECONDS is set (CI runs the short versions of these checks in
test_replication.py): ``ZFSREP_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py``.
ZFSREP_SOAK_SEED picks the workload's seed (default: from the clock, printed).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from test_capture_workload import RandomWorkload
from test_replication import (
    VOL,
    VPG,
    assert_tree,
    checkpoints,
    replicated,
    snapshot_mount,
    tag,
)
from treesnap import tree_snapshot

SECONDS = float(os.environ.get("ZFSREP_SOAK_SECONDS", "0"))

pytestmark = [pytest.mark.mount, pytest.mark.slow,
              pytest.mark.skipif(SECONDS <= 0, reason="set ZFSREP_SOAK_SECONDS to run")]


def test_soak_server_kills_and_mount_restarts_keep_every_tag(
        journal_server, mount_factory, tmp_path: Path) -> None:
    seed = int(os.environ.get("ZFSREP_SOAK_SEED", str(int(time.time()))))
    print(f"soak: seed {seed}, {SECONDS:g} s")
    rng = random.Random(seed)
    journal_server.expected_log += ["cutting invalid tail"]
    # (the tests' VPG keeps one minute of history; a soak's first tags must outlive it)
    journal_server.cli("vpg", "create", VPG, "--checkpoint-interval", "1s", "--history", "1d")
    m = replicated(mount_factory, journal_server)
    m.expected_log += ["not yet acknowledged", "without a clean shutdown",
                       "stopped without writing everything", "were lost"]
    journal_server.expected_log += ["connection closed inside a message"]
    m.start()
    work = RandomWorkload(m.mnt, seed=seed)
    oracles: dict[str, dict] = {}
    listed: set[int] = set()
    kills = restarts = crashes = 0
    spools = 1
    next_kill = time.monotonic() + rng.uniform(2, 8)
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        for _ in range(rng.randrange(10, 60)):
            work.step()
        name = f"t{len(oracles)}"
        tag(journal_server, name, timeout=60)
        oracles[name] = tree_snapshot(m.source)
        listed |= {cp["id"] for cp in checkpoints(journal_server)}
        if time.monotonic() >= next_kill:
            journal_server.kill()
            kills += 1
            for _ in range(rng.randrange(0, 40)):  # writes go on while it is down
                work.step()
            time.sleep(rng.uniform(0, 1.5))
            journal_server.start()
            next_kill = time.monotonic() + rng.uniform(2, 8)
        r = rng.random()
        if r < 0.05:
            assert m.stop() == 0
            m.start()
            restarts += 1
        elif r < 0.08:
            spools = _crash_and_start(m, journal_server, spools)
            crashes += 1
    print(f"soak: {work.ops} operations, {len(oracles)} tags, {kills} server kills, "
          f"{restarts} mount restarts, {crashes} mount crashes ({spools - 1} lossy)")
    now = {cp["id"] for cp in checkpoints(journal_server)}
    assert listed <= now, f"acknowledged checkpoints lost: {sorted(listed - now)}"
    for name, oracle in oracles.items():
        dest = tmp_path / "restore" / name
        dest.mkdir(parents=True)
        journal_server.cli("restore-file", VPG, name, VOL, "/", "--to", str(dest))
        assert_tree(oracle, dest, f"tag {name} (seed {seed})")
    last = f"t{len(oracles) - 1}"
    with snapshot_mount(journal_server, last, tmp_path / "snap") as snap:
        assert_tree(oracles[last], snap, f"snapshot of tag {last} (seed {seed})")
    assert m.stop() == 0


def _crash_and_start(m, server, spools: int) -> int:
    """kill -9 the mount daemon at whatever it was doing and start it again. A crash that
    lost a change of names is refused (exit 4): then the documented way back, remove-volume
    and a new spool (the volume's checkpoints stay). Returns how many spools were used."""
    m.kill()
    try:
        m.start()
        return spools
    except AssertionError as e:
        if "mount daemon exited 4" not in str(e):
            raise
    server.cli("vpg", "remove-volume", VPG, VOL)
    spools += 1
    m.spool = m.spool.with_name(f"spool{spools}")
    m.start()
    return spools
