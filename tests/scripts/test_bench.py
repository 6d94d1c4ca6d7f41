"""The training benchmark's quick mode runs every variant and reports sane, honest figures.

No timing assertions (the machine is shared): only that each variant trains, produces positive
numbers, and that the floor (a) and loracraft (b) train the same LoRA modules under the same
step settings.
"""

import json

import numpy as np
import pytest
import torch
from bench.train import (
    MODELS,
    BenchConfig,
    format_report,
    lora_modules,
    measure_model,
    ref_crop,
    ref_resize,
    ref_to_normalized_tensor,
)
from PIL import Image


def _check_model_result(r: dict, variants: str) -> None:
    assert list(r["variants"]) == list(variants)
    for v in r["variants"].values():
        assert v["steps_per_s"] > 0 and v["samples_per_s"] > 0 and v["setup_s"] > 0
        assert all(w > 0 for w in v["window_steps_per_s"])
        assert v["lora_params"] > 0 and v["unet_params"] > v["lora_params"]
    assert r["checks"]["same_lora_modules_a_b"]
    assert r["checks"]["settings_mismatch_a_b"] == {}
    assert r["variants"]["a"]["lora_tensors"] == r["variants"]["b"]["lora_tensors"] > 0


@pytest.fixture(scope="module")
def quick_tiny(tiny_sd, tmp_path_factory):
    """Quick mode on the tiny model, every single-process variant, one process each (the default)."""
    cfg = BenchConfig.quick(threads=1, window=1)
    root = tmp_path_factory.mktemp("bench")
    return measure_model(MODELS["tiny"], cfg, root, log=lambda _m: None, model_dir=tiny_sd)


def test_quick_mode_runs_every_variant(quick_tiny):
    _check_model_result(quick_tiny, "abcdf")
    assert quick_tiny["checks"]["same_lora_modules_d_b"]
    q = quick_tiny["ratios"]
    for key in ("b/a", "b/d", "c/a", "d/a", "f/b", "rss_b/rss_d", "cache_cost_s", "uncached_epoch_s"):
        assert q[key] > 0, key
    assert q["paired"]["b/a"] > 0 and q["cpu"]["b/d"] > 0
    assert q["cache_cost_source"] == "timed cache fill"
    for v in quick_tiny["variants"].values():  # each variant's own process, own peak
        assert v["peak_rss_mb"] >= v["start_rss_mb"] > 0 and v["cpu_ms_per_step"] > 0


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


def test_two_process_variant_measures_throughput_against_one(tiny_sd, tmp_path):
    """Issue 7's line: (e) = (b) split over 2 torchrun processes sharing the same cores."""
    cfg = BenchConfig.quick(variants=["b", "e"], threads=2, window=1, rounds=1)
    r = measure_model(MODELS["tiny"], cfg, tmp_path, log=lambda _m: None, model_dir=tiny_sd)
    b, e = r["variants"]["b"], r["variants"]["e"]
    assert e["processes"] == 2 and e["settings"]["threads"] == 1 and b["settings"]["threads"] == 2
    assert e["samples_per_s"] == pytest.approx(e["steps_per_s"] * cfg.batch_size * 2)
    assert r["ratios"]["samples_e/samples_b"] == pytest.approx(e["samples_per_s"] / b["samples_per_s"])
    assert e["lora_tensors"] == b["lora_tensors"] > 0  # both ranks train the same adapter
    assert e["peak_rss_mb"] > b["start_rss_mb"]  # summed over the two ranks
    results = {"config": {"rank": 4, "batch_size": 4, "threads": 2}, "models": {"tiny": r}, "machine": {
        "cpus": 2, "cpu_capability": "x", "torch": "t", "loadavg_before": [0] * 3, "loadavg_after": [0] * 3,
        "wall_s": 1.0}}
    assert "processes: 2 x 1 thread(s)" in format_report(results)


def test_in_process_mode_refuses_multi_process_variants(tiny_sd, tmp_path):
    cfg = BenchConfig.quick(variants=["e"], isolate=False)
    with pytest.raises(ValueError, match="cannot run in-process"):
        measure_model(MODELS["tiny"], cfg, tmp_path, log=lambda _m: None, model_dir=tiny_sd)


def test_in_process_mode_runs_without_rss(tiny_sd, tmp_path):
    cfg = BenchConfig.quick(variants=["a"], threads=1, window=1, rounds=1, isolate=False)
    threads = torch.get_num_threads()
    r = measure_model(MODELS["tiny"], cfg, tmp_path, log=lambda _m: None, model_dir=tiny_sd)
    assert r["variants"]["a"]["steps_per_s"] > 0 and r["variants"]["a"]["peak_rss_mb"] is None
    assert torch.get_num_threads() == threads  # the caller's setting is given back


