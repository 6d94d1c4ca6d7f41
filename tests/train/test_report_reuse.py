"""The end-of-run report samples its scale sweep on the base already in memory: the images must
be those of the base read from disk with the run's file loaded (``loracraft report``), and the
trainer's own adapter must be back in charge afterwards."""

import numpy as np
import torch
from PIL import Image

OVER = {"train.max_steps": 4, "train.batch_size": 1, "validation.prompts": '["a red circle"]',
        "validation.steps": 3, "validation.every": 4, "lora.text_encoder.rank": 4}


def _unet_and_te_out(trainer):
    torch.manual_seed(0)
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    te = trainer.c.text_encoder
    ids = torch.randint(0, te.config.vocab_size, (1, 8))
    x = torch.randn(1, unet.config.in_channels, 4, 4)
    with torch.no_grad():
        hidden = te(ids)[0]
        return unet(x, torch.tensor([500]), hidden).sample, hidden


def test_report_in_memory_equals_report_from_disk(tiny_sd, tiny_dataset, tmp_path, make_trainer, capfd):
    """UNet and text-encoder adapters both: the sweep's adapter must replace the training one in each."""
    from loracraft.train.commands.report import write_report

    run = tmp_path / "run"
    trainer = make_trainer(tiny_sd, tiny_dataset, run, **OVER, **{"output.report": "true"})
    trainer.train()
    before = _unet_and_te_out(trainer)
    trainer.cleanup()
    assert "scale sweep on the base already in memory" in capfd.readouterr().err
    in_memory = np.asarray(Image.open(run / "samples" / "scale-sweep.png"))
    after = _unet_and_te_out(trainer)
    for a, b in zip(before, after, strict=True):  # the training adapter is active again, nothing stacked
        assert torch.equal(a, b)

    write_report(run)  # `loracraft report RUN_DIR`: reads the base from disk
    assert "loading the base for the scale sweep" in capfd.readouterr().err
    from_disk = np.asarray(Image.open(run / "samples" / "scale-sweep.png"))
    assert in_memory.shape == from_disk.shape
    # Same weights, seeds and scheduler: equal up to float rounding in the VAE decode.
    assert np.abs(in_memory.astype(int) - from_disk.astype(int)).max() <= 2
    assert (in_memory[:32] != in_memory[-32:]).any()  # scale 0 and scale 1 rows differ: the adapter is applied
