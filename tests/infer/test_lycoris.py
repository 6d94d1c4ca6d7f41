"""LoHa/LoKr files that cannot load are one-line AdapterErrors naming the key or module, and the
pipeline is left without a half-attached adapter."""

import pytest
import torch
from safetensors.torch import save_file

from loracraft.infer.errors import AdapterError

MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _loha(out: int = 32, inp: int = 32, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{MOD}.hada_w1_a": torch.randn(out, r, generator=g), f"{MOD}.hada_w1_b": torch.randn(r, inp, generator=g),
        f"{MOD}.hada_w2_a": torch.randn(out, r, generator=g), f"{MOD}.hada_w2_b": torch.randn(r, inp, generator=g),
        f"{MOD}.alpha": torch.tensor(2.0),
    }


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize(("tensors", "expected"), [
    ({**_loha(), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.ones(2, 2)},
     "LoHa/LoKr text-encoder modules are not supported"),
    ({**_loha(), f"{MOD}.hada_t1": torch.ones(2, 2, 3, 3)}, "LyCORIS weight 'hada_t1' is not supported"),
    ({k.replace("to_q", "to_zz"): v for k, v in _loha().items()}, "modules do not exist in the base (first: lora_unet_"),
    (_loha(inp=48), "LoHa/LoKr adapter does not fit the base"),
    ({k: v for k, v in _loha().items() if "hada_w2_b" not in k}, "has no hada_w2_b"),
])
def test_unloadable_lycoris_files_are_one_line_adapter_errors(pipe, tmp_path, tensors, expected):
    from loracraft.infer.adapters import load_adapter, loaded_adapters

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    torch.manual_seed(0)
    x, t, ehs = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, ehs).sample
    with pytest.raises(AdapterError) as e:
        load_adapter(pipe, path, name="bad")
    assert expected in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)
    assert "bad" not in (getattr(pipe.unet, "peft_config", None) or {}) and not loaded_adapters(pipe)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ehs).sample, before)


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_convert_of_a_loha_file_says_it_is_already_in_the_loadable_layout(tmp_path, to):
    from loracraft.infer.errors import UsageError
    from loracraft.infer.formats import convert_lora_file

    run = tmp_path / "run"
    run.mkdir()
    save_file(_loha(), str(run / "lycoris_weights.safetensors"))
    with pytest.raises(UsageError, match="already in the kohya/LyCORIS layout .*lycoris_weights.safetensors, use the"):
        convert_lora_file(run, tmp_path / "out.safetensors", to=to)  # the run folder resolves to its file
    assert not (tmp_path / "out.safetensors").exists()
