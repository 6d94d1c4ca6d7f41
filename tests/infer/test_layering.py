"""The infer layer must never import the train layer (imports point one way only: train -> infer).

Walks every .py under infer/ with ``ast`` and fails on any import of ``loracraft.train``:
absolute (``import loracraft.train``, ``from loracraft.train.x import y``), ``from loracraft
import train``, relative (``from ..train import x`` / ``from .. import train`` from inside the
package), and string forms (``importlib.import_module("loracraft.train...")``, ``__import__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import loracraft.infer

INFER_DIR = Path(loracraft.infer.__file__).resolve().parent
PACKAGE = "loracraft.infer"
FORBIDDEN = "loracraft.train"


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def _resolve_relative(level: int, module: str | None, package: str) -> str:
    """``from ..x import y`` inside ``package`` -> absolute module name (as importlib would)."""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    if level - 1 > len(parts) - 1:
        base = []
    return ".".join([*base, module] if module else base)


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def train_imports(source: str, package: str = PACKAGE, filename: str = "<snippet>") -> list[str]:
    """Every way ``source`` (a module inside ``package``) imports the train layer, as 'line: what'."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_forbidden(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            absolute = _resolve_relative(node.level, node.module, package) if node.level else module
            targets = [absolute] + [f"{absolute}.{alias.name}" for alias in node.names]
            if any(_is_forbidden(t) for t in targets):
                dots = "." * node.level
                found.append(
                    f"{node.lineno}: from {dots}{module} import {', '.join(a.name for a in node.names)}"
                )
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                target = _const_str(node.args[0])
                if target is None:
                    continue
                if name == "import_module" and target.startswith(".") and len(node.args) > 1:
                    pkg = _const_str(node.args[1]) or package
                    level = len(target) - len(target.lstrip("."))
                    target = _resolve_relative(level, target.lstrip(".") or None, pkg)
                if name == "__import__" and len(node.args) >= 4:
                    fromlist = node.args[3]
                    if isinstance(fromlist, (ast.List, ast.Tuple)):
                        names = [_const_str(e) for e in fromlist.elts]
                        if any(n and _is_forbidden(f"{target}.{n}") for n in names):
                            found.append(f"{node.lineno}: {name}({target!r}, fromlist={names})")
                            continue
                if _is_forbidden(target):
                    found.append(f"{node.lineno}: {name}({target!r})")
    return found


def test_no_module_under_infer_imports_train():
    files = sorted(INFER_DIR.rglob("*.py"))
    assert len(files) >= 8, files
    problems = []
    for path in files:
        rel = path.relative_to(INFER_DIR).with_suffix("")
        package = ".".join([PACKAGE, *rel.parts[:-1]])  # the package the module lives in
        for hit in train_imports(path.read_text(encoding="utf-8"), package, str(path)):
            problems.append(f"{path.relative_to(INFER_DIR.parent)}:{hit}")
    assert not problems, "infer/ must not import loracraft.train:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import loracraft.train",
        "import loracraft.train.trainer as loop",
        "import os, loracraft.train.config",
        "from loracraft.train import loop",
        "from loracraft.train.config import load_config",
        "from loracraft import train",
        "from loracraft import infer, train as t",
        "from ..train import loop",
        "from ..train.config import load_config",
        "from .. import train",
        "import importlib\nimportlib.import_module('loracraft.train.trainer')",
        "from importlib import import_module\nimport_module('loracraft.train')",
        "import importlib\nimportlib.import_module('..train', 'loracraft.infer')",
        "__import__('loracraft.train.trainer')",
        "__import__('loracraft', globals(), locals(), ['train'])",
        "def f():\n    from loracraft.train import loop\n    return loop",
        "try:\n    import loracraft.train\nexcept ImportError:\n    pass",
    ],
)
def test_checker_catches_every_form(snippet):
    assert train_imports(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import loracraft.infer.formats",
        "from loracraft.infer import formats",
        "from . import formats",
        "from .formats import read_lora",
        "import loracraft.training_utils",  # a different name that merely starts alike
        "from loracraft import trainer_ui",
        "importlib.import_module('loracraft.infer.generation')",
        "text = 'loracraft.train is the upper layer'",
    ],
)
def test_checker_allows_the_rest(snippet):
    assert train_imports(snippet) == [], snippet
