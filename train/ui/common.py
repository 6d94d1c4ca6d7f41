"""What every tab of ``loracraft ui`` shares: the server-side state, the error bridge, the styles.

The tabs only lay out components and call :mod:`loracraft.train.ui.backend`; anything two tabs
need (the run manager, the generator, the opened datasets) lives in one :class:`UIContext`
built by :func:`loracraft.train.ui.app.build_app`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from loracraft.infer.errors import LoracraftError
from loracraft.train.ui import backend as B
from loracraft.train.ui.captions import OpenedDatasets
from loracraft.train.ui.generator import Generator

#: Listeners that only serve the page: kept out of the API docs (generate and scale_sweep are the API).
INTERNAL = {"api_visibility": "undocumented"}

CSS = """
.pixel img, .pixel canvas { image-rendering: pixelated; }
#train-status, #ds-summary { min-height: 2.5em; }
#ds-findings { max-height: 360px; }
.hint { color: var(--body-text-color-subdued); font-size: 0.9em; }
.ok { color: #15803d; font-weight: 600; } .bad { color: #b91c1c; font-weight: 600; }
.run { color: #15803d; } .wait { color: #b45309; } .idle { color: #6b7280; }
#gen-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#ds-gallery .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  max-width: calc(100% - 8px); font-size: 11px; line-height: 1.25; }
"""


@dataclass
class UIContext:
    """The server-side state every session of one launched UI shares."""

    runs: B.RunManager
    generator: Generator
    datasets: OpenedDatasets = field(default_factory=OpenedDatasets)
    recipes: dict[str, Path] = field(default_factory=B.recipes)

    @classmethod
    def for_runs_dir(cls, runs_dir: str | Path) -> UIContext:
        runs = B.RunManager(runs_dir)
        return cls(runs=runs, generator=Generator(runs.runs_dir / B.UI_DIR / "generated"))


def message(e: LoracraftError) -> str:
    return " · ".join(e.problems)


def user_errors(fn):
    """Show a LoracraftError as Gradio's error toast (and API error) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoracraftError as e:
            raise gr.Error(message(e), duration=None) from e

    return wrapper


def frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def theme():
    return gr.themes.Default(primary_hue="indigo")
