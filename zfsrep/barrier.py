"""The protected mount's half of the cross-volume checkpoint barrier (DESIGN invariant 2).

A checkpoint of a VPG with several volumes must be one consistent cut: if an operation A on
any volume completed before an operation B on any volume was issued, a checkpoint holding B
holds A. Each volume's own stream position is a prefix-closed cut of that volume, but the
positions of several volumes, taken one after the other, are not a cut of the whole: A could
complete on a volume already marked while B, issued after it, completes on one marked later.

So the server runs a barrier (docs/protocol.md, "Checkpoints"): it asks every volume to
*freeze*; a frozen volume answers no mutating request until it is *thawed*, and reports its
stream position as of the freeze. Once every volume is frozen, the server thaws them all.
At the instant the last one froze, no volume could complete an operation, so the positions
form a consistent cut. Requests are still *processed* while frozen (the backing directory
is written and the record numbered after the position); only their answers wait, so the
application pauses for about one network round trip.

A frozen volume thaws by itself after ``max_freeze`` seconds, so a lost server never stops
the application (DESIGN invariant 5); it then answers the late thaw with ``held=False`` and
the server discards that checkpoint.

A planned move needs more: a final checkpoint that equals the directory exactly. So a volume
can also be *quiesced*: mutating requests wait *before* they are carried out (the directory
does not change), until the move is rolled back (``resume``) or committed (the mount
retires). Quiescing waits until no mutating request is under way, so the position it
reports is the directory's state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

#: How long a volume stays frozen without a thaw before it thaws by itself (seconds).
MAX_FREEZE = 2.0


@dataclass
class GateStats:
    freezes: int = 0
    expired: int = 0  # freezes that ended by themselves (no thaw in time)
    held_s: float = 0.0  # total time frozen
    max_held_s: float = 0.0


class CompletionGate:
    """Holds the answers of mutating requests while the volume is frozen for a checkpoint.

    Used on the event loop only. ``on_change(frozen)`` is called at every freeze and thaw
    (the mount turns its C fast path's writes off and on with it)."""

    def __init__(self, on_change: Callable[[bool], None] | None = None, *,
                 max_freeze: float = MAX_FREEZE) -> None:
        self._on_change = on_change
        self.max_freeze = max_freeze
        self.frozen = False
        self._since = 0.0
        self._open = trio.Event()
        self._open.set()
        self._expired = False
        self.stats = GateStats()
        self.quiesced = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._busy = 0  # mutating requests past the quiesce check, not yet answered
        self._idle = trio.Event()
        self._idle.set()

    def freeze(self) -> None:
        """Hold every mutating answer from now on until :meth:`thaw` (or ``max_freeze``)."""
        if self.frozen:
            return
        self.frozen = True
        self._expired = False
        self._since = time.monotonic()
        self._open = trio.Event()
        self.stats.freezes += 1
        self._changed()

    def thaw(self) -> bool:
        """Release held answers. True if the volume was frozen without a break since the
        last :meth:`freeze` (so the barrier held), False if it had thawed by itself."""
        held = self.frozen and not self._expire_if_due()
        self._release()
        return held

    async def wait_open(self) -> None:
        """Wait (in a request handler, before it answers) until the volume is not frozen."""
        while self.frozen:
            if self._expire_if_due():
                return
            with trio.move_on_at(trio.current_time() + self._remaining()):
                await self._open.wait()

    def _remaining(self) -> float:
        return max(0.0, self._since + self.max_freeze - time.monotonic())

    def _expire_if_due(self) -> bool:
        if self.frozen and self._remaining() <= 0:
            self._expired = True
            self.stats.expired += 1
            self._release()
        return self._expired

    def _release(self) -> None:
        if not self.frozen:
            return
        self.frozen = False
        held = time.monotonic() - self._since
        self.stats.held_s += held
        self.stats.max_held_s = max(self.stats.max_held_s, held)
        self._open.set()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.frozen or self.quiesced)

    # ---- quiescing (a planned move) ------------------------------------------------------
    async def quiesce(self) -> None:
        """Hold every mutating request before it is carried out, from now until
        :meth:`resume`; returns once none is under way."""
        if not self.quiesced:
            self.quiesced = True
            self._resumed = trio.Event()
            self._changed()
        await self._idle.wait()

    def resume(self) -> None:
        if self.quiesced:
            self.quiesced = False
            self._resumed.set()
            self._changed()

    async def enter_mutation(self) -> None:
        """Called by a mutating request handler before it changes anything."""
        while self.quiesced:
            await self._resumed.wait()
        self._busy += 1
        if self._busy == 1:
            self._idle = trio.Event()

    def leave_mutation(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()
