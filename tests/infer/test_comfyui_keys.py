"""Every key of our kohya files is one ComfyUI maps onto a model weight, and every key is consumed.

The accepted names are computed here from ComfyUI's documented rules (``comfy/lora.py``
``model_lora_keys_unet`` / ``model_lora_keys_clip`` / ``load_lora``, ``comfy/utils.py``
``unet_to_diffusers``), independently of our exporter, from the tiny models' own module lists:

* UNet: ``lora_unet_<name with . -> _>`` where name is either the original (SGM/LDM) weight path of a
  UNet layer or its diffusers path; the LDM paths come from ``tests/fixtures/ldm_checkpoint.py``
  (the inverse of diffusers' single-file converter, checked by the single-file tests), plus SDXL's
  ``label_emb.0.{0,2}`` = ``add_embedding.linear_{1,2}``. kohya (and we) write diffusers paths for
  SD1 and SGM paths for SDXL, so the test also asserts that style.
* Text encoders: ``lora_te_text_model_encoder_layers_<N>_<mlp_fc1|mlp_fc2|self_attn_{q,k,v,out}_proj>``
  for the SD1 CLIP; ``lora_te1_`` / ``lora_te2_`` for SDXL's two.
* Per name ``.lora_up.weight`` + ``.lora_down.weight`` (both, or ComfyUI leaves the key unloaded),
  optionally ``.alpha`` and ``.dora_scale``.
"""

from __future__ import annotations

import pytest
import torch

from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    LoraAdapter,
    LoraModule,
    convert_lora_file,
    detect_format,
    read_safetensors,
    write_lora,
)

CLIP_LAYERS = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)
SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")


def _flat(path: str) -> str:
    return path.replace(".", "_")


def comfyui_names(pipe, family: str) -> set[str]:
    """The kohya module names ComfyUI maps for this model (SD1: diffusers UNet style, SDXL: SGM style)."""
    import ldm_checkpoint  # tests/fixtures

    unet = pipe.unet
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("add_embedding.")}
    config = dict(unet.config)
    pairs = {k: next(iter(ldm_checkpoint.unet_to_ldm({k: v}, config))) for k, v in state.items()}
    if family == "sdxl":
        pairs.update({f"add_embedding.linear_{i}.weight": f"model.diffusion_model.label_emb.0.{2 * i - 2}.weight"
                      for i in (1, 2)})  # fmt: skip
    names = set()
    for diffusers_key, ldm_key in pairs.items():
        if diffusers_key.endswith(".weight"):
            sgm = ldm_key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            names.add(
                "lora_unet_" + _flat(sgm if family == "sdxl" else diffusers_key.removesuffix(".weight"))
            )
    prefixes = (
        {"text_encoder": "lora_te_"}
        if family == "sd"
        else {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    )
    for component, prefix in prefixes.items():
        layers = getattr(pipe, component).config.num_hidden_layers
        names |= {
            f"{prefix}text_model_encoder_layers_{b}_{_flat(m)}" for b in range(layers) for m in CLIP_LAYERS
        }
    return names


def assert_comfyui_loads_every_key(file, pipe, family: str) -> int:
    tensors, _ = read_safetensors(file)
    accepted = comfyui_names(pipe, family)
    by_name: dict[str, set[str]] = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        assert suffix in SUFFIXES, key
        assert name in accepted, f"ComfyUI has no model weight for {key}"
        by_name.setdefault(name, set()).add(suffix)
    for name, suffixes in by_name.items():  # load_lora consumes a name only through its up/down pair
        assert {"lora_up.weight", "lora_down.weight"} <= suffixes, name
    return len(by_name)


def every_layer_adapter(pipe, family: str) -> LoraAdapter:
    """A rank-2 adapter on every Linear/Conv of the UNet and every CLIP attention/MLP projection."""
    g = torch.Generator().manual_seed(0)
    modules = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        mods = {}
        for name, m in model.named_modules():
            if component != "unet":
                if not name.endswith(CLIP_LAYERS):
                    continue
                name = name if name.startswith("text_model.") else f"text_model.{name}"
            if isinstance(m, torch.nn.Linear):
                down, up = (
                    torch.randn(2, m.in_features, generator=g),
                    torch.randn(m.out_features, 2, generator=g),
                )
            elif isinstance(m, torch.nn.Conv2d):
                down = torch.randn(2, m.in_channels, *m.kernel_size, generator=g)
                up = torch.randn(m.out_channels, 2, 1, 1, generator=g)
            else:
                continue
            mods[name] = LoraModule(down, up, 1.5)
        modules[component] = mods
    return LoraAdapter(modules, metadata={FAMILY_METADATA_KEY: family})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_convert_output_has_only_keys_comfyui_maps(family, tiny_sd, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base = tiny_sd if family == "sd" else tiny_sdxl
    pipe = (StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline).from_pretrained(
        str(base)
    )
    adapter = every_layer_adapter(pipe, family)
    src = write_lora(adapter, tmp_path / "d.safetensors")
    out = convert_lora_file(src, tmp_path / "k.safetensors", to="kohya", base=base)
    assert assert_comfyui_loads_every_key(out, pipe, family) == adapter.num_modules


def test_run_folder_kohya_file_has_only_keys_comfyui_maps(cli_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    kohya = [f for f in cli_run.glob("*.safetensors") if detect_format(read_safetensors(f)[0]) == "kohya"]
    assert len(kohya) == 1, sorted(p.name for p in cli_run.iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    assert assert_comfyui_loads_every_key(kohya[0], pipe, "sd") > 0
