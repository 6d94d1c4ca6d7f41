"""Checkpoint files: atomic, complete-or-absent, pickle-free, exact round trip, retention."""

import errno

import pytest
import torch

from loracraft.train import checkpoint as ckpt


def _state():
    torch.manual_seed(0)
    params = {"a.lora_A.weight": torch.nn.Parameter(torch.randn(4, 3)), "a.lora_B.weight": torch.nn.Parameter(torch.randn(3, 4))}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    loss = sum((p**2).sum() for p in params.values())
    loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    sched.step()
    return params, opt, sched


def test_round_trip_restores_everything(tmp_path):
    params, opt, sched = _state()
    path = ckpt.save_checkpoint(tmp_path, 7, params, opt, sched, state={"config_training": {"x": 1}})
    assert path.name == "step-000007" and not list(tmp_path.glob(".tmp-*"))
    assert not [p for p in path.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    rng_after_save = torch.rand(3)

    fresh, opt2, sched2 = _state()
    with torch.no_grad():
        for p in fresh.values():
            p.zero_()
    state = ckpt.load_checkpoint(path, fresh, opt2, sched2)
    assert state["step"] == 7 and state["config_training"] == {"x": 1}
    for name in params:
        assert torch.equal(fresh[name], params[name])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored to the moment of saving


def test_incomplete_dirs_are_never_listed(tmp_path):
    params, opt, sched = _state()
    ckpt.save_checkpoint(tmp_path, 10, params, opt, sched, state={})
    (tmp_path / ".tmp-step-000020").mkdir()  # a save killed midway
    (tmp_path / ".tmp-step-000020" / "adapter.safetensors").write_bytes(b"partial")
    (tmp_path / "step-000030").mkdir()  # hand-made dir without state.json
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]


def test_retention_keeps_the_newest(tmp_path):
    params, opt, sched = _state()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, params, opt, sched, state={})
        ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params, opt, sched = _state()
    good = ckpt.save_checkpoint(tmp_path, 1, params, opt, sched, state={})
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left.*step-000002, free disk space.*intact"):
        ckpt.save_checkpoint(tmp_path, 2, params, opt, sched, state={})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_any_write_error_is_one_checkpoint_error_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    """safetensors reports a full disk or a file-size limit as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    params, opt, sched = _state()
    ckpt.save_checkpoint(tmp_path, 1, params, opt, sched, state={})

    def too_large(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 27, message: "File too large" })\nmore')

    monkeypatch.setattr(ckpt, "save_file", too_large)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(tmp_path, 2, params, opt, sched, state={})
    assert "\n" not in str(e.value) and "File too large" in str(e.value)
    assert str(tmp_path / "step-000002") in str(e.value) and "free disk space" in str(e.value)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1] and not list(tmp_path.glob(".tmp-*"))


def test_rotation_deletes_only_what_loracraft_wrote(tmp_path):
    params, opt, sched = _state()
    first = ckpt.save_checkpoint(tmp_path, 1, params, opt, sched, state={})
    (first / "my-notes.txt").write_text("mine")  # the user's file inside a checkpoint folder
    own = tmp_path / "step-000000"  # the user's own folder with a checkpoint-like name
    own.mkdir()
    (own / "state.json").write_text('{"step": 0}')
    for step in (2, 3):
        ckpt.save_checkpoint(tmp_path, step, params, opt, sched, state={})
        ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in first.iterdir()] == ["my-notes.txt"]  # its own files went, the user's stayed
    assert (own / "state.json").read_text() == '{"step": 0}'
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [0, 3]


def test_full_disk_during_a_training_checkpoint_stops_cleanly_and_resumes_exactly(
    tiny_sd, tiny_dataset, tmp_path, monkeypatch, make_trainer
):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from loracraft.train import export

    over = {"train.max_steps": 6, "checkpoint.every": 2}
    run = tmp_path / "run"
    real = export.save_diffusers_lora

    def full_at_step_4(path, *a, **k):
        if "step-000004" in str(path):
            raise SafetensorError('Error while serializing: IoError(Os { code: 27, message: "File too large" })')
        return real(path, *a, **k)

    monkeypatch.setattr(export, "save_diffusers_lora", full_at_step_4)
    trainer = make_trainer(tiny_sd, tiny_dataset, run, **over)
    with pytest.raises(ckpt.CheckpointError) as e:
        trainer.train()
    message = str(e.value)
    assert e.value.exit_code == 1 and "\n" not in message
    assert str(run / "checkpoints" / "step-000004") in message and "free disk space" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # the temp dir is gone
    kept = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-000002").iterdir()}

    monkeypatch.setattr(export, "save_diffusers_lora", real)  # space freed: the same command again
    resumed = make_trainer(tiny_sd, tiny_dataset, run, **over)
    assert resumed.step == 2
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-000002").iterdir()} == kept
    resumed.train()
    resumed.cleanup()
    straight = make_trainer(tiny_sd, tiny_dataset, tmp_path / "straight", **over)
    straight.train()
    straight.cleanup()
    a, b = load_file(str(run / "pytorch_lora_weights.safetensors")), load_file(
        str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
