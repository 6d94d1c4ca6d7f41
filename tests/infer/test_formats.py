"""diffusers/PEFT <-> kohya/A1111 conversion: exact tensors, exact alpha, metadata, detection, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.formats import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    LoraAdapter,
    LoraModule,
    convert_lora_file,
    detect_format,
    kohya_name_to_module,
    model_module_table,
    parse_diffusers_state,
    read_lora,
    read_safetensors,
    write_lora,
)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def assert_same_adapter(a: LoraAdapter, b: LoraAdapter) -> None:
    assert {c: sorted(m) for c, m in a.modules.items()} == {c: sorted(m) for c, m in b.modules.items()}
    for component, name, mod in a.items():
        other = b.modules[component][name]
        assert torch.equal(mod.down, other.down), name
        assert torch.equal(mod.up, other.up), name
        assert mod.down.dtype == other.down.dtype
        assert mod.alpha == other.alpha and type(mod.alpha) is type(other.alpha), (
            name,
            mod.alpha,
            other.alpha,
        )


def test_fixture_adapter_reads_with_alpha_not_rank(lora_dir):
    a = read_lora(lora_dir)
    assert a.source_format == "diffusers"
    assert set(a.modules) == {"unet"}
    ranks_alphas = {(m.rank, m.alpha) for _, _, m in a.items()}
    assert ranks_alphas == {(8, 4)}
    assert all(m.scale == 0.5 for _, _, m in a.items())


def test_round_trip_diffusers_kohya_diffusers_is_exact(lora_dir, tmp_path):
    src = lora_dir / LORA_WEIGHT_NAME
    kohya = convert_lora_file(src, tmp_path / "k.safetensors", "kohya")
    back = convert_lora_file(kohya, tmp_path / "back" / LORA_WEIGHT_NAME, "diffusers")

    t0, h0 = read_safetensors(src)
    tk, hk = read_safetensors(kohya)
    t2, h2 = read_safetensors(back)
    # every tensor, by name, bit for bit
    assert sorted(t0) == sorted(t2)
    for k in t0:
        assert torch.equal(t0[k], t2[k]) and t0[k].dtype == t2[k].dtype, k
    # the LoraConfig (alpha, rank, targets) comes back verbatim
    assert json.loads(h0["lora_adapter_metadata"]) == json.loads(h2["lora_adapter_metadata"])
    # the kohya file carries one alpha per module, = the trained alpha (4), not the rank (8)
    alphas = {k: v for k, v in tk.items() if k.endswith(".alpha")}
    assert len(alphas) == len(t0) // 2 == 32
    assert {float(v) for v in alphas.values()} == {4.0}
    assert all(k.startswith("lora_unet_") for k in tk)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in tk
    assert hk["ss_network_dim"] == "8" and hk["ss_network_alpha"] == "4"
    assert hk["ss_base_model_version"] == "sd_v1"
    assert hk["ss_network_module"] == "networks.lora"
    assert_same_adapter(read_lora(src), read_lora(back))


def test_text_encoder_uses_lora_te_prefix_and_round_trips(lora_dir_b, tmp_path):
    a = read_lora(lora_dir_b)
    assert set(a.modules) == {"unet", "text_encoder"}
    path = write_lora(a, tmp_path / "k.safetensors", to="kohya")
    tk, _ = read_safetensors(path)
    te_keys = [k for k in tk if not k.startswith("lora_unet_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys), te_keys[:3]
    assert not any(k.startswith("lora_te1_") for k in tk)  # that is SDXL's spelling
    b = read_lora(path)
    assert b.source_format == "kohya"
    assert_same_adapter(a, b)
    assert {m.alpha for _, _, m in b.items()} == {8}


def _adapter(alphas: dict[str, float], rank: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(0)
    mods = {
        name: LoraModule(torch.randn(rank, 32, generator=g), torch.randn(32, rank, generator=g), alpha)
        for name, alpha in alphas.items()
    }
    return LoraAdapter({"unet": mods})


def test_alpha_that_float32_cannot_hold_is_kept_exactly(tmp_path):
    a = _adapter({"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 0.1})
    path = write_lora(a, tmp_path / "k.safetensors", to="kohya")
    tk, _ = read_safetensors(path)
    (alpha,) = [v for k, v in tk.items() if k.endswith(".alpha")]
    assert alpha.dtype == torch.float64 and alpha.item() == 0.1
    assert (
        read_lora(path).modules["unet"]["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 0.1
    )


def test_per_module_alphas_survive_both_directions(tmp_path):
    alphas = {
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 2,
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": 2,
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v": 16,
    }
    a = _adapter(alphas)
    d = write_lora(a, tmp_path / "d.safetensors", to="diffusers")
    config = json.loads(read_safetensors(d)[1]["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == 2
    assert config["unet.alpha_pattern"] == {"^mid_block.attentions.0.transformer_blocks.0.attn1.to_v": 16}
    k = write_lora(read_lora(d), tmp_path / "k.safetensors", to="kohya")
    back = read_lora(k)
    assert {n: m.alpha for n, m in back.modules["unet"].items()} == alphas


def test_kohya_module_without_alpha_means_alpha_equals_rank(tmp_path):
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.ones(4, 32), f"{name}.lora_up.weight": torch.ones(32, 4)},
              str(tmp_path / "k.safetensors"))  # fmt: skip
    a = read_lora(tmp_path / "k.safetensors")
    (mod,) = a.modules["unet"].values()
    assert mod.alpha == 4 and mod.scale == 1.0


def test_diffusers_own_kohya_export_loses_alpha(lora_dir):
    """Why we write our own exporter: diffusers' convert_state_dict_to_kohya writes alpha = rank."""
    from diffusers.utils import convert_state_dict_to_kohya

    tensors, _ = read_safetensors(lora_dir / LORA_WEIGHT_NAME)
    from diffusers.utils import convert_unet_state_dict_to_peft

    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in tensors.items()})
    kohya = convert_state_dict_to_kohya(peft)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # trained alpha was 4


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (["lora_unet_a.lora_down.weight", "lora_te_b.alpha"], "kohya"),
        (["unet.a.to_q.lora_A.weight"], "diffusers"),
        (["unet.a.to_q.lora.down.weight"], "diffusers"),
        (["text_encoder.a.q_proj.lora_linear_layer.up.weight"], "diffusers"),
    ],
)
def test_detect_format(keys, fmt):
    assert detect_format(keys) == fmt


