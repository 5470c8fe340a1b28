"""The journal server's CPU priority with ``serve --cpu-priority background`` (the default).

A server on the same host as protected applications should not take the CPU from them: it
runs under SCHED_IDLE, and so do the links' sending threads in the mounts, while every VPG
is within its RPO target. A burst of writes then runs at the speed of capture to the spool
alone, and replication catches up when it ends. But a load that keeps every CPU busy for long
would starve replication and let the RPO grow without bound. So a thread of its own, at
ordinary priority, watches each VPG's RPO: once one is half way from its checkpoint interval
to its RPO target, the whole server, and the links of every mount, run ordinarily until every
VPG is back within a quarter of that way.

The watching thread reads the checkpoint logs itself (they are thread-safe): if the server's
event loop gets no CPU, no checkpoint is recorded, the RPO grows, and the thread sees it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from zfsrep.syscalls import name_thread, set_threads_idle

log = logging.getLogger(__name__)

#: How often the RPOs are looked at (and the policy applied to threads started since).
PACE_INTERVAL = 0.5
#: Fractions of the way from the checkpoint interval to the RPO target.
HURRY_AT = 0.5
CALM_AT = 0.25


def rpo_pressure(vpg: Any, now: float) -> float | None:
    """How far ``vpg``'s RPO has gone from its checkpoint interval towards its RPO target:
    0 at the interval (or below), 1 at the target. None where replication speed does not
    decide it: no volume, a volume not connected or still in its initial sync, or no
    checkpoint yet."""
    volumes = list(vpg.volumes.values())
    if not volumes or any(v.conn is None or not v.meta.synced_seq for v in volumes):
        return None
    latest = vpg.log.latest()
    if latest is None:
        return None
    rpo = now - latest.time_ns / 1e9
    interval = vpg.settings.checkpoint_interval_s
    slack = vpg.settings.rpo_s - interval
    if slack <= 0:  # the target leaves no room: anything past the interval is late
        return 0.0 if rpo <= interval else 1.0
    return max(rpo - interval, 0.0) / slack


class Pacer:
    """Switches the server between background and ordinary CPU priority (module docstring).

    ``vpgs`` is the server's live table of VPG runtimes; ``announce(background)`` is called
    (from the pacer's thread) when the mode changes, to tell the connected mounts."""

    def __init__(self, vpgs: Mapping[str, Any], announce: Callable[[bool], None]) -> None:
        self._vpgs = vpgs
        self._announce = announce
        self.background = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching; call it before the server starts other threads, at ordinary
        priority (the watcher keeps it; every other thread goes to the background)."""
        self._thread = threading.Thread(target=self._run, name="zfsrep-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        name_thread("zfsrep-pacer")
        me = threading.get_native_id()
        while True:
            try:
                self._tick(me)
            except Exception:  # a bug: the server must go on, at normal priority then
                log.exception("CPU priority pacer failed; the server runs at normal priority")
                self.background = False
                set_threads_idle(False, skip=me)
                with contextlib.suppress(Exception):
                    self._announce(False)
                return
            if self._stop.wait(PACE_INTERVAL):
                return

    def _tick(self, me: int) -> None:
        worst = max((p for vpg in list(self._vpgs.values())
                     if (p := rpo_pressure(vpg, time.time())) is not None), default=0.0)
        background = worst < (CALM_AT if not self.background else HURRY_AT)
        if background != self.background:
            self.background = background
            if background:
                log.info("every VPG is within its RPO target again: back to background CPU "
                         "priority")
            else:
                log.info("a VPG's RPO is %.0f%% of the way from its checkpoint interval to "
                         "its target: the server and the links run at normal CPU priority "
                         "until it is back", 100 * worst)
            try:
                self._announce(background)
            except Exception:  # (the event loop is stopping)
                log.debug("could not tell the mounts", exc_info=True)
        # every tick, for the threads started since
        set_threads_idle(self.background, skip=me)
