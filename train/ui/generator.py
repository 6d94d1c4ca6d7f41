"""The Generate tab's engine: one cached pipeline, every image made by :mod:`loracraft.infer`.

Images are saved like the ``loracraft generate`` CLI's (PNG with its generation record).
"""

from __future__ import annotations

import threading
from pathlib import Path

from loracraft.infer.errors import UsageError


class Generator:
    """One cached pipeline (last base used) with its adapters; every call goes through loracraft.infer."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._lock = threading.Lock()
        self._pipe = None
        self._base: str | None = None

    def _pipeline(self, base: str, adapters: list[tuple[str, float]]):
        from loracraft.infer import adapters as A
        from loracraft.infer.formats import resolve_adapter_file
        from loracraft.infer.models import load_base

        base = (base or "").strip()
        if not base:
            raise UsageError(
                "no base model, Base model, enter a diffusers folder, hub id or .safetensors file"
            )
        want = [(resolve_adapter_file(p).resolve(), float(s)) for p, s in adapters]
        if self._pipe is None or self._base != base:
            self._pipe, self._base = None, None
            self._pipe, self._base = load_base(base), base
        pipe = self._pipe
        if [str(p) for p, _ in want] != [str(a.path) for a in A.loaded_adapters(pipe)]:
            A.unload(pipe)
            A.load_adapters(pipe, want)
        elif want:
            A.set_scales(pipe, [s for _, s in want])
        return pipe

    def generate(self, base: str, adapters: list[tuple[str, float]], **kwargs) -> list[Path]:
        """Generate with :func:`loracraft.infer.generation`; PNGs (with their records) saved like the CLI's."""
        from loracraft.infer.cli import _next_index
        from loracraft.infer.generation import generate

        with self._lock:
            pipe = self._pipeline(base, adapters)
            images = generate(pipe, **kwargs)
            index, paths = _next_index(self.out_dir), []
            for img in images:
                paths.append(img.save(self.out_dir / f"{index:05d}-{img.record.seed}.png"))
                index += 1
        return paths

    def sweep(
        self, base: str, adapters: list[tuple[str, float]], scales: list[float], **kwargs
    ) -> tuple[list[tuple[Path, float]], Path]:
        """:func:`loracraft.infer.sweep_scales`: one image per multiplier, plus their grid."""
        from loracraft.infer.cli import _next_index, _scale_tag
        from loracraft.infer.generation import save_grid, sweep_scales

        if not adapters:
            raise UsageError("a scale sweep needs an adapter, Adapter 1, enter an adapter path")
        with self._lock:
            pipe = self._pipeline(base, adapters)
            rows = sweep_scales(pipe, scales, **kwargs)
            index, out, cells = _next_index(self.out_dir), [], []
            for j in range(len(rows[0])):
                for i, s in enumerate(scales):
                    img = rows[i][j]
                    path = img.save(self.out_dir / f"{index:05d}-{img.record.seed}-x{_scale_tag(s)}.png")
                    index += 1
                    out.append((path, s))
                    cells.append(img)
            grid = save_grid(
                cells,
                len(rows[0]),
                len(scales),
                self.out_dir / f"{index:05d}-grid.png",
                cells=[p.name for p, _ in out],
            )
        return out, grid
