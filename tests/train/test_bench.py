"""The training benchmark's quick mode runs every variant and reports sane, honest figures.

No timing assertions (the machine is shared): only that each variant trains, produces positive
numbers, and that the floor (a) and loracraft (b) train the same LoRA modules under the same
step settings.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from loracraft.train.bench import (
    MODELS,
    BenchConfig,
    format_report,
    measure_model,
    ref_crop,
    ref_resize,
    ref_to_normalized_tensor,
)


def _check_model_result(r: dict, variants: str) -> None:
    assert list(r["variants"]) == list(variants)
    for v in r["variants"].values():
        assert v["steps_per_s"] > 0 and v["samples_per_s"] > 0 and v["setup_s"] > 0
        assert all(w > 0 for w in v["window_steps_per_s"])
        assert v["lora_params"] > 0 and v["unet_params"] > v["lora_params"]
    assert r["checks"]["same_lora_modules_a_b"]
    assert r["checks"]["settings_mismatch_a_b"] == {}
    assert all("lora_A" in m or "lora_B" in m for m in r["variants"]["a"]["lora_modules"])


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory):
    """Quick mode on the tiny model, all four variants, in this process (fast; no per-variant RSS)."""
    cfg = BenchConfig.quick(models=["tiny"], threads=1, isolate=False)
    return measure_model(MODELS["tiny"], cfg, tmp_path_factory.mktemp("bench"), log=lambda _m: None)


def test_quick_mode_runs_every_variant(quick_tiny):
    _check_model_result(quick_tiny, "abcd")
    assert quick_tiny["checks"]["same_lora_modules_d_b"]
    q = quick_tiny["ratios"]
    for key in ("b/a", "b/d", "c/a", "d/a", "cache_cost_s", "uncached_epoch_s", "cache_cost_epoch_fraction"):
        assert q[key] > 0, key
    assert q["cache_cost_source"] == "timed cache fill"
    assert q["rss_b/rss_d"] is None  # in-process: RSS cannot be attributed to one variant


def test_report_and_json(quick_tiny):
    results = {
        "config": {"rank": 4, "batch_size": 4},
        "machine": {
            "cpus": 2,
            "cpu_capability": "x",
            "torch": "t",
            "loadavg_before": [1, 1, 1],
            "loadavg_after": [1, 1, 1],
            "wall_s": 1.0,
        },
        "models": {"tiny": quick_tiny},
    }
    text = format_report(results)
    assert "(b)/(a)" in text and "(b)/(d)" in text and "RSS(b)/RSS(d)" in text and "caching cost" in text
    assert json.loads(json.dumps(results))["models"]["tiny"]["ratios"]["b/a"] > 0


def test_isolated_variants_report_their_own_peak_rss(tmp_path):
    """One process per variant (the default): per-variant peak RSS, same LoRA modules in (a) and (b)."""
    cfg = BenchConfig.quick(models=["tiny"], variants=["a", "b"], threads=1, rounds=1, window=1, warmup=1)
    r = measure_model(MODELS["tiny"], cfg, tmp_path, log=lambda _m: None)
    _check_model_result(r, "ab")
    for v in r["variants"].values():
        assert v["peak_rss_mb"] >= v["start_rss_mb"] > 0


def test_reference_transforms_match_torchvision_semantics():
    img = Image.fromarray(np.arange(96 * 64 * 3, dtype=np.uint8).reshape(64, 96, 3))
    resized = ref_resize(img, 32)  # shorter side -> 32, aspect kept
    assert resized.size == (48, 32)
    crop = ref_crop(resized, 32, center=True, rng=None)
    assert crop.size == (32, 32)
    assert np.array_equal(np.asarray(crop), np.asarray(resized)[:, 8:40])
    t = ref_to_normalized_tensor(Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8)))
    assert t.shape == (3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1.0]))
