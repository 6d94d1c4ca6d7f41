"""Captioned image datasets: :mod:`.sources` (one reader per layout -> items and findings),
:mod:`.findings` (the problem classes), :mod:`.images` (the decoded training view),
:mod:`.stream` (keyed sampling, buckets, transforms, batches) and :mod:`.check` (the lint rules
behind ``loracraft check-data``).

This package re-exports the public names of ``sources`` and ``stream`` on first use, so
``from loracraft.train.data import X`` keeps working; only ``stream`` imports torch, so
checking a folder (``sources``, ``check``) starts without it.
"""

from __future__ import annotations

import importlib

_SOURCES = (
    "IMAGE_EXTS",
    "REPEAT_DIR",
    "CaptionedImages",
    "Finding",
    "Item",
    "Source",
    "load_captioned_images",
    "read_source",
    "to_rgb",
    "with_affixes",
)
_STREAM = (
    "BucketedStream",
    "Plan",
    "Planner",
    "SampleStream",
    "TrainingExamples",
    "assign_bucket",
    "collate",
    "cover_size",
    "keyed_generator",
    "keyed_seed",
    "load_pixels",
    "loader_workers",
    "make_batches",
    "make_buckets",
    "positions_for",
    "prepare_caption",
    "resize_and_crop",
    "size_conditioning",
    "to_tensor",
)
__all__ = [*_SOURCES, *_STREAM]


def __getattr__(name: str):
    module = "sources" if name in _SOURCES else "stream" if name in _STREAM else None
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
