"""train.threads: the adaptive policy follows measured step times; explicit settings are respected."""

from __future__ import annotations

import pytest
import torch

from loracraft.train.threads import AdaptiveThreads, FixedThreads, thread_policy


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """Step time as a function of the thread count in use and of the machine's load."""

    def __init__(self):
        self.now = 0.0
        self.loaded = False

    def clock(self) -> float:
        return self.now

    def step(self) -> int:
        n = torch.get_num_threads()
        # idle: 2 threads take 1.0 s, 1 thread 1.8 s; loaded: spinning makes 2 threads 10x slower
        self.now += {(False, 2): 1.0, (False, 1): 1.8, (True, 2): 10.0, (True, 1): 2.5}[(self.loaded, n)]
        return n


def test_adaptive_keeps_the_faster_count_and_reprobes_when_the_load_changes():
    m = FakeMachine()
    torch.set_num_threads(2)
    pace = AdaptiveThreads(2, probe=3, factor=1.5, every=1000, clock=m.clock)
    used = [pace.timed(m.step) for _ in range(20)]
    assert used[-5:] == [2] * 5 and 1 in used  # probed 1 thread, kept 2 (idle)
    m.loaded = True
    used = [pace.timed(m.step) for _ in range(30)]
    assert used[-5:] == [1] * 5  # 10 s/step at 2 threads -> re-probe -> 1 thread
    m.loaded = False
    used = [pace.timed(m.step) for _ in range(30)]
    # at 1 thread the load going away only moves 2.5 -> 1.8 s (< factor): stays until `every`
    assert used[-1] == 1


def test_adaptive_reprobes_after_every_steps():
    m = FakeMachine()
    torch.set_num_threads(2)
    m.loaded = True
    pace = AdaptiveThreads(2, probe=3, factor=1.5, every=10, clock=m.clock)
    assert [pace.timed(m.step) for _ in range(12)][-1] == 1
    m.loaded = False
    used = [pace.timed(m.step) for _ in range(40)]
    assert used[-5:] == [2] * 5  # the periodic probe found 2 threads faster again


def test_logged_choice():
    m, lines = FakeMachine(), []
    torch.set_num_threads(2)
    m.loaded = True
    pace = AdaptiveThreads(2, probe=2, clock=m.clock, log=lines.append)
    for _ in range(10):
        pace.timed(m.step)
    assert lines == ["threads: using 1 (s/step: 2 threads 10.000, 1 threads 2.500)"]


def test_explicit_settings_are_respected(monkeypatch):
    torch.set_num_threads(2)
    assert isinstance(thread_policy(None, torch.device("cpu")), FixedThreads)
    assert torch.get_num_threads() == 2
    thread_policy(1, torch.device("cpu"))
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notes = []
    assert isinstance(thread_policy("auto", torch.device("cpu"), notes.append), FixedThreads)
    assert "OMP_NUM_THREADS" in notes[0]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert isinstance(thread_policy("auto", torch.device("cpu")), AdaptiveThreads)
    assert isinstance(thread_policy("auto", torch.device("cuda")), FixedThreads)


def test_a_reprobe_reuses_the_recent_steps_and_gives_up_a_hopeless_count_after_one_step():
    m = FakeMachine()
    torch.set_num_threads(2)
    m.loaded = True
    pace = AdaptiveThreads(2, probe=3, factor=1.5, every=10, clock=m.clock)
    first = [pace.timed(m.step) for _ in range(9)]  # 2 threads: skip + 3; 1 thread: skip + 3; decided
    assert first[-1] == 1 and first.count(2) == 4
    later = [pace.timed(m.step) for _ in range(30)]
    # every 10 steps a probe of 2 threads: one untimed step, one timed at 10 s (> 1.5 x 2.5 s): given up
    runs_at_2 = "".join(str(n) for n in later).split("1")
    assert [len(r) for r in runs_at_2 if r] == [2, 2]
