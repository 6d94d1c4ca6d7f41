"""SDXL bases given as one SGM-layout (original SDXL / A1111) .safetensors file."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

STEPS = {"train.max_steps": 2, "lora.text_encoder": "{rank: 4, alpha: 8}", "train.text_encoder_lr": 1e-2}


def _train(make_trainer, base, data, out, **over):
    trainer = make_trainer(base, data, out, **STEPS, **over)
    for _ in range(STEPS["train.max_steps"]):
        trainer.optimizer_step()
    trainer.cleanup()
    return json.loads((trainer.run_dir / "run.json").read_text()), trainer


def test_sdxl_single_file_trains_the_same_weights_as_its_folder(
    tiny_sdxl, tiny_dataset, tmp_path, make_trainer
):
    """The file holds the folder's weights (both text encoders included, text_encoder_2 in OpenCLIP
    names), so training on it with model.config = the folder must give the identical adapter."""
    import ldm_checkpoint  # tests/fixtures

    single = ldm_checkpoint.write_sgm_checkpoint(tiny_sdxl, tmp_path / "tiny-xl.safetensors")
    keys = load_file(single).keys()
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys

    a, ta = _train(make_trainer, tiny_sdxl, tiny_dataset, tmp_path / "folder")
    b, tb = _train(make_trainer, single, tiny_dataset, tmp_path / "file", **{"model.config": tiny_sdxl})
    assert b["config"]["model"]["base"] == str(single) and a["base_fingerprint"] != b["base_fingerprint"]
    wa, wb = load_file(ta._adapter_file()), load_file(tb._adapter_file())
    assert wa.keys() == wb.keys() and any("text_encoder_2" in k or "te2" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["weights_sha256"] == b["weights_sha256"]