def test_detect_format_rejects_non_lora_and_mixed():
    with pytest.raises(AdapterError) as e:
        detect_format(["model.diffusion_model.input_blocks.0.0.weight"])
    assert "not a LoRA adapter" in one_line(e)
    with pytest.raises(AdapterError) as e:
        detect_format(["lora_unet_a.alpha", "unet.x.lora_A.weight"])
    assert "mixes" in one_line(e)


def test_all_diffusers_spellings_parse_to_the_same_module():
    t = torch.zeros(2, 3)
    spellings = [
        {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": t,
         "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": t.T},
        {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight": t,
         "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight": t.T},
        {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": t,
         "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": t.T},
    ]  # fmt: skip
    for state in spellings:
        a = parse_diffusers_state(state)
        assert list(a.modules["unet"]) == ["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    te = parse_diffusers_state(
        {
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": t,
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": t.T,
        }  # fmt: skip
    )
    # transformers 5 flattened CLIPTextModel; files use the classic text_model. path
    assert list(te.modules["text_encoder"]) == ["text_model.encoder.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize(
    "key, kind",
    [
        ("unet.a.to_q.dora_scale", "DoRA"),
        ("lora_unet_a_to_q.hada_w1_a", "LyCORIS"),
    ],
)
def test_unsupported_adapter_kinds_are_named(tmp_path, key, kind):
    save_file({key: torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterError) as e:
        read_lora(tmp_path / "x.safetensors")
    assert kind in one_line(e)


def test_kohya_names_split_back_by_rule_on_the_tiny_model(tiny_sd):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    for table in (model_module_table(unet), model_module_table(te, te=True)):
        wrong = {k: v for k, v in table.items() if kohya_name_to_module(k) != v}
        assert not wrong


def test_kohya_names_split_back_by_rule_on_sd15_unet():
    """Every module of a full SD1.5 UNet (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    table = model_module_table(unet)
    assert len(table) > 500
    assert {k: v for k, v in table.items() if kohya_name_to_module(k) != v} == {}


# -- files: missing, damaged, pickled ---------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(AdapterError) as e:
        read_lora(tmp_path / "nope.safetensors")
    msg = one_line(e)
    assert "not found" in msg and "nope.safetensors" in msg


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_corrupt_safetensors_is_one_line(lora_dir, tmp_path, damage):
    data = (lora_dir / LORA_WEIGHT_NAME).read_bytes()
    bad = tmp_path / "bad.safetensors"
    if damage == "header":
        bad.write_bytes(data[:8] + b"{not json" + data[17:])
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(AdapterError) as e:
        read_lora(bad)
    msg = one_line(e)
    assert "not a readable safetensors file" in msg and str(bad) in msg


def test_pickle_refused_unless_allowed(lora_dir, tmp_path):
    tensors, _ = read_safetensors(lora_dir / LORA_WEIGHT_NAME)
    pt = tmp_path / "lora.bin"
    torch.save(tensors, pt)
    with pytest.raises(AdapterError) as e:
        read_lora(pt)
    assert "--allow-pickle" in one_line(e)
    a = read_lora(pt, allow_pickle=True)
    assert a.num_modules == 32
    assert {m.alpha for _, _, m in a.items()} == {8}  # no header in a pickle: alpha defaults to rank


def test_folder_with_several_files_asks_for_the_file(tmp_path, lora_dir):
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes((lora_dir / LORA_WEIGHT_NAME).read_bytes())
    with pytest.raises(AdapterError) as e:
        read_lora(tmp_path)
    assert "2 .safetensors files" in one_line(e)


def test_convert_to_folder_uses_default_names_and_refuses_bad_targets(lora_dir, tmp_path):
    out = convert_lora_file(lora_dir, tmp_path, "kohya")
    assert out == tmp_path / KOHYA_WEIGHT_NAME
    with pytest.raises(UsageError):
        convert_lora_file(lora_dir, tmp_path / "x.ckpt", "kohya")
    with pytest.raises(UsageError):
        convert_lora_file(out, out, "kohya")
    with pytest.raises(UsageError):
        convert_lora_file(lora_dir, tmp_path / "y.safetensors", "lycoris")


def test_training_metadata_becomes_ss_keys(tmp_path):
    a = _adapter({"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 4})
    a.metadata = {"loracraft.base_model": "toy-base", "loracraft.resolution": "32", "loracraft.max_steps": "200",
                  "loracraft.tag_frequency": json.dumps({"style": {"lcstyle": 8}})}  # fmt: skip
    _, h = read_safetensors(write_lora(a, tmp_path / "k.safetensors", to="kohya"))
    assert h["ss_sd_model_name"] == "toy-base"
    assert h["ss_resolution"] == "(32, 32)"
    assert h["ss_max_train_steps"] == "200"
    assert json.loads(h["ss_tag_frequency"]) == {"style": {"lcstyle": 8}}
