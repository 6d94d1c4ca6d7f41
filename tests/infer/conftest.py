"""tests/infer: keep torch to one thread.

The tiny model's ops are microseconds long; with two OpenMP threads on a 2-core machine that
also runs other test processes, threads spin-wait on each other and a 2-step 32 px image took
2.3 s instead of 0.2 s (measured here). One thread is also what makes timings repeatable.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
