"""Atomic writes leave files with the mode any program would: 0o666 less the user's umask."""

from __future__ import annotations

import subprocess
import sys

import pytest

WRITE = """
import os, sys
os.umask(int(sys.argv[1], 8))
from loracraft.infer.io import write_json_atomic  # reads the umask at import, as in real use
write_json_atomic(sys.argv[2], {"a": 1})
print(oct(os.stat(sys.argv[2]).st_mode & 0o777))
"""


@pytest.mark.parametrize(("umask", "mode"), [("002", "0o664"), ("022", "0o644"), ("077", "0o600")])
def test_written_files_follow_the_umask(umask, mode, tmp_path):
    out = tmp_path / "sub" / "run.json"
    proc = subprocess.run([sys.executable, "-c", WRITE, umask, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == mode
    assert out.read_text().strip().startswith("{") and not list(out.parent.glob(".*.tmp"))
