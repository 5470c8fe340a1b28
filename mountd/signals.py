"""Orderly stop of a mount daemon: SIGTERM, SIGINT or SIGHUP ends the pyfuse3 session, whose
main loop then returns and the daemon's wiring closes everything in order."""

from __future__ import annotations

import logging
import signal

import pyfuse3
import trio

log = logging.getLogger(__name__)


async def stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
