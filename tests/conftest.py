"""Session-wide fixtures: expensive artefacts (tiny model, datasets, a trained run) built once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random-initialised SD1-architecture model in diffusers format (epsilon prediction)."""
    from loracraft.infer.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Eight 32 px captioned scenes in the imagefolder + metadata.jsonl layout."""
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("data") / "jsonl", n=8, px=32, seed=0)
