"""Two CPU processes through torchrun + gloo (what `accelerate launch` does on GPUs).

`accelerate launch --cpu --num_processes 2` starts a single process on this machine, so the
test uses torchrun, which the trainer supports directly (`python -m loracraft.train`).
"""

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

STEPS = 8


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_sd):
    from loracraft.infer.testing import append_to_captions, write_captioned_dataset

    root = tmp_path_factory.mktemp("mp")
    data = write_captioned_dataset(root / "data", n=5, seed=21)
    # Two styled captions, three plain ones preserved toward the base's prediction: every test
    # here also covers preserve's extra base pass under DDP (ranks, resume, 2 procs == 1).
    append_to_captions(data, "in lcstyle style", [0, 1])
    p = root / "mp.yaml"
    p.write_text(
        f"model: {{base: {tiny_sd}}}\n"
        f"data: {{path: {data}, resolution: 32, random_flip: true}}\n"
        "preserve: {trigger: in lcstyle style, weight: 4}\n"
        "lora: {rank: 4, alpha: 4}\n"
        f"train: {{max_steps: {STEPS}, lr: 1.0e-3}}\n"
        "checkpoint: {every: 3}\n"
        "output: {report_to: [], report: false}\n"
    )
    return p


def _torchrun(recipe, out, *over, nproc=2, popen=False, entry=("-m", "loracraft.train")):
    # --standalone: a private rendezvous on a free port (parallel test runs don't collide)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, entry), str(recipe), f"output.dir={out}", *over]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _single(recipe, out, *over):
    cmd = [sys.executable, "-m", "loracraft.train", str(recipe), f"output.dir={out}", *over]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_proc(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    proc = _torchrun(recipe, out, "train.batch_size=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preserve: 3 of 5 images have captions without 'in lcstyle style'" in proc.stderr
    return out


def test_both_ranks_hold_identical_weights(two_proc):
    manifest = json.loads((two_proc / "run.json").read_text())
    assert manifest["num_processes"] == 2
    hashes = manifest["rank_weights_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] == manifest["weights_sha256"]


def test_only_one_set_of_outputs(two_proc):
    rows = [json.loads(r)["step"] for r in (two_proc / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))
    names = sorted(p.name for p in two_proc.iterdir())
    assert names == [".loracraft-run", "checkpoints", "logs", "pytorch_lora_weights.safetensors", "run.json",
                     "run.safetensors"]
    ckpt = sorted((two_proc / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in ckpt.glob("rng-rank*")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]


def test_two_processes_equal_one_process_with_double_batch(recipe, two_proc, tmp_path):
    """Same samples and keyed noise per step; only gradient summation order differs (fp32
    all-reduce of 2 partial means vs one mean over 2 samples), so weights agree to ~1e-6."""
    import torch

    one = tmp_path / "one"
    proc = _single(recipe, one, "train.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(two_proc / "pytorch_lora_weights.safetensors"))
    b = load_file(str(one / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_killed_two_process_run_resumes_exactly(recipe, two_proc, tmp_path):
    run = tmp_path / "killed"
    proc = _torchrun(recipe, run, "train.batch_size=1", popen=True)
    first = run / "checkpoints" / "step-000003"
    deadline = time.time() + 600
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    # the launcher and both ranks, like a lost node (torchrun starts each rank in its own
    # session, so killing the launcher's process group would leave them running)
    subprocess.run(["pkill", "-9", "-f", f"output.dir={run}"], check=False)
    proc.wait()
    assert not (run / "pytorch_lora_weights.safetensors").exists(), "finished before the kill"
    resumed = _torchrun(recipe, run, "train.batch_size=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((run / "run.json").read_text())["weights_sha256"] == json.loads(
        (two_proc / "run.json").read_text())["weights_sha256"]


def test_resume_on_other_process_count_keeps_effective_batch(recipe, two_proc, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(two_proc, run)
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(manifest, status="running")))
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS - 2:06d}", ignore_errors=True)
    for ck in sorted((run / "checkpoints").iterdir())[1:]:
        shutil.rmtree(ck)  # keep the step-3 checkpoint only
    refused = _single(recipe, run, "train.batch_size=1")
    assert refused.returncode == 2 and "effective batch: 2 (2 processes) -> 1 (1 processes)" in refused.stderr
    allowed = _single(recipe, run, "train.batch_size=2")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "not bit-identical" in allowed.stderr


#: Runs `python -m loracraft.train` with rank 1's loss made NaN at one step (what a diverging batch on
#: one GPU looks like), and writes each rank's exit code and LR-scheduler step count beside the run.
NAN_ON_RANK_1 = """
import contextlib, io, json, os, sys
from pathlib import Path

from loracraft.train import trainer as T
from loracraft.train.cli import main

nan_step, report = int(sys.argv.pop(1)), Path(sys.argv.pop(1))
rank = int(os.environ["RANK"])
real_loss, real_cleanup = T.LoraTrainer.compute_loss, T.LoraTrainer.cleanup


def compute_loss(self, batch):
    loss = real_loss(self, batch)
    return loss * float("nan") if rank == 1 and self.step + 1 == nan_step else loss


def cleanup(self):
    out = real_cleanup(self)
    (report / f"rank{rank}.json").write_text(json.dumps({"scheduler_steps": self.lr_scheduler.last_epoch}))
    return out


T.LoraTrainer.compute_loss, T.LoraTrainer.cleanup = compute_loss, cleanup
# each rank's own stderr (two processes writing one pipe may interleave their lines)
captured = io.StringIO()
with contextlib.redirect_stderr(captured):
    code = main(["train", *sys.argv[1:]])
sys.stderr.write(captured.getvalue())
(report / f"stderr-rank{rank}").write_text(captured.getvalue())
(report / f"exit-rank{rank}").write_text(str(code))
sys.exit(code)
"""
NAN_STEPS, NAN_STEP = 4, 2


def _nan_run(recipe, tmp_path, on_nan):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    report = tmp_path / "report"
    report.mkdir()
    out = tmp_path / "run"
    proc = _torchrun(recipe, out, "train.batch_size=1", f"train.max_steps={NAN_STEPS}", "checkpoint.every=1000",
                     f"train.on_nan={on_nan}", entry=(script, NAN_STEP, report))
    return proc, out, report


def test_nan_on_one_rank_is_skipped_on_both(recipe, tmp_path):
    import torch

    proc, out, report = _nan_run(recipe, tmp_path, "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"non-finite loss at step {NAN_STEP}; batch skipped" in proc.stderr
    # Both ranks dropped the same update: one scheduler step fewer than optimizer steps, on each.
    for rank in (0, 1):
        assert json.loads((report / f"rank{rank}.json").read_text()) == {"scheduler_steps": NAN_STEPS - 1}
    manifest = json.loads((out / "run.json").read_text())
    hashes = manifest["rank_weights_sha256"]
    assert manifest["steps"] == NAN_STEPS and hashes[0] == hashes[1] == manifest["weights_sha256"]
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_on_one_rank_stops_both_with_one_line(recipe, tmp_path):
    proc, out, report = _nan_run(recipe, tmp_path, "stop")
    assert proc.returncode != 0
    assert [(report / f"exit-rank{r}").read_text() for r in (0, 1)] == ["1", "1"]
    errors = [line for r in (0, 1) for line in (report / f"stderr-rank{r}").read_text().splitlines()
              if line.startswith("loracraft: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], errors  # one line on each rank, the same
    assert f"loss became nan at step {NAN_STEP}, {out}" in errors[0]
    assert "trainer.py" not in proc.stderr  # no traceback of ours (torchrun adds its own summary)
