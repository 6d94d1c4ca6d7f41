"""Held-out loss during training: the split, the logged figure against plain diffusers, resume."""

import hashlib
import json

import pytest
import torch

OVER = {"train.max_steps": 6, "checkpoint.every": 3, "validation.heldout": 0.25, "train.batch_size": 1}


def _rows(run):
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def heldout_run(tiny_sd, tiny_dataset, tmp_path_factory, make_trainer):
    run = tmp_path_factory.mktemp("heldout") / "run"
    trainer = make_trainer(tiny_sd, tiny_dataset, run, **OVER)
    trainer.train()
    trainer.cleanup()
    return trainer, run


def test_split_sets_aside_the_lowest_hashes_of_seed_and_key(tiny_dataset):
    from loracraft.train.data import load_captioned_images
    from loracraft.train.validation import split_heldout

    images = load_captioned_images(str(tiny_dataset))
    keys = [it.key for it in images.items]
    expected = sorted(keys, key=lambda k: hashlib.sha256(f"7:{k}".encode()).hexdigest())[:2]  # round(0.25 x 8)
    train, held = split_heldout(images, 0.25, seed=7)
    assert sorted(it.key for it in held.items) == sorted(expected)
    assert {it.key for it in train.items} == set(keys) - set(expected)
    images.items.reverse()  # the folder's order does not matter, the names do
    assert sorted(it.key for it in split_heldout(images, 0.25, seed=7)[1].items) == sorted(expected)


def test_held_out_images_are_not_trained_on(heldout_run):
    trainer, _ = heldout_run
    trained = {it.key for it in trainer.images.items}
    held = {it.key for it in trainer.heldout_images.items}
    assert len(held) == 2 and len(trained) == 6 and not trained & held


def test_heldout_loss_is_logged_at_step_0_and_every_checkpoint(heldout_run):
    _, run = heldout_run
    logged = {r["step"]: r["heldout_loss"] for r in _rows(run) if "heldout_loss" in r}
    assert sorted(logged) == [0, 3, 6]
    for step in (3, 6):
        saved = json.loads((run / "checkpoints" / f"step-{step:06d}" / "heldout.json").read_text())
        assert saved["heldout_loss"] == logged[step]
    assert logged[6] != logged[0]  # the adapter changed the prediction


