"""What ships in the wheel is the product: no benchmark, toy-base trainer or test fixture code."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TOOLING = ("bench", "toy_base", "messy", "ldm_checkpoint")


def _packaged_files() -> list[Path]:
    """Every .py file setuptools puts into the wheel, from pyproject's own package mapping."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = []
    for package in tool["packages"]:
        top, _, rest = package.partition(".")[2].partition(".")
        base = ROOT / tool["package-dir"][f"loracraft.{top}"]
        folders.append(base / rest.replace(".", "/") if rest else base)
    return sorted({p for folder in folders for p in folder.glob("*.py")})


def test_every_python_folder_under_the_packages_is_listed():
    # a sub-package missing from `packages` would silently be left out of the wheel
    listed = {p.parent for p in _packaged_files()}
    on_disk = {p.parent for top in ("train", "infer", "configs") for p in (ROOT / top).rglob("*.py")}
    assert on_disk == listed, sorted(map(str, on_disk ^ listed))


def test_no_tooling_is_packaged_or_imported_by_the_package():
    files = _packaged_files()
    assert len(files) > 50
    for path in files:
        assert not any(word in path.stem for word in TOOLING), path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in TOOLING for n in names), (path, names)
