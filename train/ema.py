"""Exponential moving average of the adapter weights (the LoRA parameters only).

``shadow = decay_n * shadow + (1 - decay_n) * param`` at every ``every``-th optimizer step, where
``n`` counts the updates and ``decay_n = min(decay, n / (9 + n))`` (0 at the first update, which
copies the weights): diffusers' ``EMAModel`` warm-up with its defaults. Without it the average
starts at the untrained adapter and keeps ``decay ** n`` of it: 37 % after 1000 steps at 0.999.
Not ``EMAModel`` itself: that keeps a copy of a whole module and its ``state_dict`` is meant for
``torch.save``; here the shadow is a dict of fp32 tensors named like the trainables, which the
pickle-free checkpoint stores as ``ema.safetensors``. ``n`` follows from the step counter, so a
resumed run averages exactly like an uninterrupted one.
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

    def decay_at(self, step: int) -> float:
        """The decay of the update at optimizer step ``step``: ``EMAModel.get_decay`` (inv_gamma 1, no
        ``use_ema_warmup``, ``update_after_step`` 0) of the ``step // every``-th update."""
        t = step // self.every - 1
        return 0.0 if t <= 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, trainables: dict[str, torch.nn.Parameter], step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into the average, every ``every`` steps."""
        if step % self.every:
            return
        weight = 1.0 - self.decay_at(step)
        for name, p in trainables.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

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
