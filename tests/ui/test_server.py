"""The UI without a browser: the API (gradio_client), binding/auth rules, and the backend pieces."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from loracraft.infer.errors import ConfigError, UsageError
from loracraft.train.commands.ui import AUTH_ENV, is_local, resolve_auth
from loracraft.train.ui import backend as B


# ----------------------------------------------------------------------------- API
def test_gradio_client_drives_generate(ui_server, tiny_sd, lora_dir):
    from gradio_client import Client

    from loracraft.infer.generation import read_record

    url, runs_dir = ui_server
    client = Client(url, verbose=False)
    assert {"/generate", "/scale_sweep"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )
    image, png, params = client.predict(
        base=str(tiny_sd),
        lora_1=str(lora_dir),
        scale_1=0.75,
        prompt="a red circle on a blue background",
        steps=2,
        seed=3,
        api_name="/generate",
    )
    rec = read_record(png)
    assert (rec.seed, rec.steps, rec.width) == (3, 2, 32)
    assert rec.adapters[0]["scale"] == 0.75 and rec.adapters[0]["path"] == str(
        lora_dir / "pytorch_lora_weights.safetensors"
    )
    assert "<lora:" in params and read_record(image) == rec
    assert list(
        (runs_dir / ".ui" / "generated").glob("*.png")
    )  # kept server-side too, like the CLI's outputs/

    with pytest.raises(Exception, match="base model not found"):
        client.predict(base="/no/such/model", prompt="x", api_name="/generate")


# ----------------------------------------------------------------------------- binding and auth
def _ui(*args, env=None):
    import os

    full = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "loracraft.train.cli", "ui", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


def test_non_local_bind_without_auth_is_refused(tmp_path):
    proc = _ui("--host", "0.0.0.0", "--port", "1", "--runs-dir", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "loracraft: error: refusing to serve on non-local address 0.0.0.0"
    )
    assert AUTH_ENV in lines[0] and "--auth-file" in lines[0]
    assert not (tmp_path / ".ui").exists()


def test_auth_rules():
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1") and is_local("127.0.0.2")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("example.org")
    assert resolve_auth("127.0.0.1", None, {}) is None
    assert resolve_auth("0.0.0.0", None, {AUTH_ENV: "alice:s3:cret"}) == [("alice", "s3:cret")]
    with pytest.raises(UsageError, match="refusing"):
        resolve_auth("10.0.0.1", None, {})
    with pytest.raises(UsageError, match="cannot read the auth file"):
        resolve_auth("0.0.0.0", "/no/such/file", {})
    with pytest.raises(UsageError, match="user:password"):
        resolve_auth("0.0.0.0", None, {AUTH_ENV: "just-a-user"})


def test_non_local_bind_requires_login(tmp_path, free_port):
    """With credentials the server starts, and nothing but the login page answers without them."""
    from loracraft.train.ui.app import launch

    auth_file = tmp_path / "users"
    auth_file.write_text("# user:password\nalice:wonderland\n")
    port = free_port()
    demo, url = launch(
        tmp_path / "runs",
        host="0.0.0.0",
        port=port,
        auth=resolve_auth("0.0.0.0", str(auth_file), {}),
        block=False,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/config", timeout=30)
        assert err.value.code == 401
        form = urllib.parse.urlencode({"username": "alice", "password": "wrong"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/login", data=form, timeout=30)
        form = urllib.parse.urlencode({"username": "alice", "password": "wonderland"}).encode()
        with urllib.request.urlopen(f"{base}/login", data=form, timeout=30) as resp:
            assert resp.status == 200
    finally:
        demo.close()


def test_missing_gradio_names_the_extra(monkeypatch, capsys):
    from loracraft.train.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'loracraft[ui]'" in err[0]


# ----------------------------------------------------------------------------- captions
def test_save_caption_every_layout_atomic_with_backup(tmp_path):
    from loracraft.infer.testing import write_captioned_dataset
    from loracraft.train.data.check import check_dataset

    for layout in ("jsonl", "csv", "txt", "repeats"):
        root = write_captioned_dataset(tmp_path / layout, n=3, px=32, seed=1, layout=layout)
        key = check_dataset(root, progress=False).entries[1].key
        written, backup = B.save_caption(root, key, "  a new caption  ")
        report = check_dataset(root, progress=False)
        assert [e.caption for e in report.entries if e.key == key] == ["a new caption"], layout
        assert backup is not None and backup.is_file() and ".loracraft-backup" in backup.parts
        assert not report.findings, (layout, report.findings)  # backups are invisible to training
        assert not list(written.parent.glob(".*.tmp"))  # no temp file left behind
    rows = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "metadata.csv").read_text())))
    assert [r["file_name"] for r in rows] == ["0000.png", "0001.png", "0002.png"]

    root = tmp_path / "jsonl"
    with pytest.raises(UsageError, match="no row"):
        B.save_caption(root, "nope.png", "x")
    with pytest.raises(UsageError, match="one line"):
        B.save_caption(root, "0000.png", "two\nlines")
    with pytest.raises(UsageError, match="outside the dataset"):
        B.save_caption(tmp_path / "txt", "../jsonl/0000.png", "x")


# ----------------------------------------------------------------------------- config and runs
def test_knobs_round_trip_through_yaml():
    text = B.recipes()["quickstart"].read_text()
    fields = B.read_fields(text)
    assert fields["train.max_steps"] == 20 and fields["train.seed"] == 0 and fields["model.base"] is None
    text = B.set_fields(text, {"train.lr": 5e-4, "validation.prompts": "a\n\n b \n", "model.base": "/m"})
    fields = B.read_fields(text)
    assert (
        fields["train.lr"] == 5e-4
        and fields["validation.prompts"] == ["a", "b"]
        and fields["model.base"] == "/m"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        B.read_fields("model: [")


def test_start_refuses_invalid_config_listing_every_problem(tmp_path):
    runs = B.RunManager(tmp_path)
    text = B.set_fields(B.recipes()["quickstart"].read_text(), {"train.lr": -1, "lora.rankk": 3})
    with pytest.raises(ConfigError) as err:
        runs.start("bad-run", text)
    problems = " | ".join(err.value.problems)
    assert (
        "model.base" in problems
        and "data.path" in problems
        and "train.lr" in problems
        and "lora.rankk" in problems
    )
    assert not (tmp_path / ".ui" / "bad-run").exists()  # nothing written, nothing started
    with pytest.raises(UsageError, match="not usable as a folder name"):
        runs.start("../escape", text)
    assert runs.status("never-started").state == "not started"


def test_progress_and_terminal_text_from_a_tqdm_log():
    log = (
        "loading\rcaching latents: 100%|##| 8/8\n"
        "train:   0%|          | 0/20 [00:00<?, ?it/s]\rtrain:  35%|###5      | 7/20 [00:03<00:05, 2.1it/s, loss=1.1]"
    )
    assert B.parse_progress(log) == (7, 20, "00:03", "00:05")
    assert B.terminal_text(log).splitlines() == ["caching latents: 100%|##| 8/8", log.rsplit("\r", 1)[-1]]
    assert B.parse_progress("nothing yet") is None


def test_list_runs_and_compare(cli_run, tmp_path):
    import shutil

    shutil.copytree(cli_run, tmp_path / "a")
    shutil.copytree(cli_run, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "run.json").read_text())
    manifest["config"]["train"]["lr"] = 0.5
    (tmp_path / "b" / "run.json").write_text(json.dumps(manifest))
    (tmp_path / "not-a-run").mkdir()
    rows = B.list_runs(tmp_path)
    assert sorted(r["name"] for r in rows) == ["a", "b"] and {r["status"] for r in rows} == {"complete"}
    diff, curves = B.compare_runs(tmp_path / "a", tmp_path / "b")
    assert diff == ["train.lr: 0.001 -> 0.5"]
    assert {c["run"] for c in curves} == {"a", "b"} and len(curves) == 2 * 20
    assert dict(B.manifest_summary(tmp_path / "a"))["status"] == "complete"
