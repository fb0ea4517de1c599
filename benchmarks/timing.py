"""Timing on a noisy machine: one call under a time limit, and interleaved rounds.

A shared VM's speed drifts by several times for seconds at a time. Timing each method in its own
block skews ratios; timing all methods round-robin, in a new random order each round, makes every
method (the floor included) sample the same slow and fast periods, so the ratio of medians to the
floor's median measured in the same rounds is stable where absolute times are not.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["CallTimer", "Progress", "TooSlow", "interleaved", "median_ratio"]


class Progress:
    """Work done / work total of the running call, for methods that can say (else both 0)."""

    done = 0
    total = 0

    @classmethod
    def reset(cls) -> None:
        cls.done = cls.total = 0

    @classmethod
    def estimate(cls, elapsed: float) -> float | None:
        """Full-call seconds extrapolated from the part done, or ``None``."""
        if cls.done > 0 and cls.total > 0:
            return elapsed * cls.total / cls.done
        return None


class TooSlow(Exception):
    """A call ran past the per-call limit."""

    def __init__(self, elapsed: float, estimate: float | None):
        self.elapsed = elapsed
        self.estimate = estimate
        msg = f"one call exceeded the per-call limit after {elapsed:.1f} s"
        if estimate:
            msg += f"; extrapolated from its progress: ~{estimate:.0f} s per call"
        super().__init__(msg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Times one call; a call longer than ``limit_s`` raises :class:`TooSlow`.

    ``clock`` is what a call is timed by: wall time (``time.perf_counter``, the default) or the
    process's CPU time (``time.process_time``), which other processes' load on the machine
    disturbs less. The limit is a SIGALRM timer on wall time: Python code raises at the next
    bytecode, so a single long native kernel finishes before the call is stopped (calls are made
    of many kernels here).
    """

    def __init__(self, limit_s: float, device: torch.device | str = "cpu",
                 clock: Callable[[], float] = time.perf_counter):
        self.limit_s = limit_s
        self.device = torch.device(device)
        self.clock = clock  # what is measured: wall time, or e.g. time.process_time (CPU time)
        self._start = 0.0
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum, frame):
        elapsed = time.perf_counter() - self._start
        raise TooSlow(elapsed, Progress.estimate(elapsed))

    def __call__(self, fn: Callable[[], object], cleanup: Callable[[], None] | None = None,
                 keep: bool = False):
        """Seconds of one ``fn()`` (and its result if ``keep``); ``cleanup`` runs untimed."""
        Progress.reset()
        _sync(self.device)
        self._start = time.perf_counter()
        t0 = self.clock()
        signal.setitimer(signal.ITIMER_REAL, self.limit_s)
        try:
            out = fn()
            _sync(self.device)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = self.clock() - t0
        if not keep:
            del out
            out = None
        if cleanup is not None:
            cleanup()
        return (dt, out) if keep else dt


def interleaved(
    calls: dict[str, tuple[Callable[[], object], Callable[[], None]]],
    rounds: dict[str, int],
    timer: CallTimer,
    seed: int = 0,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, list[float]]:
    """Round-robin timing: in round ``r`` every method with ``rounds[m] > r`` runs once.

    Args:
        calls: ``{method: (fn, cleanup)}``, already warmed up.
        rounds: timed calls per method.
        timer: the per-call timer.
        seed: seed of the per-round shuffles.
        on_error: called with a method that raised (it is dropped from later rounds).

    Returns:
        ``{method: [seconds of each timed call]}``.
    """
    rng = random.Random(seed)
    out: dict[str, list[float]] = {m: [] for m in calls}
    left = dict(rounds)
    for r in range(max(left.values(), default=0)):
        order = [m for m in calls if left.get(m, 0) > r]
        rng.shuffle(order)
        for m in order:
            fn, cleanup = calls[m]
            try:
                out[m].append(timer(fn, cleanup))
            except Exception as exc:  # noqa: BLE001 - recorded, the others go on
                left[m] = 0
                if on_error is not None:
                    on_error(m, exc)
    return out


def median_ratio(times: list[float], floor: list[float]) -> float | None:
    """Median of ``times`` over the median of the floor's times in the same rounds."""
    if not times or not floor:
        return None
    return statistics.median(times) / statistics.median(floor)
