"""Bit-exact determinism and exact resume, through the real CLI in subprocesses.

The dataset has 3 images and runs are 40 optimizer steps, so epochs (3 samples) never line
up with checkpoints (every 10) or the end: resumes land mid-epoch by construction.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_sd):
    from loracraft.infer.testing import write_captioned_dataset

    root = tmp_path_factory.mktemp("repro")
    data = write_captioned_dataset(root / "data", n=3, seed=11)
    p = root / "repro.yaml"
    p.write_text(
        f"model: {{base: {tiny_sd}}}\n"
        f"data: {{path: {data}, resolution: 32, random_flip: true, caption_dropout: 0.2}}\n"
        "lora: {rank: 4, alpha: 2, dropout: 0.1}\n"
        f"train: {{max_steps: {STEPS}, lr: 1.0e-3, lr_scheduler: cosine, warmup_steps: 5, batch_size: 1}}\n"
        f"checkpoint: {{every: {EVERY}, keep: 2}}\n"
        "output: {report_to: [], report: false}\n"
    )
    return p


def _cmd(recipe, out, *over):
    return [sys.executable, "-m", "loracraft.train.cli", "train", str(recipe), f"output.dir={out}", *over]


def _sha(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["weights_sha256"]


@pytest.fixture(scope="module")
def baselines(recipe, tmp_path_factory):
    """Uninterrupted runs for grad_accum 1 and 2 (computed once, reused)."""
    root = tmp_path_factory.mktemp("baseline")
    out = {}
    for accum in (1, 2):
        run = root / f"accum{accum}"
        proc = subprocess.run(_cmd(recipe, run, f"train.grad_accum={accum}"), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[accum] = run
    return out


def test_same_seed_gives_identical_weights(recipe, baselines, tmp_path, cli):
    again = tmp_path / "again"
    assert subprocess.run(_cmd(recipe, again, "train.grad_accum=1"), capture_output=True).returncode == 0
    assert _sha(again) == _sha(baselines[1])
    other = tmp_path / "seed1"
    assert subprocess.run(_cmd(recipe, other, "train.seed=1"), capture_output=True).returncode == 0
    assert _sha(other) != _sha(baselines[1])


@pytest.mark.parametrize("accum", [1, 2])
def test_sigkill_then_resume_equals_uninterrupted(recipe, baselines, tmp_path, accum):
    run = tmp_path / "killed"
    rng = random.Random(accum)
    proc = subprocess.Popen(_cmd(recipe, run, f"train.grad_accum={accum}"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run / "checkpoints" / f"step-{EVERY:06d}"
    deadline = time.time() + 300
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.05, 0.6))  # somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    resumed = subprocess.run(_cmd(recipe, run, f"train.grad_accum={accum}"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert _sha(run) == _sha(baselines[accum])
    steps = [json.loads(r)["step"] for r in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # rows after the checkpoint were not duplicated


def test_sigterm_writes_a_checkpoint_and_resume_is_exact(recipe, baselines, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(_cmd(recipe, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (run / "logs").is_dir() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "resume" in err
    from loracraft.train.checkpoint import list_checkpoints

    assert list_checkpoints(run / "checkpoints"), "no checkpoint written on SIGTERM"
    resumed = subprocess.run(_cmd(recipe, run), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _sha(run) == _sha(baselines[1])


def test_changed_config_is_refused_on_resume(recipe, tmp_path):
    run = tmp_path / "changed"
    proc = subprocess.run(_cmd(recipe, run, "train.max_steps=10"), capture_output=True, text=True)
    assert proc.returncode == 0
    (run / "run.json").write_text(
        json.dumps(dict(json.loads((run / "run.json").read_text()), status="running"))
    )  # pretend it was interrupted after its checkpoint
    proc = subprocess.run(_cmd(recipe, run, "train.max_steps=10", "train.lr=0.1"), capture_output=True, text=True)
    assert proc.returncode == 2 and "train.lr: 0.001 -> 0.1" in proc.stderr
    proc = subprocess.run(
        _cmd(recipe, run, "train.max_steps=12", "checkpoint.allow_config_change=true"), capture_output=True, text=True
    )
    assert proc.returncode == 0 and "resuming from" in proc.stderr


def test_non_finite_loss_stops_cleanly(recipe, tmp_path):
    run = tmp_path / "nan"
    proc = subprocess.run(
        _cmd(recipe, run, "train.lr=1e30", "train.max_grad_norm=null", "train.lr_scheduler=constant",
             "train.warmup_steps=0", "checkpoint.every=1"),
        capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("loracraft: error:")]
    assert len(err) == 1 and "loss became" in err[0] and "last good checkpoint kept" in err[0]
    assert not (run / "pytorch_lora_weights.safetensors").exists()


def test_reproduce_reports_match(baselines, tmp_path, cli):
    proc = cli("reproduce", baselines[1], "--out", tmp_path / "repro")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("MATCH")


def test_reproduce_reports_mismatch_with_exit_3(baselines, tmp_path, cli):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(baselines[1], copy)
    manifest = json.loads((copy / "run.json").read_text())
    manifest["weights_sha256"] = "0" * 64
    (copy / "run.json").write_text(json.dumps(manifest))
    proc = cli("reproduce", copy)
    assert proc.returncode == 3 and "MISMATCH" in proc.stderr
    assert os.path.isdir(tmp_path / "copy-reproduce")


def test_reproduce_from_another_folder_of_a_run_given_relative_paths(tiny_sd, tmp_path, cli):
    """run.json stores local paths absolute: `reproduce` works wherever it is started."""
    from loracraft.infer.testing import write_captioned_dataset

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_captioned_dataset(project / "data", n=2, px=32, seed=3)
    base = os.path.relpath(tiny_sd, project)
    (project / "c.yaml").write_text(
        f"model: {{base: {base}}}\ndata: {{path: data, resolution: 32}}\nlora: {{rank: 2, alpha: 2}}\n"
        "train: {max_steps: 2, batch_size: 1}\noutput: {dir: runs/r, report_to: [], report: false}\n"
    )
    proc = cli("train", "c.yaml", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((project / "runs/r/run.json").read_text())["config"]
    assert config["data"]["path"] == str(project / "data") and config["model"]["base"] == str(Path(tiny_sd))
    proc = cli("reproduce", os.path.relpath(project / "runs/r", elsewhere), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("MATCH") and (project / "runs/r-reproduce/run.json").is_file()
