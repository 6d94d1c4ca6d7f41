"""LoHa / LoKr via peft: trained, saved in the kohya/LyCORIS layout (checked against A1111's
formulas), loaded back by loracraft with outputs equal to the in-training model; LoRA-only
options refused."""

import pytest
import torch
from safetensors import safe_open

from loracraft.infer.errors import ConfigError
from loracraft.infer.names import LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME
from loracraft.train.config import build_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)


def _a1111_delta(t: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The weight update A1111's built-in networks (network_hada.py / network_lokr.py) compute from a file."""
    alpha = float(t["alpha"])
    if "hada_w1_a" in t:
        dim = t["hada_w1_b"].shape[0]
        up = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return up.reshape(shape) * alpha / dim
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    scale = alpha / dim if dim is not None else 1.0  # both factors full: LyCORIS ignores alpha
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize(("kind", "rank", "w2"), [("loha", 8, "hada_w2_b"), ("lokr", 2, "lokr_w2_b"), ("lokr", 8, "lokr_w2")])
def test_loha_lokr_train_save_in_lycoris_layout_and_load_back_with_equal_outputs(
    kind, rank, w2, tiny_sd, pair, tmp_path, make_trainer
):
    from diffusers import StableDiffusionPipeline

    from loracraft.infer.adapters import load_adapter, set_scales

    trainer = make_trainer(tiny_sd, pair, tmp_path / "r", **{
        "lora.type": kind, "lora.rank": rank, "lora.alpha": 4, "train.max_steps": 3, "train.lr": 3e-2,
        "validation.steps": 2,
    })
    for _ in range(3):
        trainer.optimizer_step()
    out = trainer.cleanup()
    assert out.name == LYCORIS_WEIGHT_NAME and not (out.parent / LORA_WEIGHT_NAME).exists()
    unet = trainer.accelerator.unwrap_model(trainer.unet)

    # the file, read the way A1111 reads it, holds exactly the trained weight updates
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    name = "lora_unet_" + module.replace(".", "_")
    with safe_open(str(out), "pt") as fh:
        assert f"{name}.{w2}" in fh.keys()
        assert fh.metadata()["ss_network_module"] == "lycoris.kohya" and kind in fh.metadata()["ss_network_args"]
        tensors = {k.removeprefix(name + "."): fh.get_tensor(k) for k in fh.keys() if k.startswith(name + ".")}
    layer = unet.get_submodule(module)
    trained = layer.get_delta_weight("default").detach()
    assert trained.abs().max() > 0
    torch.testing.assert_close(_a1111_delta(tensors, layer.get_base_layer().weight.shape), trained)

    # loracraft loads it back (what validation, generate and report use): same outputs as in training
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    x, t, ehs = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, ehs).sample
        loaded = load_adapter(pipe, out.parent)  # the run folder resolves to the LyCORIS file
        assert loaded.format == f"lycoris-{kind}" and loaded.num_modules == 32
        theirs = pipe.unet(x, t, ehs).sample
        torch.testing.assert_close(theirs, unet(x, t, ehs).sample, rtol=1e-5, atol=1e-6)
        assert (theirs - base).abs().max() > 1e-3
        set_scales(pipe, [0.0])
        assert torch.equal(pipe.unet(x, t, ehs).sample, base)
    if kind == "loha":  # the report's LoRA-scale sweep finds and loads the LyCORIS file
        from loracraft.train.commands.report import write_report

        write_report(out.parent)
        assert 'alt="scale sweep"' in (out.parent / "report.html").read_text()


def test_lora_only_options_with_loha_or_lokr_are_one_line_config_errors():
    base = {"model": {"base": "x"}, "data": {"path": "y"}}
    opts = ["lora.text_encoder={rank: 4}", "lora.use_dora=true", "lora.use_rslora=true", "lora.dropout=0.1",
            "lora.init=default", "train.loraplus_lr_ratio=16"]
    with pytest.raises(ConfigError) as e:
        build_config(base, ["lora.type=lokr", *opts])
    assert len(e.value.problems) == len(opts)
    for opt, problem in zip(opts, e.value.problems, strict=True):
        key = opt.split("=")[0]
        assert problem.startswith(f"{key} applies to lora.type=lora only, but lora.type=lokr, config, ") and "\n" not in problem
    assert build_config(base, ["lora.type=loha", "lora.rank=16", "lora.alpha=8"]).lora.type == "loha"


def test_loha_resumes_exactly_from_a_checkpoint(tiny_sd, pair, tmp_path, make_trainer):
    over = {"lora.type": "loha", "lora.rank": 4, "train.max_steps": 4, "checkpoint.every": 2}
    a = make_trainer(tiny_sd, pair, tmp_path / "a", **over)
    a.train()
    b = make_trainer(tiny_sd, pair, tmp_path / "b", **{**over, "train.max_steps": 2})
    b.train()
    assert any(".hada_w" in n for n in b.trainables)
    c = make_trainer(tiny_sd, pair, tmp_path / "b", **{
        **over, "checkpoint.allow_config_change": "true", "checkpoint.resume": str(tmp_path / "b/checkpoints/step-000002"),
    })
    assert c.step == 2
    c.train()
    for n, p in a.trainables.items():
        assert torch.equal(p, c.trainables[n]), n
