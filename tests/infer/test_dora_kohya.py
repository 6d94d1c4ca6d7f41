"""DoRA in the kohya/LyCORIS layout: ``dora_scale`` shaped ``[out, 1, ...]`` (LyCORIS ``wd_on_output``).

The merged weight is computed here from the documented formula (LyCORIS ``lycoris/modules/locon.py``,
``apply_weight_decompose`` with ``wd_on_output=True``), independently of our code and of peft::

    W' = (W + s * up @ down) * dora_scale / ||W + s * up @ down||_row        s = alpha / rank

and compared with peft's own merge of the same DoRA adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from loracraft.infer.formats import (
    LORA_WEIGHT_NAME,
    convert_lora_file,
    read_lora,
    read_safetensors,
    save_diffusers_lora,
)

TARGETS = ["to_q", "to_v", "proj_in", "conv1", "ff.net.2"]  # linear, 1x1 conv and 3x3 conv layers


@pytest.fixture(scope="module")
def dora(tiny_sd, tmp_path_factory):
    """A random DoRA adapter (peft) on the tiny SD UNet: (file, base UNet, peft-merged UNet)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet = copy.deepcopy(base)
    config = LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_magnitude_vector" in name:  # move the magnitudes away from ||W + s*BA|| at init
            p.data = p.data * (0.5 + torch.rand(p.shape, generator=g))
    path = tmp_path_factory.mktemp("dora") / LORA_WEIGHT_NAME
    save_diffusers_lora(path, get_peft_model_state_dict(unet), config.to_dict())
    merged = copy.deepcopy(unet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    return path, base, merged


def lycoris_merge(
    w: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float, dora_scale: torch.Tensor
):
    """The documented formula, written out: merged weight, normalised per output row, times dora_scale."""
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    merged = w + (alpha / down.shape[0]) * delta
    row_norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    return merged * dora_scale / row_norm


def test_kohya_dora_file_applies_to_peft_merged_weights(dora, tmp_path):
    path, base, merged = dora
    kohya = convert_lora_file(path, tmp_path / "k.safetensors", to="kohya")
    tensors, header = read_safetensors(kohya)
    scales = {k[: -len(".dora_scale")]: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    base_modules, merged_modules = dict(base.named_modules()), dict(merged.named_modules())
    adapted = [
        n
        for n, m in base_modules.items()
        if n and any(n.endswith(t) for t in TARGETS) and hasattr(m, "weight")
    ]
    assert len(scales) == len(adapted) > 10 and header["ss_network_module"] == "lycoris.kohya"
    for path_ in adapted:
        name = "lora_unet_" + path_.replace(".", "_")
        w = base_modules[path_].weight.detach()
        scale = scales[name]
        assert scale.shape == (w.shape[0], *[1] * (w.dim() - 1))  # output axis: [out, 1] / [out, 1, 1, 1]
        ours = lycoris_merge(
            w,
            tensors[f"{name}.lora_down.weight"],
            tensors[f"{name}.lora_up.weight"],
            float(tensors[f"{name}.alpha"]),
            scale,
        )
        peft_weight = merged_modules[path_].get_base_layer().weight.detach()
        assert (peft_weight - w).abs().max() > 1e-3, path_  # DoRA changed this layer
        torch.testing.assert_close(ours, peft_weight, rtol=1e-5, atol=1e-6)


def test_kohya_dora_round_trips_to_diffusers(dora, tmp_path):
    path = dora[0]
    kohya = convert_lora_file(path, tmp_path / "k.safetensors", to="kohya")
    back = convert_lora_file(kohya, tmp_path / "back.safetensors", to="diffusers")
    assert read_lora(back).tensors_sha256() == read_lora(path).tensors_sha256()
    a, b = read_safetensors(path)[0], read_safetensors(back)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_input_axis_dora_scale_is_refused(dora, tmp_path):
    """A1111 / older LyCORIS DoRA ([1, in]) normalises columns: no peft form, refused in one line."""
    from safetensors.torch import save_file

    from loracraft.infer.errors import AdapterError

    tensors, header = read_safetensors(convert_lora_file(dora[0], tmp_path / "k.safetensors", to="kohya"))
    key = next(k for k, v in tensors.items() if k.endswith(".dora_scale") and v.dim() == 2)
    down = tensors[key.replace("dora_scale", "lora_down.weight")]
    tensors[key] = torch.ones(1, down.shape[1])
    save_file(tensors, str(tmp_path / "input_axis.safetensors"), metadata=header)
    with pytest.raises(AdapterError, match="input-axis DoRA") as e:
        read_lora(tmp_path / "input_axis.safetensors")
    assert "\n" not in str(e.value) and key in str(e.value)
