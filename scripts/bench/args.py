"""Command-line plumbing shared by the small benchmark scripts (bench_cli.py, bench_threads.py)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path


def dataclass_parser(cls, doc: str, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """One ``--flag`` per field of ``cls`` (its default and type), plus ``--work-dir`` and ``--json``."""
    d = cls()
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        if f.name not in skip:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)), default=getattr(d, f.name)
            )
    p.add_argument("--work-dir", help="keep models, data, cache and logs here (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def from_args(cls, a: argparse.Namespace, **extra):
    return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}, **extra)


@contextlib.contextmanager
def work_root(work_dir: str | None, prefix: str):
    """``work_dir`` as given (kept), or a temporary folder removed afterwards."""
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if not work_dir:
            shutil.rmtree(root, ignore_errors=True)
