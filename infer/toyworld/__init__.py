"""The toy world: the bundled toy base, its procedural scenes, the content probe and the style score.

The demo and the tests run here because no hub is reachable where loracraft is tested; nothing a
user needs to *use* their own adapter lives in this package.
"""

from __future__ import annotations

from pathlib import Path


def toy_base_path() -> Path:
    """The toy base shipped inside the package (``loracraft/infer/assets/toy-base``)."""
    from importlib.resources import files

    from loracraft.infer.errors import ModelError

    path = Path(str(files("loracraft.infer") / "assets" / "toy-base"))
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"the bundled toy base is missing, {path}, reinstall loracraft or rebuild it with "
            "python scripts/build_toy_base.py --out infer/assets/toy-base"
        )
    return path
