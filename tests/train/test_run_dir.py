"""Run-folder safety: overwrite removes only what loracraft wrote; foreign folders are never touched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from loracraft.infer.errors import UsageError
from loracraft.train import run_dir
from loracraft.train.cli import main


def tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` -> sha256 of its bytes ('dir' for folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def legacy_manifest(**extra) -> str:
    """A run.json as loracraft wrote it before the marker file existed."""
    return json.dumps({"status": "complete", "config_training": {"lora": {"rank": 8}}, **extra})


def train(tiny_sd, data, out, *over: str) -> int:
    return main(
        [
            "train",
            str(Path(__file__).parents[2] / "configs" / "quickstart.yaml"),
            f"model.base={tiny_sd}",
            f"data.path={data}",
            f"output.dir={out}",
            "train.max_steps=2",
            "checkpoint.every=1",
            "validation.prompts=[]",
            "output.report=false",
            "output.report_to=[]",
            *over,
        ]
    )


@pytest.fixture
def home(tmp_path, tiny_dataset):
    """A user's home folder: documents, dotfiles and the dataset itself."""
    h = tmp_path / "home"
    (h / "Documents").mkdir(parents=True)
    (h / "Documents" / "x").write_text("my thesis")
    (h / ".bashrc").write_text("export PS1='$ '\n")
    (h / "checkpoints").mkdir()
    (h / "checkpoints" / "mine.txt").write_text("not loracraft's")
    data = h / "data"
    data.mkdir()
    for p in Path(tiny_dataset).iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    return h


# ----------------------------------------------------------------------------- the data-loss attack
@pytest.mark.parametrize("over", [[], ["output.overwrite=true", "lora.rank=4"]])
def test_home_folder_with_the_dataset_inside_is_refused_and_untouched(home, tiny_sd, capsys, over):
    before = tree_hash(home)
    assert train(tiny_sd, home / "data", home, *over) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output.dir contains data.path" in err[0], err
    assert tree_hash(home) == before


def test_foreign_non_empty_folder_is_refused_with_or_without_overwrite(home, tiny_sd, tiny_dataset, capsys):
    before = tree_hash(home)
    for over in ([], ["output.overwrite=true"]):
        assert train(tiny_sd, tiny_dataset, home, *over) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not empty and was not made by loracraft" in err[0], err
        assert "choose an empty or new output.dir" in err[0]
    assert tree_hash(home) == before


def test_legacy_run_in_a_home_folder_overwrite_removes_only_loracraft_files(home, tiny_sd, tiny_dataset):
    """A run an older version wrote into a non-empty folder: overwrite must spare everything else."""
    (home / "run.json").write_text(legacy_manifest())
    (home / "pytorch_lora_weights.safetensors").write_bytes(b"old adapter")
    (home / "checkpoints" / "step-000001").mkdir()
    user_files = {
        k: v
        for k, v in tree_hash(home).items()
        if k not in ("run.json", "pytorch_lora_weights.safetensors") and "step-" not in k
    }
    assert train(tiny_sd, tiny_dataset, home, "output.overwrite=true") == 0
    after = tree_hash(home)
    assert {k: after[k] for k in user_files} == user_files
    assert after["pytorch_lora_weights.safetensors"] != hashlib.sha256(b"old adapter").hexdigest()


def test_own_run_with_overwrite_removes_only_loracraft_files(tmp_path, tiny_sd, tiny_dataset, capsys):
    out = tmp_path / "run"
    assert train(tiny_sd, tiny_dataset, out) == 0
    assert (out / run_dir.MARKER).is_file() and (out / "checkpoints" / "step-000002").is_dir()
    (out / "notes.txt").write_text("user notes")
    (out / "checkpoints" / "keep.txt").write_text("user file among checkpoints")
    first = json.loads((out / "run.json").read_text())
    capsys.readouterr()
    assert train(tiny_sd, tiny_dataset, out, "lora.rank=4") == 2  # a different run: refused without overwrite
    assert "holds a different run" in capsys.readouterr().err
    assert train(tiny_sd, tiny_dataset, out, "lora.rank=4", "output.overwrite=true") == 0
    assert (out / "notes.txt").read_text() == "user notes"
    assert (out / "checkpoints" / "keep.txt").read_text() == "user file among checkpoints"
    second = json.loads((out / "run.json").read_text())
    assert second["config"]["lora"]["rank"] == 4 and second["weights_sha256"] != first["weights_sha256"]


