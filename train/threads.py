"""How many CPU threads a training step uses (``train.threads``).

PyTorch's OpenMP workers spin while they wait for each other. On an idle machine that is what
makes a 2-thread step fast; on a machine whose cores are busy with other work a spinning worker
burns the time slice its partner needs, and a multi-threaded step gets many times slower than a
single-threaded one. Which count is faster therefore depends on the load *now*, so ``auto``
measures it: short probe windows of steps at the full count and at 1 thread, keep the faster,
probe again when the step time moves by a large factor or after a while.

Changing the thread count changes the order of floating-point sums (a full reduction such as
the loss mean splits differently), so the weights differ in the last bits. ``auto`` therefore
trades bit-exact reproducibility for speed and is opt-in; a fixed count (or the default, which
leaves PyTorch's choice alone) keeps same config + seed + machine -> same weights.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: Environment variables by which a user has already fixed the thread count; auto then stays out.
USER_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def user_fixed_threads() -> str | None:
    """The environment variable that already fixes the thread count, if any."""
    return next((v for v in USER_THREAD_VARS if os.environ.get(v, "").strip()), None)


class FixedThreads:
    """Leaves the count as it is (``None``) or sets it once; steps run untimed."""

    def __init__(self, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()

    def timed(self, step: Callable[[], T]) -> T:
        return step()


class AdaptiveThreads:
    """Picks between ``n`` threads and 1 thread from measured step times (see the module doc).

    ``probe`` steps run at each count (the first step after a switch is not timed: it pays
    for waking the pool); the faster median wins. While running, the median of the last
    ``probe`` steps is compared with the winner's probe median; a change by more than
    ``factor`` either way, or ``every`` steps since the last probe, starts a new probe. A new
    probe reuses those last steps for the count in use and tries only the other one, and gives
    the other up after one step that is already ``factor`` times slower (on a loaded machine a
    spinning multi-thread step can take many times longer: probing it costs little this way).
    """

    def __init__(
        self,
        n: int,
        probe: int = 3,
        factor: float = 1.5,
        every: int = 200,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.n, self.probe, self.factor, self.every = n, probe, factor, every
        self.log, self.clock = log, clock
        self.counts = [n, 1]
        self.threads = n
        self.chosen: int | None = None  # the count the last probe settled on
        self._skip = True
        self._start_probe()

    def _start_probe(self, known: dict[int, list[float]] | None = None) -> None:
        self.times: dict[int, list[float]] = {c: [] for c in self.counts} | (known or {})
        self.queue = [c for c in self.counts if len(self.times[c]) < self.probe]  # counts still to time
        self.recent: list[float] = []
        self.since = 0
        self._set(self.queue[0])

    def _set(self, threads: int) -> None:
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self._skip = True
        self.threads = threads

    def timed(self, step: Callable[[], T]) -> T:
        t0 = self.clock()
        out = step()
        self.observe(self.clock() - t0)
        return out

    def observe(self, seconds: float) -> None:
        """Feed one step's wall time; may change the thread count for the next step."""
        if self._skip:
            self._skip = False
            return
        if self.queue:
            count = self.queue[0]
            self.times[count].append(seconds)
            timed = [
                statistics.median(t) for c, t in self.times.items() if c != count and len(t) >= self.probe
            ]
            hopeless = bool(timed) and seconds > self.factor * min(timed)
            if len(self.times[count]) >= self.probe or hopeless:
                self.queue.pop(0)
                if self.queue:
                    self._set(self.queue[0])
                else:
                    self._decide()
            return
        self.since += 1
        self.recent = (self.recent + [seconds])[-self.probe :]
        if len(self.recent) == self.probe:
            ratio = statistics.median(self.recent) / self.baseline
            if ratio > self.factor or ratio < 1 / self.factor or self.since >= self.every:
                self._start_probe(known={self.threads: list(self.recent)})

    def _decide(self) -> None:
        medians = {c: statistics.median(t) for c, t in self.times.items() if t}
        best = min(medians, key=medians.get)
        self.baseline = medians[best]
        if self.log is not None and best != self.chosen:
            detail = ", ".join(f"{c} threads {m:.3f}" for c, m in medians.items())
            self.log(f"threads: using {best} (s/step: {detail})")
        self.chosen = best
        self._set(best)
        self._skip = False  # the winner's steps time fine; only probing discards the first


def thread_policy(
    setting: int | str | None, device: torch.device, log: Callable[[str], None] | None = None
) -> FixedThreads | AdaptiveThreads:
    """The policy for ``train.threads``: ``None`` leaves PyTorch's count, N fixes it, ``auto``
    adapts on CPU unless OMP_NUM_THREADS/MKL_NUM_THREADS already fix it."""
    if setting != "auto":
        return FixedThreads(setting)
    n = torch.get_num_threads()
    fixed_by = user_fixed_threads()
    if device.type != "cpu" or n <= 1 or fixed_by:
        if fixed_by and log is not None:
            log(f"note: train.threads=auto left alone: {fixed_by} fixes the thread count ({n})")
        return FixedThreads()
    return AdaptiveThreads(n, log=log)
