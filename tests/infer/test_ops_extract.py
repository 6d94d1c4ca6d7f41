"""loracraft extract: a base plus known low-rank changes gives those changes back.

The "fine-tune" is the tiny base with hand-made low-rank deltas added to a few layers, so the
right answer is known exactly; plain diffusers then checks that base + extracted LoRA computes
what the tuned UNet computes.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loracraft.infer.formats import LORA_WEIGHT_NAME, read_lora
from loracraft.infer.ops.extract import extract_lora
from loracraft.train.cli import main

#: UNet layers changed by a known delta: (file key, rank of the change).
UNET_CHANGES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": 2,
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight": 1,
    "down_blocks.0.attentions.0.proj_in.weight": 2,  # a 1x1 Conv2d on the tiny SD
    "up_blocks.1.resnets.0.conv1.weight": 2,  # a 3x3 Conv2d: only with --conv-rank
}
TE_CHANGES = {"encoder.layers.1.self_attn.q_proj.weight": 1}


def low_rank(shape, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(shape[0], rank, generator=g) @ torch.randn(
        rank, int(torch.tensor(shape[1:]).prod()), generator=g
    )
    return (0.05 * flat).reshape(shape)


def make_tuned(base, out, unet_changes, te_changes=None):
    """Copy ``base`` and add the known deltas; returns ``(folder, {(component, key): delta})``."""
    shutil.copytree(base, out)
    deltas = {}
    for component, changes, file in (
        ("unet", unet_changes, "unet/diffusion_pytorch_model.safetensors"),
        ("text_encoder", te_changes or {}, "text_encoder/model.safetensors"),
    ):
        if not changes:
            continue
        state = load_file(str(out / file))
        for i, (key, rank) in enumerate(changes.items()):
            d = low_rank(state[key].shape, rank, seed=i + 10 * len(deltas))
            state[key] = state[key] + d
            deltas[(component, key)] = d
        save_file(state, str(out / file), metadata={"format": "pt"})
    return out, deltas


def lora_delta(mod) -> torch.Tensor:
    up = mod.up.double().reshape(mod.up.shape[0], -1)
    down = mod.down.double().reshape(mod.down.shape[0], -1)
    return (mod.alpha / mod.rank * up @ down).reshape(mod.up.shape[0], *mod.down.shape[1:])


def module_of(component: str, key: str) -> str:
    path = key.removesuffix(".weight")
    return path if component == "unet" else f"text_model.{path}"


@pytest.fixture(scope="module")
def tuned(tiny_sd, tmp_path_factory):
    return make_tuned(tiny_sd, tmp_path_factory.mktemp("tuned") / "model", UNET_CHANGES, TE_CHANGES)


def test_extract_recovers_known_low_rank_changes(tiny_sd, tuned):
    folder, deltas = tuned
    result = extract_lora(tiny_sd, folder, rank=2, conv_rank=2, progress=False)
    adapter = result.adapter
    got = {(c, n) for c, n, _ in adapter.items()}
    assert got == {(c, module_of(c, k)) for c, k in deltas}  # every unchanged layer skipped
    for (component, key), d in deltas.items():
        mod = adapter.modules[component][module_of(component, key)]
        assert mod.rank == 2  # the cap, also for the rank-1 changes (like kohya, no numerical-rank cut)
        torch.testing.assert_close(lora_delta(mod).float(), d, rtol=1e-4, atol=2e-6)
    assert all(r.error < 1e-3 for r in result.reports)
    assert result.unchanged["unet"] > 10 and result.unchanged["text_encoder"] > 5


def test_without_conv_rank_convs_stay_out_and_rank_one_reports_the_svd_error(tiny_sd, tuned):
    folder, deltas = tuned
    result = extract_lora(tiny_sd, folder, rank=1, progress=False)
    names = {r.name for r in result.reports}
    assert "unet.up_blocks.1.resnets.0.conv1" not in names
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    s = torch.linalg.svdvals(deltas[("unet", key)].double())
    (report,) = [r for r in result.reports if r.name == "unet." + module_of("unet", key)]
    assert report.new_rank == 1
    assert report.error == pytest.approx(float(s[1] / s.norm()), rel=1e-4)  # Eckart-Young, by hand


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=hidden).sample


def test_base_plus_extracted_lora_in_plain_diffusers_equals_the_tuned_unet(tiny_sd, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder, _ = make_tuned(
        tiny_sd, tmp_path / "tuned", UNET_CHANGES
    )  # UNet only: plain diffusers cannot load CLIP LoRAs here
    out = tmp_path / "lora"
    argv = ["extract", "--base", str(tiny_sd), "--tuned", str(folder), "--rank", "2", "--conv-rank", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("extract: 4 layers") and "wrote" in lines[-1]
    assert any(line.startswith("text_encoder:") and "equal to the base" in line for line in lines)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME, adapter_name="x")
    tuned_unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    base_out = _unet_out(UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet"))
    want = _unet_out(tuned_unet)
    assert (want - base_out).abs().max() > 1e-3  # the changes are visible at all
    torch.testing.assert_close(_unet_out(pipe.unet), want, rtol=1e-4, atol=1e-5)
    gen = tmp_path / "images"
    assert main(["generate", "--base", str(tiny_sd), "--lora", str(out), "--prompt", "a red circle",
                 "--steps", "2", "--seed", "1", "--out", str(gen)]) == 0  # fmt: skip
    assert len(list(gen.glob("*.png"))) == 1


def test_single_file_tuned_model_gives_the_same_lora(tiny_sd, tuned, tmp_path):
    import ldm_checkpoint  # tests/fixtures

    folder, _ = tuned
    single = ldm_checkpoint.write_ldm_checkpoint(folder, tmp_path / "tuned.safetensors")
    from_folder = extract_lora(tiny_sd, folder, rank=2, progress=False).adapter
    from_file = extract_lora(tiny_sd, single, rank=2, base_config=tiny_sd, progress=False).adapter
    assert {(c, n) for c, n, _ in from_file.items()} == {(c, n) for c, n, _ in from_folder.items()}
    for component, name, mod in from_folder.items():
        other = from_file.modules[component][name]
        torch.testing.assert_close(lora_delta(other), lora_delta(mod), rtol=1e-5, atol=1e-7)


def test_kohya_output_reads_back_with_the_same_deltas(tiny_sd, tuned, tmp_path):
    folder, deltas = tuned
    out = tmp_path / "k.safetensors"
    assert main(["extract", "--base", str(tiny_sd), "--tuned", str(folder), "--rank", "2", "--to", "kohya",
                 "--quiet", "--out", str(out)]) == 0  # fmt: skip
    adapter = read_lora(out)
    assert adapter.source_format == "kohya"
    key = "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"
    mod = adapter.modules["unet"][module_of("unet", key)]
    torch.testing.assert_close(lora_delta(mod).float(), deltas[("unet", key)], rtol=1e-4, atol=2e-6)


def test_refusals(tiny_sd, tiny_sdxl, tmp_path, capsys):
    def refused(*argv, code=2):
        assert main(["extract", *map(str, argv), "--out", str(tmp_path / "o.safetensors")]) == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "sd but the tuned model is sdxl" in refused("--base", tiny_sd, "--tuned", tiny_sdxl, "--rank", 2)
    assert "--device" in refused("--base", tiny_sd, "--tuned", tiny_sdxl, "--rank", 2, "--device", "warp9")
    assert "same model" in refused("--base", tiny_sd, "--tuned", tiny_sd, "--rank", 2)
    assert "positive" in refused("--base", tiny_sd, "--tuned", tiny_sdxl, "--rank", 0)
    assert "not found" in refused("--base", tiny_sd, "--tuned", tmp_path / "nope", "--rank", 2)
    same, _ = make_tuned(tiny_sd, tmp_path / "same", {})
    assert "equals the base" in refused("--base", tiny_sd, "--tuned", same, "--rank", 2)
    assert not (tmp_path / "o.safetensors").exists()
