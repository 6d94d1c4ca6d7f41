"""Exponential moving average of the adapter weights (the LoRA parameters only).

Plain EMA, ``shadow = decay * shadow + (1 - decay) * param`` every ``every`` optimizer
steps, starting from the initial adapter. Not diffusers' ``EMAModel``: that one caps the decay
at ``(1 + n) / (10 + n)`` after ``n`` updates (a warm-up that is always on), keeps a copy
of a whole module, and its ``state_dict`` is meant for ``torch.save``; here the shadow is a
dict of fp32 tensors named like the trainables, which the pickle-free checkpoint stores as
``ema.safetensors``, and the update is one line anyone can check by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, trainables: dict[str, torch.nn.Parameter], decay: float, every: int = 1):
        self.decay, self.every = decay, every
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset(trainables)

    def reset(self, trainables: dict[str, torch.nn.Parameter]) -> None:
        """Start the average at the current weights."""
        self.shadow = {n: p.detach().float().clone() for n, p in trainables.items()}

    @torch.no_grad()
    def update(self, trainables: dict[str, torch.nn.Parameter], step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into the average, every ``every`` steps."""
        if step % self.every:
            return
        for name, p in trainables.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, trainables: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (validation, export), then restore."""
        saved = {n: p.detach().clone() for n, p in trainables.items()}
        with torch.no_grad():
            for n, p in trainables.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in trainables.items():
                    p.copy_(saved[n])


__all__ = ["AdapterEMA"]