# ----------------------------------------------------------------------------- before the dataset scan
@pytest.mark.parametrize("case", ["file", "under_file", "foreign_run_json", "inside_data", "is_cache"])
def test_bad_output_dir_fails_before_anything_is_read(case, tmp_path, tiny_sd, tiny_dataset, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {
        "file": blocker,
        "under_file": blocker / "run",
        "foreign_run_json": tmp_path / "other",
        "inside_data": Path(tiny_dataset) / "run",
        "is_cache": Path(os.environ["LORACRAFT_CACHE"]),
    }[case]
    if case == "foreign_run_json":
        out.mkdir()
        (out / "run.json").write_text('{"job": "someone else"}')
    before = tree_hash(tmp_path)
    # A data.path that does not exist would fail the scan: reaching it would change the message.
    data = tmp_path / "no-such-data" if case != "inside_data" else tiny_dataset
    assert train(tiny_sd, data, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loracraft: error: output.dir"), err
    assert tree_hash(tmp_path) == before


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch):
    # Tests run as root here, where permission bits do not stop writes: the check asks os.access.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(UsageError, match="output.dir is not writable"):
        run_dir.preflight(tmp_path / "run", [])


# ----------------------------------------------------------------------------- decisions (pure)
def state(tmp_path, manifest: dict | None = None, marker: bool = True, extra: str | None = None):
    tmp_path.mkdir(exist_ok=True)
    if marker:
        run_dir.claim(tmp_path)
    if manifest is not None:
        (tmp_path / "run.json").write_text(json.dumps(manifest))
    if extra:
        (tmp_path / extra).write_text("user")
    return run_dir.inspect(tmp_path)


def decide(st, diff=(), overwrite=False, allow=False, resume="auto", ckpts=()):
    return run_dir.decide(
        st, list(diff), overwrite=overwrite, allow_config_change=allow, resume=resume, checkpoints=list(ckpts)
    )


def test_decisions(tmp_path):
    missing = run_dir.inspect(tmp_path / "new")
    assert decide(missing) == run_dir.Fresh()
    done = state(tmp_path / "a", {"status": "complete", "config_training": {}})
    assert decide(done) == run_dir.Complete()
    assert decide(done, ["lora.rank: 8 -> 4"], overwrite=True) == run_dir.Fresh(clear=True)
    refused = decide(done, ["lora.rank: 8 -> 4"])
    assert isinstance(refused, run_dir.Refuse) and refused.differences == ("lora.rank: 8 -> 4",)
    ck = tmp_path / "a" / "checkpoints" / "step-000002"
    assert decide(done, ["x"], allow=True, ckpts=[ck]) == run_dir.Resume(ck)
    running = state(tmp_path / "b", {"status": "running", "config_training": {}})
    assert decide(running, ckpts=[ck]) == run_dir.Resume(ck)
    assert isinstance(decide(running, resume="latest"), run_dir.Refuse)
    assert decide(running, resume=False, ckpts=[ck]) == run_dir.Fresh(clear=True)
    foreign = state(tmp_path / "c", marker=False, extra="thesis.tex")
    assert isinstance(decide(foreign, overwrite=True), run_dir.Refuse)
    assert not foreign.owned and state(tmp_path / "d", extra="thesis.tex").owned


def test_foreign_run_json_makes_a_folder_foreign_even_with_a_marker(tmp_path):
    st = state(tmp_path, {"unrelated": True})
    assert not st.owned
    with pytest.raises(UsageError, match="run.json that loracraft did not write"):
        run_dir.preflight(tmp_path, [])


def test_clear_keeps_user_entries_and_the_folder(tmp_path):
    run_dir.claim(tmp_path)
    names = [
        "run.json",
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_ema.safetensors",
        "report.html",
        "eval.json",
        ".run.json.abc123.tmp",
        "notes.txt",
        "my.safetensors",
        f"{tmp_path.name}.safetensors",  # the kohya file is named after the run folder
        f"{tmp_path.name}-ema.safetensors",
    ]
    for n in names:
        (tmp_path / n).write_text(legacy_manifest() if n == "run.json" else "x")
    for d in ("checkpoints/step-000010", "checkpoints/.tmp-step-000020", "logs/loracraft", "samples", "mine"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "samples" / "step-000010.png").write_text("png")
    (tmp_path / "samples" / "holiday.png").write_text("png")
    (tmp_path / "logs" / "metrics.jsonl").write_text("{}")
    run_dir.clear(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [run_dir.MARKER, "notes.txt", "my.safetensors", "mine", "samples"]
    )
    assert os.listdir(tmp_path / "samples") == ["holiday.png"]


def test_clear_refuses_a_folder_loracraft_did_not_make(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(UsageError):
        run_dir.clear(tmp_path)
    assert (tmp_path / "run.json").is_file()


def test_overlap_relations(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for out, word in ((data, "is"), (data / "run", "is inside"), (tmp_path, "contains")):
        with pytest.raises(UsageError, match=f"output.dir {word} data.path"):
            run_dir.preflight(out, [("data.path", data)])
    run_dir.preflight(tmp_path / "elsewhere", [("data.path", data)])