def test_logged_value_equals_plain_diffusers_with_the_checkpoint_adapter(heldout_run, tiny_sd):
    """Independent: diffusers' pipeline + load_lora_weights, the documented noise keying
    (image index, seed 1234), DDPM add_noise, MSE against the noise (epsilon model)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from loracraft.train.loss import sample_noise_and_timesteps

    trainer, run = heldout_run
    ckpt = run / "checkpoints" / "step-000006"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.load_lora_weights(str(ckpt), weight_name="pytorch_lora_weights.safetensors")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    images = trainer.heldout_images
    losses = []
    with torch.no_grad():
        for i in range(len(images)):
            px = torch.tensor(list(images.image(i).getdata()), dtype=torch.float32).view(32, 32, 3)
            px = (px / 127.5 - 1).permute(2, 0, 1)[None]
            latents = pipe.vae.encode(px).latent_dist.mean * pipe.vae.config.scaling_factor
            emb = pipe.encode_prompt(images.caption(i), "cpu", 1, False)[0]
            noise, t = sample_noise_and_timesteps(tuple(latents.shape[1:]), [i], 1234, 1000)
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
            losses.append(float(torch.nn.functional.mse_loss(pred, noise)))
    logged = json.loads((ckpt / "heldout.json").read_text())["heldout_loss"]
    assert logged == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_resumed_run_logs_the_same_figure(heldout_run, tiny_sd, tiny_dataset, tmp_path, make_trainer):
    _, straight = heldout_run
    run = tmp_path / "run"
    first = make_trainer(tiny_sd, tiny_dataset, run, **OVER)
    for _ in range(3):
        first.optimizer_step()
    first._checkpoint()  # what train() does at step 3; then the process "dies"
    resumed = make_trainer(tiny_sd, tiny_dataset, run, **OVER)
    assert resumed.step == 3
    resumed.train()
    resumed.cleanup()
    a, b = (json.loads((r / "checkpoints" / "step-000006" / "heldout.json").read_text()) for r in (straight, run))
    assert a["heldout_loss"] == b["heldout_loss"]
    assert [r for r in _rows(run) if "heldout_loss" in r] == [r for r in _rows(straight) if "heldout_loss" in r]


def test_bad_fraction_and_missing_folder_are_one_line_errors(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    from loracraft.infer.errors import ConfigError

    with pytest.raises(ConfigError, match="fraction must be above 0 and below 0.5"):
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "a", setup=False, **{"validation.heldout": 0.6})
    with pytest.raises(ConfigError, match="held-out folder not found"):
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "b", **{"validation.heldout": str(tmp_path / "nope")})


def _cells(page):
    """Rows of the checkpoints table as lists of cell texts."""
    import re

    section = page.split('id="checkpoints"', 1)[1].split("<h2", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section) if "<td>" in row]


def test_report_lists_every_checkpoint_with_its_loss_and_names_the_minimum(heldout_run):
    from loracraft.train.commands.report import write_report

    _, run = heldout_run
    page = write_report(run, sweep=False).read_text()
    losses = {s: json.loads((run / "checkpoints" / f"step-{s:06d}" / "heldout.json").read_text())["heldout_loss"]
              for s in (3, 6)}
    rows = _cells(page)
    assert [int(r[0]) for r in rows] == [3, 6]
    for r in rows:
        assert float(r[1]) == pytest.approx(losses[int(r[0])], abs=1e-5)
        assert r[2] == "pytorch_lora_weights.safetensors" and r[3] == f"run-step-{int(r[0]):06d}.safetensors"
    best = min(losses, key=losses.get)
    assert f"Best checkpoint: <strong>step {best}</strong>" in page


def test_report_without_heldout_says_what_names_a_best_checkpoint(heldout_run, tmp_path):
    import shutil

    from loracraft.train.commands.report import write_report

    run = tmp_path / "run"
    shutil.copytree(heldout_run[1], run)
    for f in run.glob("checkpoints/*/heldout.json"):
        f.unlink()
    metrics = run / "logs" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _rows(run) if "heldout_loss" not in r))
    page = write_report(run, sweep=False).read_text()
    assert "Best checkpoint" not in page and "<code>validation.heldout</code>" in page
    assert [r[1] for r in _cells(page)] == ["n/a", "n/a"]


def test_two_processes_log_the_same_heldout_loss_as_one(tiny_sd, tiny_dataset, tmp_path):
    """Encoding and evaluation happen on the main process only, with no collective in between:
    a 2-process DDP run finishes (no rank waits forever) and logs what a 1-process run of the
    same effective batch logs."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{base: {tiny_sd}}}\ndata: {{path: {tiny_dataset}, resolution: 32}}\nlora: {{rank: 4, alpha: 4}}\n"
        "train: {max_steps: 4, lr: 1.0e-3}\ncheckpoint: {every: 2}\noutput: {report_to: [], report: false}\n"
        "validation: {heldout: 0.25, prompts: [a cat], at_start: true, every: 2, num_images: 1, steps: 2}\n"
    )
    launch = {2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 1: [sys.executable]}
    logged = {}
    for nproc, batch in ((2, 1), (1, 2)):
        out = tmp_path / f"p{nproc}"
        cmd = [*launch[nproc], "-m", "loracraft.train", str(recipe), f"output.dir={out}", f"train.batch_size={batch}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logged[nproc] = {r["step"]: r["heldout_loss"] for r in _rows(out) if "heldout_loss" in r}
        assert (out / "samples" / "step-000000.png").is_file()
    assert sorted(logged[2]) == [0, 2, 4]
    assert logged[2][0] == logged[1][0]
    for step in (2, 4):
        assert logged[2][step] == pytest.approx(logged[1][step], rel=1e-4)


def test_sdxl_training_figure_equals_loracraft_eval_on_the_pipeline(tiny_sdxl, tiny_dataset, tmp_path, make_trainer):
    """SDXL: two text encoders and size conditioning; the trainer's figure (encoded at setup) equals
    the one `loracraft eval` computes from a reloaded pipeline with the checkpoint's adapter."""
    from loracraft.infer.adapters import load_adapter
    from loracraft.infer.models import load_base
    from loracraft.train.validation import heldout_loss

    run = tmp_path / "run"
    trainer = make_trainer(tiny_sdxl, tiny_dataset, run, **{**OVER, "train.max_steps": 3})
    trainer.train()
    logged = json.loads((run / "checkpoints" / "step-000003" / "heldout.json").read_text())["heldout_loss"]
    pipe = load_base(str(tiny_sdxl))
    load_adapter(pipe, run / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors")
    assert heldout_loss(pipe, trainer.heldout_images, 32) == pytest.approx(logged, rel=1e-4)


def test_loracraft_eval_uses_the_runs_held_out_share(heldout_run):
    """eval on a fraction-split run measures the same images: its base figure is the step-0 one
    (the adapter starts at zero) and its LoRA figure the last checkpoint's (step 6 = the end)."""
    from loracraft.train.commands.evaluate import evaluate

    _, run = heldout_run
    logged = {r["step"]: r["heldout_loss"] for r in _rows(run) if "heldout_loss" in r}
    h = evaluate(run)["heldout_loss"]
    assert h["base"] == pytest.approx(logged[0], rel=1e-4)
    assert h["lora"] == pytest.approx(logged[6], rel=1e-4)
