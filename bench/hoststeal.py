"""How much CPU time the host took from this machine while a benchmark ran ("steal").

On a shared virtual machine the host may run other guests on our CPUs: ``/proc/stat``
counts that time as steal. Two of this project's sessions measured 16-45% steal with both
CPUs busy, which halved the baselines and cut the ratios of the configurations that need
more CPU than their baseline. The benchmarks print it beside their figures so that a reader
can tell a slow machine from a slow program.
"""

from __future__ import annotations


def _read() -> tuple[int, int] | None:
    """(steal, all) CPU time in clock ticks since boot, summed over the CPUs."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return ticks[7], sum(ticks)


class StealMeter:
    """Steal as a fraction of all CPU time since the meter was made (None if unknown)."""

    def __init__(self) -> None:
        self._start = _read()

    def fraction(self) -> float | None:
        now = _read()
        if self._start is None or now is None or now[1] <= self._start[1]:
            return None
        return (now[0] - self._start[0]) / (now[1] - self._start[1])


def describe(fractions: list[float | None]) -> str:
    """One line: the median and largest steal of some measurements."""
    known = sorted(f for f in fractions if f is not None)
    if not known:
        return "host steal time: not available"
    median = known[len(known) // 2]
    high = sum(f > 0.05 for f in known)
    return (f"host steal time during the measurements: median {100 * median:.0f}%, "
            f"max {100 * known[-1]:.0f}% ({high} of {len(known)} above 5%: there the host "
            "gave this machine's CPUs to others, and ratios of configurations that need more "
            "CPU than their baseline drop)")
