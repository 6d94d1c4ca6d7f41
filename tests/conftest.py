"""Session-wide fixtures: expensive artefacts (tiny model, datasets, a trained run) built once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never touch the user's ~/.cache/loracraft from tests; subprocesses inherit this.
os.environ["LORACRAFT_CACHE"] = __import__("tempfile").mkdtemp(prefix="loracraft-test-cache-")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Code that is not part of the installed package: test fixtures (tests/fixtures) and the benchmark /
# toy-base tooling (scripts/). Tests import them by their plain names (``messy``, ``bench.train``).
_ROOT = Path(__file__).resolve().parents[1]
for _folder in (_ROOT / "tests" / "fixtures", _ROOT / "scripts"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random-initialised SD1-architecture model in diffusers format (epsilon prediction)."""
    from loracraft.infer.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A random-initialised SDXL-architecture model (two text encoders, text_time conditioning)."""
    from loracraft.infer.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Eight 32 px captioned scenes in the imagefolder + metadata.jsonl layout."""
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("data") / "jsonl", n=8, px=32, seed=0)


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run ``python -m loracraft.train.cli ARGS`` in a subprocess; returns CompletedProcess."""
    import subprocess
    import sys

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "loracraft.train.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli():
    """The `loracraft` command as a subprocess: ``cli("train", ...)`` -> CompletedProcess."""
    return run_cli


@pytest.fixture(scope="session")
def cli_run(tiny_sd, tiny_dataset, tmp_path_factory):
    """One real `loracraft train` run of the quickstart recipe (rank 8, alpha 4), shared by e2e tests."""
    from importlib.resources import files

    out = tmp_path_factory.mktemp("cli") / "run"
    recipe = files("loracraft.configs") / "quickstart.yaml"
    proc = run_cli(
        "train", recipe, f"model.base={tiny_sd}", f"data.path={tiny_dataset}", f"output.dir={out}",
        "train.max_steps=20", "checkpoint.every=10",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# --- loracraft.infer fixtures: random adapters built the way the trainer saves them ----------
@pytest.fixture(scope="session")
def lora_dir(tiny_sd, tmp_path_factory):
    """A UNet attention adapter, rank 8 / alpha 4 (alpha != rank), random non-zero lora_B, diffusers format."""
    from loracraft.infer.adapters import build_random_lora
    from loracraft.infer.formats import LORA_WEIGHT_NAME

    out = tmp_path_factory.mktemp("lora-a")
    build_random_lora(tiny_sd, out / LORA_WEIGHT_NAME, rank=8, alpha=4, seed=1)
    return out


@pytest.fixture(scope="session")
def lora_dir_b(tiny_sd, tmp_path_factory):
    """A second, different adapter (rank 4 / alpha 8, UNet + text encoder) for stacking tests."""
    from loracraft.infer.adapters import build_random_lora
    from loracraft.infer.formats import LORA_WEIGHT_NAME

    out = tmp_path_factory.mktemp("lora-b")
    build_random_lora(tiny_sd, out / LORA_WEIGHT_NAME, rank=4, alpha=8, seed=2, text_encoder=True)
    return out


@pytest.fixture(scope="session")
def make_trainer():
    """Build and set up a LoraTrainer in-process: ``make_trainer(base, data, out, **overrides)``."""

    def make(base, data, out, setup=True, **over):
        from accelerate.state import AcceleratorState

        from loracraft.train.config import build_config
        from loracraft.train.trainer import LoraTrainer

        overrides = {
            "data.resolution": 32, "train.batch_size": 2, "train.max_steps": 30, "train.lr": 3e-3,
            "lora.rank": 8, "lora.alpha": 4, "checkpoint.every": 1000, "output.report_to": "[]",
            "output.report": "false", "output.dir": str(out), **over,
        }
        cfg = build_config(
            {"model": {"base": str(base)}, "data": {"path": str(data)}},
            [f"{k}={v}" for k, v in overrides.items()],
        )
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer = LoraTrainer(cfg)
        if setup:
            trainer.setup()
        return trainer

    return make


@pytest.fixture(scope="session")
def resume_split(make_trainer):
    """``resume_split(base, data, root, **over)`` -> (straight, resumed) trainers for exact-resume tests:
    ``over``'s max_steps in one run, and the same run stopped at half (its checkpoint there) and
    resumed from that checkpoint. Both have trained; neither is cleaned up."""

    def run(base, data, root, **over):
        steps = int(over["train.max_steps"])
        half = steps // 2
        straight = make_trainer(base, data, root / "straight", **over)
        straight.train()
        make_trainer(base, data, root / "resumed", **{**over, "train.max_steps": half, "checkpoint.every": half}).train()
        resumed = make_trainer(base, data, root / "resumed", **{
            **over, "checkpoint.allow_config_change": "true",
            "checkpoint.resume": str(root / "resumed" / "checkpoints" / f"step-{half:06d}"),
        })
        assert resumed.step == half
        resumed.train()
        return straight, resumed

    return run
