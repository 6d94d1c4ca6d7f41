"""The report's LoRA-scale sweep: one scale at a time (progress on stderr), the same images as
one ``sweep_scales`` call over all scales."""

from __future__ import annotations

import numpy as np

from loracraft.infer.adapters import build_random_lora, load_adapter
from loracraft.infer.generation import make_grid, sweep_scales
from loracraft.infer.models import load_base
from loracraft.infer.names import LORA_WEIGHT_NAME
from loracraft.train.commands.report import SWEEP_SCALES, sweep_grid


def test_sweep_grid_reports_progress_and_matches_one_sweep(tiny_sd, tmp_path, capsys):
    run = tmp_path / "run"
    build_random_lora(tiny_sd, run / LORA_WEIGHT_NAME, rank=4, alpha=4, seed=1)
    v = {"seed": 7, "steps": 2, "guidance": 5.0}
    manifest = {"config": {"model": {"base": str(tiny_sd)}, "data": {"resolution": 32}, "validation": v}}
    prompts = ["a red square", "a blue circle"]
    grid = sweep_grid(run, manifest, prompts)
    err = capsys.readouterr().err
    n = len(SWEEP_SCALES)
    assert [line for line in err.splitlines() if line.startswith("report:")] == [
        "report: loading the base for the scale sweep", *(f"report: scale sweep {i}/{n}" for i in range(1, n + 1))
    ]
    pipe = load_base(tiny_sd)
    load_adapter(pipe, run / LORA_WEIGHT_NAME)
    rows = sweep_scales(pipe, SWEEP_SCALES, prompt=prompts, seed=7, steps=2, guidance=5.0, width=32, height=32)
    expected = make_grid([g.image for row in rows for g in row], rows=n, cols=len(prompts))
    assert np.array_equal(np.asarray(grid), np.asarray(expected))
