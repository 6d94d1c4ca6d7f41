"""The UI without a browser: the API (gradio_client), who may call the server, and the backend pieces."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from loracraft.infer.errors import ConfigError, UsageError
from loracraft.train.commands.ui import AUTH_ENV, is_local, resolve_auth
from loracraft.train.ui import backend as B
from loracraft.train.ui import captions as C


# ----------------------------------------------------------------------------- API
def test_gradio_client_drives_generate(ui_server, tiny_sd, lora_dir):
    from gradio_client import Client

    from loracraft.infer.generation import read_record

    client = Client(ui_server.base, headers={"X-Loracraft-Token": ui_server.token}, verbose=False)
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
        (ui_server.runs_dir / ".ui" / "generated").glob("*.png")
    )  # kept server-side too, like the CLI's outputs/

    with pytest.raises(Exception, match="base model not found"):
        client.predict(base="/no/such/model", prompt="x", api_name="/generate")


# ----------------------------------------------------------------------------- who may call the server
def _request(server, path: str, data=None, headers=None, method=None):
    """``(status, headers, body)`` of one request to ``server``, with exactly ``headers`` sent."""
    body = None if data is None else json.dumps({"data": data}).encode()
    req = urllib.request.Request(server.base.rstrip("/") + path, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def _call(server, name: str, data: list, headers=None) -> tuple[int, str]:
    """A Gradio API call the way a page would make it: POST, then read the result stream.

    Returns ``(status of the POST, "complete" / "error" / the refusal text)``.
    """
    status, _, body = _request(server, f"/gradio_api/call/{name}", data, headers)
    if status != 200:
        return status, body
    event = json.loads(body)["event_id"]
    _, _, stream = _request(server, f"/gradio_api/call/{name}/{event}", headers=headers)
    return status, "complete" if "event: complete" in stream else "error"


def _token(server) -> dict:
    return {"X-Loracraft-Token": server.token}


@pytest.fixture(scope="module")
def opened(ui_server, tmp_path_factory):
    """A .txt-caption dataset checked through the API, as the Dataset tab does before an edit."""
    from loracraft.infer.testing import write_captioned_dataset

    root = write_captioned_dataset(tmp_path_factory.mktemp("ui-opened") / "data", n=2, px=32, layout="txt")
    assert _call(ui_server, "check", [str(root), 0, ""], _token(ui_server)) == (200, "complete")
    return root


def test_requests_need_own_host_own_origin_and_the_token(ui_server, opened):
    """Each refused request is a caption edit that the right request (last) does carry out."""
    caption = opened / "0000.txt"
    before = caption.read_text()
    edit = [str(opened), "0000.png", "an edited caption", 0, ""]
    own = f"127.0.0.1:{ui_server.port}"
    refused = {
        "forged Host (DNS rebinding)": ({**_token(ui_server), "Host": f"evil.example:{ui_server.port}"}, 403),
        "foreign Origin": ({**_token(ui_server), "Origin": f"http://evil.example:{ui_server.port}"}, 403),
        "Origin null": ({**_token(ui_server), "Origin": "null"}, 403),
        "no token": ({"Origin": f"http://{own}"}, 401),
        "wrong token": ({"X-Loracraft-Token": ui_server.token[:-1] + "x"}, 401),
        "token in a cookie of another port": ({"Cookie": f"loracraft-ui-1={ui_server.token}"}, 401),
    }
    for what, (headers, code) in refused.items():
        status, body = _call(ui_server, "save_and_recheck", edit, headers)
        assert status == code and "loracraft ui" in body, (what, status, body)
        assert caption.read_text() == before, what
    # the preflight of a cross-site fetch is refused too, without Access-Control-Allow-Origin
    status, headers, _ = _request(
        ui_server,
        "/gradio_api/call/save_and_recheck",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        method="OPTIONS",
    )
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in headers}

    status, headers, _ = _request(
        ui_server, "/config", headers={**_token(ui_server), "Origin": f"http://{own}"}
    )
    assert status == 200 and headers["access-control-allow-origin"] == f"http://{own}"
    assert _call(ui_server, "save_and_recheck", edit, _token(ui_server)) == (200, "complete")
    assert caption.read_text() == "an edited caption\n"


def test_token_link_sets_a_strict_cookie_and_leaves_the_address(ui_server):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    req = urllib.request.Request(ui_server.url, headers={"Accept": "text/html"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.build_opener(NoRedirect).open(req, timeout=30)
    assert err.value.code == 303 and err.value.headers["Location"] == "/"
    cookie = err.value.headers["Set-Cookie"]
    assert cookie.startswith(f"loracraft-ui-{ui_server.port}={ui_server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # another app's odd cookie for the same host comes first: it must not hide ours
    jar = 'prefs={"tabs": [1, 2]}; ' + cookie.split(";")[0]
    status, _, page = _request(ui_server, "/", headers={"Cookie": jar})
    assert status == 200 and "<html" in page.lower()
    assert _request(ui_server, "/")[0] == 401


def test_caption_writes_only_to_images_of_opened_folders(ui_server, opened, tmp_path):
    """With the token, an edit still cannot create or change a .txt outside what Check listed."""
    (tmp_path / "requirements.png").write_bytes((opened / "0001.png").read_bytes())
    attempts = [
        [str(tmp_path), "requirements.png", "pwned", 0, ""],  # a folder nobody opened
        [str(opened), "../requirements.png", "pwned", 0, ""],  # out of an opened one
        [str(opened), str(tmp_path / "requirements.png"), "pwned", 0, ""],  # an absolute path
        [str(opened), "requirements.png", "pwned", 0, ""],  # not an item of the check
    ]
    for data in attempts:
        assert _call(ui_server, "save_and_recheck", data, _token(ui_server)) == (200, "error"), data
    written = [tmp_path / "requirements.txt", opened / "requirements.txt", opened.parent / "requirements.txt"]
    assert not any(p.exists() for p in written)
    assert "pwned" not in "".join(p.read_text() for p in opened.glob("*.txt"))


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


def test_bad_allow_host_is_a_usage_error(tmp_path):
    proc = _ui("--allow-host", "http://proxy", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "loracraft: error: not a host name, --allow-host http://proxy, give NAME or NAME:PORT (e.g. localhost:8888)"
    ]
    assert not (tmp_path / "runs").exists()


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
    """With credentials the server starts, and nothing but the login page answers without them;
    the Host check still applies (names of this machine and --allow-host ones pass)."""
    from loracraft.train.ui.app import launch

    auth_file = tmp_path / "users"
    auth_file.write_text("# user:password\nalice:wonderland\n")
    port = free_port()
    ui = launch(
        tmp_path / "runs",
        host="0.0.0.0",
        port=port,
        auth=resolve_auth("0.0.0.0", str(auth_file), {}),
        allow_hosts=("tunnel.example:8888",),
        block=False,
    )
    try:
        assert ui.token is None and "token=" not in ui.url  # the login replaces the secret
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
        for host, code in (
            ("tunnel.example:8888", 401),
            ("evil.example", 403),
            (f"evil.example:{port}", 403),
        ):
            req = urllib.request.Request(f"{base}/config", headers={"Host": host})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=30)
            assert err.value.code == code, host
    finally:
        ui.close()


def test_missing_gradio_names_the_extra(monkeypatch, capsys):
    from loracraft.train.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'loracraft[ui]'" in err[0]


# ----------------------------------------------------------------------------- captions
def test_save_caption_every_layout_with_backup(tmp_path):
    from loracraft.infer.testing import write_captioned_dataset
    from loracraft.train.data.check import check_dataset

    for layout in ("jsonl", "csv", "txt", "repeats"):
        root = write_captioned_dataset(tmp_path / layout, n=3, px=32, seed=1, layout=layout)
        key = check_dataset(root, progress=False).entries[1].key
        written, backup = C.save_caption(root, key, "  a new caption  ")
        report = check_dataset(root, progress=False)
        assert [e.caption for e in report.entries if e.key == key] == ["a new caption"], layout
        assert backup is not None and backup.is_file() and ".loracraft-backup" in backup.parts
        assert not report.findings, (layout, report.findings)  # backups are invisible to training
        assert not list(written.parent.glob(".*.tmp"))  # no temp file left behind
    rows = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "metadata.csv").read_text())))
    assert [r["file_name"] for r in rows] == ["0000.png", "0001.png", "0002.png"]

    root = tmp_path / "jsonl"
    with pytest.raises(UsageError, match="no row"):
        C.save_caption(root, "nope.png", "x")
    with pytest.raises(UsageError, match="one line"):
        C.save_caption(root, "0000.png", "two\nlines")
    with pytest.raises(UsageError, match="outside the dataset"):
        C.save_caption(tmp_path / "txt", "../jsonl/0000.png", "x")


def test_caption_edit_keeps_mode_and_hard_links(tmp_path):
    """An edit writes into the same file: its mode stays and every hard link sees the new caption."""
    from loracraft.infer.testing import write_captioned_dataset

    for layout, name, key in (("txt", "0001.txt", "0001.png"), ("jsonl", "metadata.jsonl", "0001.png")):
        root = write_captioned_dataset(tmp_path / layout, n=2, px=32, layout=layout)
        source = root / name
        source.chmod(0o664)
        twin = tmp_path / f"{layout}-hard-link"
        os.link(source, twin)
        inode = source.stat().st_ino
        written, backup = C.save_caption(root, key, "a caption seen through the link")
        assert written == source and source.stat().st_ino == inode, layout
        assert stat.S_IMODE(source.stat().st_mode) == 0o664, layout
        assert "a caption seen through the link" in twin.read_text(), layout
        assert twin.read_text() == source.read_text() and backup.read_text() != source.read_text()

    # a caption file that does not exist yet is created with the mode the umask gives
    root = tmp_path / "txt"
    (root / "0000.txt").unlink()
    old = os.umask(0o027)
    try:
        written, backup = C.save_caption(root, "0000.png", "new")
    finally:
        os.umask(old)
    assert backup is None and written.read_text() == "new\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o640


def test_edits_need_an_opened_folder_and_one_of_its_items(tmp_path):
    from loracraft.infer.testing import write_captioned_dataset

    root = write_captioned_dataset(tmp_path / "data", n=2, px=32, layout="txt")
    opened = C.OpenedDatasets()
    with pytest.raises(UsageError, match="not opened in this UI"):
        opened.save_caption(root, "0000.png", "x")
    opened.open(root, ["0000.png"])
    for key in ("0001.png", "../data/0000.png", "./0000.png", str(root / "0000.png"), "0000.txt"):
        with pytest.raises(UsageError, match="not an image of the checked dataset"):
            opened.save_caption(root, key, "x")
    opened.save_caption(f" {root} ", "0000.png", "x")  # as typed in the folder field
    assert (root / "0000.txt").read_text() == "x\n" and "x" not in (root / "0001.txt").read_text()


def test_allowed_host_headers():
    from loracraft.train.ui.server import allowed_hosts, host_names

    loopback = {"127.0.0.1:7860", "localhost:7860", "[::1]:7860"}
    assert allowed_hosts(host_names("127.0.0.1"), 7860) == loopback
    assert allowed_hosts(host_names("::1"), 7860) == loopback
    assert allowed_hosts(host_names("gpu.lan", ["proxy.lan:443"]), 80) == {
        *(h.replace("7860", "80") for h in loopback),
        *("127.0.0.1", "localhost", "[::1]"),
        *("gpu.lan:80", "gpu.lan", "proxy.lan:443"),
    }


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


def test_a_concepts_only_run_lists_every_dataset(cli_run, tmp_path):
    """A run with data.concepts and no data.path shows its concept folders, not an empty dataset."""
    import shutil

    shutil.copytree(cli_run, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "run.json").read_text())
    manifest["config"]["data"]["path"] = None
    manifest["config"]["data"]["concepts"] = [{"path": "/data/people/alice", "repeats": 2}, {"path": "/data/style"}]
    (tmp_path / "c" / "run.json").write_text(json.dumps(manifest))
    (row,) = B.list_runs(tmp_path)
    assert row["dataset"] == "people/alice, data/style"
    assert dict(B.manifest_summary(tmp_path / "c"))["dataset"] == "/data/people/alice, /data/style"