def test_lora_modules_lists_only_trainable_tensors():
    from peft import LoraConfig, inject_adapter_in_model

    base = torch.nn.Sequential()
    base.add_module("to_q", torch.nn.Linear(4, 4))
    base.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), base)
    names = lora_modules(model)
    assert names == ["to_q.lora_A.default.weight:(2, 4)", "to_q.lora_B.default.weight:(4, 2)"]


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


def test_variant_f_preserves_the_plain_half_of_the_bench_dataset(tmp_path):
    from bench.train import PRESERVE_TRIGGER, VARIANTS, BenchSpec, mark_half_styled

    from loracraft.infer.testing import write_captioned_dataset
    from loracraft.train.preserve import preserved_rows

    data = mark_half_styled(write_captioned_dataset(tmp_path / "d", n=6), 6)
    captions = [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert preserved_rows(captions, PRESERVE_TRIGGER, False).tolist() == [False, True] * 3
    spec = BenchSpec(model="tiny", model_dir="m", data_dir=str(data), work_dir=str(tmp_path / "w"), resolution=32)
    runner = VARIANTS["f"].make(spec, tmp_path / "w" / "f")
    assert runner.spec.loracraft_config(True, str(tmp_path / "o"), runner.extra).preserve.trigger == PRESERVE_TRIGGER
    assert spec.loracraft_config(True, str(tmp_path / "o")).preserve is None  # (b) stays without it


def test_report_shows_peak_gpu_memory_only_when_measured(quick_tiny):
    import copy

    r = copy.deepcopy(quick_tiny)
    machine = {"cpus": 2, "cpu_capability": "x", "torch": "t", "loadavg_before": [1, 1, 1],
               "loadavg_after": [1, 1, 1], "wall_s": 1.0}
    results = {"config": {"rank": 4, "batch_size": 4}, "machine": machine, "models": {"tiny": r}}
    assert all(v["peak_gpu_mb"] is None for v in r["variants"].values())  # CPU run: not measured
    assert "peak GPU MB" not in format_report(results)
    r["variants"]["a"]["peak_gpu_mb"] = 1234.4
    text = format_report(results | {"machine": machine | {"gpu": "NVIDIA H200"}})
    assert "peak GPU MB" in text and " 1234" in text and "GPU NVIDIA H200" in text


def test_bench_train_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    import bench_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_cli_bench_runs_the_real_command_and_computes_the_difference(tmp_path, monkeypatch):
    from bench import cli

    b = cli.quick(threads=1)
    spec = cli.prepare(b, tmp_path)
    out = tmp_path / "one"
    wall, cpu = cli.run_cli(spec, 1, out)  # the real `loracraft train`, report off, shared cache
    assert wall > 0 and cpu > 0 and (out / "run.json").is_file() and not (out / "report.html").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert any((tmp_path / "tiny" / "work" / "cache").iterdir())
    # the per-step figure is the wall difference over the step difference, against the floor
    runs = {b.short: (10.0, 5.0), b.long: (30.0, 9.0)}  # steps -> (wall, CPU) seconds
    monkeypatch.setattr(cli, "prepare", lambda *_: spec)
    monkeypatch.setattr(cli, "run_cli", lambda _s, steps, _o: runs.get(steps, (0.0, 0.0)))
    monkeypatch.setattr(cli, "floor_seconds_per_step", lambda _s, steps: (4.0, 0.5))
    r = cli.measure(b, tmp_path, log=lambda _m: None)
    wall, cpu = 20.0 / (b.long - b.short), 4.0 / (b.long - b.short)
    assert r["rounds"][0]["cli_s_per_step"] == pytest.approx(wall)
    assert r["ratio_median"] == pytest.approx(4.0 / wall) and r["cpu_ratio_median"] == pytest.approx(0.5 / cpu)


def test_busy_cores_end_by_themselves():
    import time

    from bench.threads import busy_cores

    t0 = time.time()
    with busy_cores(1, limit_s=1.0) as procs:
        assert procs[0].wait(timeout=30) == 0  # not killed: ran out its limit
    assert time.time() - t0 < 30


def test_threads_bench_phases(tmp_path):
    from bench import threads

    # 1 thread: the mechanics only (a 2-thread step beside a busy loop can take seconds on a shared machine)
    r = threads.measure_here(threads.quick(steps=2, threads=1, load_limit_s=60.0), tmp_path, log=lambda _m: None)
    assert list(r["phases"]) == ["fixed_idle", "auto_idle", "fixed_loaded", "auto_loaded"]
    s = {k: v["s_per_step"] for k, v in r["phases"].items()}
    assert all(v > 0 for v in s.values())
    assert r["fixed_loaded_over_idle"] == pytest.approx(s["fixed_loaded"] / s["fixed_idle"])
    assert r["auto_loaded_over_idle"] == pytest.approx(s["auto_loaded"] / s["auto_idle"])
    assert {v["threads_at_end"] for v in r["phases"].values()} == {1}
