"""The trainer in-process on the tiny model: gradients, frozen base, learning, plain-diffusers loading."""

import pytest
import torch


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory, make_trainer):
    """30 steps on a 2-image dataset (so every batch is the same pair), with the base snapshot."""
    from loracraft.infer.testing import write_captioned_dataset

    data = write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)
    trainer = make_trainer(tiny_sd, data, tmp_path_factory.mktemp("run") / "r")
    base_before = {n: p.detach().clone() for n, p in trainer.c.unet.named_parameters() if not p.requires_grad}
    fixed = next(trainer.batches)
    trainer.batches = iter([fixed] * 10_000)
    with torch.no_grad():
        loss_before = trainer.compute_loss(fixed).item()
    trainer.train()
    with torch.no_grad():
        loss_after = trainer.compute_loss(fixed).item()
    out = trainer.cleanup()
    return trainer, base_before, loss_before, loss_after, out


def test_only_lora_parameters_are_trainable(trained):
    trainer = trained[0]
    trainable = [n for n, p in trainer.c.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainer.trainables.values())
    assert not any(p.requires_grad for p in trainer.c.vae.parameters())
    assert not any(p.requires_grad for p in trainer.c.text_encoder.parameters())


def test_base_weights_are_bit_identical_after_training(trained):
    trainer, base_before = trained[0], trained[1]
    after = dict(trainer.c.unet.named_parameters())
    assert all(torch.equal(base_before[n], after[n]) for n in base_before)


def test_training_reduces_the_loss_at_fixed_noise(trained):
    _, _, before, after, _ = trained
    assert after < before * 0.9, (before, after)


def test_gradients_reach_only_lora(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "g")
    trainer.train_step(next(trainer.batches))
    grads = {n: p.grad for n, p in trainer.c.unet.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_plain_diffusers_loads_the_adapter_with_the_trained_alpha(trained, tiny_sd):
    """rank 8, alpha 4: plain load_lora_weights must apply scale 0.5, matching the model in memory."""
    from diffusers import StableDiffusionPipeline

    trainer, out = trained[0], trained[4]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(out.parent))
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    ehs = torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = trainer.accelerator.unwrap_model(trainer.unet)(x, t, ehs).sample
        theirs = pipe.unet(x, t, ehs).sample
        pipe.unload_lora_weights()
        base = pipe.unet(x, t, ehs).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-3  # and the adapter does something


def _nan_at(trainer, step):
    """Make the loss of optimizer step ``step`` (1-based) NaN, as a diverged batch would."""
    real = trainer.compute_loss

    def compute_loss(batch):
        loss = real(batch)
        return loss * float("nan") if trainer.step + 1 == step else loss

    trainer.compute_loss = compute_loss


def test_skip_drops_the_whole_update_and_the_counter_moves_on(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "s", **{"train.on_nan": "skip",
                                                                     "train.lr_scheduler": "linear"})
    _nan_at(trainer, 2)
    trainer.optimizer_step()
    before = {n: p.detach().clone() for n, p in trainer.trainables.items()}
    adam_steps = [s["step"].item() for s in trainer.optimizer.optimizer.state.values()]
    lr = trainer.lr_scheduler.get_last_lr()
    loss = trainer.optimizer_step()
    assert trainer.step == 2 and not torch.isfinite(loss)
    assert all(torch.equal(before[n], p) for n, p in trainer.trainables.items())
    assert [s["step"].item() for s in trainer.optimizer.optimizer.state.values()] == adam_steps
    assert trainer.lr_scheduler.get_last_lr() == lr and trainer.lr_scheduler.last_epoch == 1
    assert all(p.grad is None for p in trainer.trainables.values())
    trainer.optimizer_step()  # the next batch trains again
    assert trainer.step == 3 and trainer.lr_scheduler.last_epoch == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainables.items())


def test_stop_raises_one_line_naming_the_step(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    from loracraft.train.trainer import NonFiniteLoss

    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "n")
    _nan_at(trainer, 1)
    with pytest.raises(NonFiniteLoss) as e:
        trainer.optimizer_step()
    assert e.value.exit_code == 1 and "\n" not in str(e.value)
    assert "loss became nan at step 1" in str(e.value) and "train.on_nan=skip" in str(e.value)
