"""The kohya / A1111 / ComfyUI layout: ``lora_unet_<module with _>.lora_down.weight`` + ``.alpha``.

``lora_te_`` names the SD1/SD2 text encoder, ``lora_te1_``/``lora_te2_`` SDXL's two; SD1/SD2 UNet
modules keep their diffusers path (underscored), SDXL's use kohya's SGM names (below). Each
module carries its own ``alpha`` (scale ``alpha / rank``); training facts go to ``ss_*`` header keys
(kohya-ss/sd-scripts ``train_network.py`` names). Our exporter exists because diffusers'
``convert_state_dict_to_kohya`` writes ``alpha = rank`` (losing the trained alpha) and names the SD1
text encoder ``lora_te1_``.

DoRA (``.dora_scale``): written as LyCORIS does with ``wd_on_output=True`` (LyCORIS
``lycoris/modules/locon.py``, ``apply_weight_decompose``): ``dora_scale`` is PEFT's per-output-row
magnitude ``m`` shaped ``[out, 1]`` (``[out, 1, 1, 1]`` for a conv), and the merged weight is::

    W' = (W + s * up @ down) * m / ||W + s * up @ down||_row        s = alpha / rank

which is PEFT's own merge. ComfyUI (``comfy/weight_adapter/base.py`` ``weight_decompose``) tells the
axis from ``dora_scale.shape[0] == out`` and applies the same form, except that up to at least
v0.3.77 its output-axis branch divides by the norm of ``W`` instead of ``W + s * up @ down`` (open
pull request Comfy-Org/ComfyUI#15458); a 1-d ``dora_scale`` broadcasts wrongly there
(Comfy-Org/ComfyUI#12938), hence ``[out, 1]``. A1111's built-in Lora extension
(``extensions-builtin/Lora/network.py`` ``apply_weight_decompose``) only decomposes along the input
axis (``[1, in]``, kohya's older LyCORIS default), which has no PEFT equivalent: such files are refused
on import, and a DoRA kohya file is for LyCORIS/ComfyUI, not A1111.

SDXL names: kohya trains SDXL on its own copy of Stability's UNet (the SGM layout), so its files name modules
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the same module is
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` in diffusers. The block numbers depend
on the UNet's ``layers_per_block`` (SDXL base: 2): a name written for one layout lands on another
layer, or nowhere, in a UNet with another. So the layout an adapter was trained with is recorded in
its header (``loracraft.unet_layout``) and a non-standard one without that record is refused.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from types import SimpleNamespace

import torch

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats.checks import check_module, check_tensor
from loracraft.infer.formats.diffusers import (
    LORA_ADAPTER_METADATA_KEY,
    UNET_LAYOUT_KEY,
    adapter_metadata_json,
    alpha_value,
    canonical_te_path,
    check_dora_uniform,
    config_describes,
    parse_diffusers_key,
    parse_lora_adapter_metadata,
    peft_magnitude_shape,
    split_component,
)
from loracraft.infer.formats.model import (
    FAMILY_METADATA_KEY,
    LoraAdapter,
    LoraModule,
    adapter_family,
    most_common,
)

#: Default file name ``convert --to kohya`` uses when the target is a folder.
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
#: Where a kohya file keeps the source ``LoraConfig``s. Not diffusers' own key: diffusers refuses a
#: kohya file holding both per-module alphas and ``lora_adapter_metadata``.
KOHYA_CONFIG_KEY = "loracraft_lora_adapter_metadata"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

#: Training facts the trainer may put in the diffusers header, mapped to kohya's ``ss_*`` keys
#: on export (kohya-ss/sd-scripts ``train_network.py`` names). Values are strings.
SS_METADATA_SOURCES = {
    "ss_sd_model_name": ("loracraft.base_model", "base_model", "model.base"),
    "ss_resolution": ("loracraft.resolution", "resolution", "data.resolution"),
    "ss_max_train_steps": ("loracraft.max_steps", "max_steps", "train.max_steps"),
    "ss_steps": ("loracraft.steps", "steps", "global_step"),
    "ss_learning_rate": ("loracraft.lr", "learning_rate", "train.lr"),
    "ss_seed": ("loracraft.seed", "seed", "train.seed"),
    "ss_tag_frequency": ("loracraft.tag_frequency", "tag_frequency"),
    "ss_dataset_dirs": ("loracraft.dataset", "dataset", "data.path"),
}
_SUFFIX_KIND = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
}

#: Module-name words that contain underscores, so ``lora_unet_down_blocks_0_..._to_out_0`` can
#: be split back into dots without the model at hand (longest match first).
_UNDERSCORE_WORDS = {
    # diffusers UNet2DConditionModel
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj",
    "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "norm_cross", "conv_act", "time_proj",
    "add_time_proj", "time_embed_act", "activation_fn",
    # transformers CLIPTextModel
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
}  # fmt: skip
_MAX_WORD_PARTS = max(w.count("_") + 1 for w in _UNDERSCORE_WORDS)


def kohya_name_to_module(flat: str) -> str:
    """``down_blocks_0_attentions_0_..._to_out_0`` -> ``down_blocks.0.attentions.0...to_out.0`` (by rule)."""
    parts = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for n in range(min(_MAX_WORD_PARTS, len(parts) - i), 0, -1):
            word = "_".join(parts[i : i + n])
            if n == 1 or word in _UNDERSCORE_WORDS:
                out.append(word)
                i += n
                break
    return ".".join(out)


def module_to_kohya_name(path: str) -> str:
    return path.replace(".", "_")


def model_module_table(model: torch.nn.Module, te: bool = False) -> dict[str, str]:
    """``{underscored name: dotted path}`` for every submodule (exact kohya name resolution)."""
    table = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        name = re.sub(r"\.base_layer$", "", name)
        dotted = canonical_te_path(name) if te else name
        table.setdefault(module_to_kohya_name(dotted), dotted)
    return table


def _component_flat(lora_name: str) -> tuple[str, str]:
    for prefix, component in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ):
        if lora_name.startswith(prefix):
            return component, lora_name[len(prefix) :]
    raise AssertionError(lora_name)  # detect_format guarantees a prefix


# --------------------------------------------------------------------------------------------
# SDXL: kohya's SGM UNet names
# --------------------------------------------------------------------------------------------
#: ``stabilityai/stable-diffusion-xl-base-1.0``'s UNet: what a kohya SDXL file without a layout record means.
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip

_SGM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d")
_DIFFUSERS_BLOCKS = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")


def kohya_module_paths(
    lora_names: list[str], layers_per_block: int = 2, where: str = "state dict"
) -> dict[str, tuple[str, str]]:
    """``{kohya module name: (component, diffusers module path)}``, by diffusers' public loader.

    ``StableDiffusionXLPipeline.lora_state_dict(state, unet_config=...)`` maps SGM block numbers
    (with the given ``layers_per_block``) and kohya's underscored names to diffusers keys; it is run
    on a probe of the names only (one small tensor each, traced back by identity), so the file's
    tensors and alphas stay ours.
    """
    from diffusers import StableDiffusionXLPipeline

    sgm = [n for n in lora_names if _SGM_BLOCKS.match(n)]
    mixed = [n for n in lora_names if _DIFFUSERS_BLOCKS.match(n)]
    if sgm and mixed:
        raise AdapterError(
            f"adapter mixes SGM (input_blocks/output_blocks) and diffusers (down_blocks/up_blocks) UNet names "
            f"(e.g. {sgm[0]} and {mixed[0]}), {where}, re-export it in one layout"
        )
    probe: dict[str, torch.Tensor] = {}
    origin: dict[int, str] = {}
    for name in lora_names:
        down = torch.zeros(1, 1)
        probe[f"{name}.lora_down.weight"] = down
        probe[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        origin[id(down)] = name
    config = SimpleNamespace(layers_per_block=layers_per_block)
    try:
        mapped, _ = StableDiffusionXLPipeline.lora_state_dict(probe, unet_config=config if sgm else None)
    except (ValueError, IndexError, KeyError) as e:
        raise AdapterError(
            f"cannot map kohya module names to diffusers ({e}), {where}, check it is an SD/SDXL LoRA"
        ) from e
    out: dict[str, tuple[str, str]] = {}
    for key, tensor in mapped.items():
        name = origin.get(id(tensor))
        if name is None:
            continue
        component, rest = split_component(key)
        parsed = parse_diffusers_key(rest, component)
        if not component or parsed is None:
            raise AdapterError(
                f"cannot map kohya module {name} (diffusers gives {key}), {where}, report this with the file"
            )
        path = parsed[0]
        flat = name.split("_", 2)[-1]
        # SGM names change on the way, diffusers-layout ones are only re-dotted.
        renamed = bool(sgm) and name.startswith("lora_unet_")
        if not renamed and path.replace(".", "_") != flat:
            # The public loader falls short here: diffusers' rules (_convert_unet_lora_key) do not know
            # every module name, e.g. SDXL's add_embedding becomes "add.embedding.linear" (lossy: it no
            # longer spells the kohya name; tests/infer/test_sdxl.py shows it). A diffusers-layout name
            # is only re-dotted, so split it by our word list instead.
            path = kohya_name_to_module(flat)
        out[name] = (component, path)
    lost = [n for n in lora_names if n not in out]
    if lost:
        raise AdapterError(
            f"diffusers has no module for kohya name {lost[0]}, {where}, check it is an SD/SDXL LoRA"
        )
    return out


def sgm_unet_names_to_diffusers(
    lora_names: list[str], layers_per_block: int = 2, where: str = "state dict"
) -> dict[str, str]:
    """``{kohya SGM UNet module name: diffusers UNet module path}``; empty when the names are not SGM."""
    names = [n for n in lora_names if n.startswith("lora_unet_")]
    if not any(_SGM_BLOCKS.match(n) for n in names):
        return {}
    return {n: path for n, (_, path) in kohya_module_paths(names, layers_per_block, where).items()}


_RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
_DIFFUSERS_UNET_PATH = re.compile(
    r"^(?P<block>down_blocks|up_blocks)\.(?P<i>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<j>\d+)\.(?P<rest>.+)$"
    r"|^mid_block\.(?P<mkind>resnets|attentions)\.(?P<mj>\d+)\.(?P<mrest>.+)$"
)


def diffusers_to_sgm_unet_name(path: str, layers_per_block: int = 2, where: str = "adapter") -> str:
    """A diffusers SDXL UNet module path in kohya's SGM layout (dots; the inverse of
    :func:`sgm_unet_names_to_diffusers`, which tests check on every module of an SDXL UNet).

    Block numbering: input block ``1 + i * (layers_per_block + 1) + j`` holds down block ``i``'s
    layer ``j`` (``.0`` resnet, ``.1`` attention), the block after its layers its downsampler
    (``.0.op``); output block ``i * (layers_per_block + 1) + j`` likewise (up blocks have one layer
    more), with the upsampler at ``.2``; the middle block is resnet, attention, resnet (0, 1, 2).
    """
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    m = _DIFFUSERS_UNET_PATH.match(path)
    if m is None:
        raise AdapterError(
            f"UNet module {path} has no name in kohya's SDXL (SGM) layout, {where}, "
            "keep the diffusers file or train attention/projection/resnet layers only"
        )
    step = layers_per_block + 1
    if m["mkind"]:
        kind, j, rest = m["mkind"], int(m["mj"]), m["mrest"]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        first, _, tail = rest.partition(".")
        return f"middle_block.{2 * j}.{_RESNET_TO_SGM.get(first, first)}{'.' + tail if tail else ''}"
    block, i, kind, j, rest = m["block"], int(m["i"]), m["kind"], int(m["j"]), m["rest"]
    limit = layers_per_block if block == "down_blocks" else step
    if kind in ("resnets", "attentions") and j >= limit:
        raise AdapterError(
            f"UNet module {path} does not exist with layers_per_block={layers_per_block}, {where}, "
            "pass --base MODEL (the base the adapter was trained on) so its layout is read from there"
        )
    if kind == "downsamplers":
        return f"input_blocks.{(i + 1) * step}.0.{'op' if rest == 'conv' else rest}"
    if kind == "upsamplers":
        return f"output_blocks.{i * step + layers_per_block}.2.{rest}"
    index = 1 + i * step + j if block == "down_blocks" else i * step + j
    prefix = "input_blocks" if block == "down_blocks" else "output_blocks"
    if kind == "attentions":
        return f"{prefix}.{index}.1.{rest}"
    first, _, tail = rest.partition(".")
    return f"{prefix}.{index}.0.{_RESNET_TO_SGM.get(first, first)}{'.' + tail if tail else ''}"


# --------------------------------------------------------------------------------------------
# Which layout an adapter was made for
# --------------------------------------------------------------------------------------------
def recorded_layers_per_block(metadata: dict[str, str], where: str = "adapter") -> int | None:
    """``layers_per_block`` from the header's :data:`UNET_LAYOUT_KEY`, or None when absent."""
    raw = metadata.get(UNET_LAYOUT_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw).get("layers_per_block")
    except (json.JSONDecodeError, AttributeError):
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterError(
            f"header {UNET_LAYOUT_KEY} is not a layout with a positive layers_per_block ({raw[:60]!r}), {where}, "
            "pass --base MODEL (the base the adapter was trained on) to read it from there"
        )
    return value


@lru_cache(maxsize=1)
def _sdxl_base_shapes() -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear/Conv layer of the SDXL base UNet (meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    shapes = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            shapes[name] = (mod.in_channels, mod.out_channels)
    return shapes


def fits_sdxl_base(adapter: LoraAdapter) -> str | None:
    """None if every UNet module exists in the SDXL base UNet with the same in/out size, else the first that does not."""
    shapes = _sdxl_base_shapes()
    for path, mod in adapter.modules.get("unet", {}).items():
        if shapes.get(path) != (int(mod.down.shape[1]), int(mod.up.shape[0])):
            return path
    return None


def sgm_layers_per_block(adapter: LoraAdapter, layers_per_block: int | None = None) -> int:
    """The ``layers_per_block`` to number an SDXL adapter's kohya names with.

    The caller's (read from ``--base``) wins, then the adapter's header record; without either the
    adapter must fit the SDXL base UNet (layers_per_block 2), otherwise the numbering would be a guess.
    """
    where = str(adapter.path or "adapter")
    if layers_per_block is not None:
        return layers_per_block
    recorded = recorded_layers_per_block(adapter.metadata, where)
    if recorded is not None:
        return recorded
    misfit = fits_sdxl_base(adapter)
    if misfit is None:
        return SDXL_BASE_UNET["layers_per_block"]
    raise AdapterError(
        f"the adapter's UNet block layout is unknown (no {UNET_LAYOUT_KEY} header and module {misfit} is not "
        f"the SDXL base's), {where}, pass --base MODEL (the base it was trained on) to number kohya's SDXL blocks"
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _magnitude(key: str, dora_scale: torch.Tensor, up: torch.Tensor, where: str) -> torch.Tensor:
    """PEFT's magnitude (one per output row) from an output-axis ``dora_scale`` (see the module doc)."""
    out = int(up.shape[0])
    if dora_scale.shape[0] == out and dora_scale.numel() == out and (out > 1 or dora_scale.dim() == up.dim()):
        return dora_scale.reshape(peft_magnitude_shape(up))
    raise AdapterError(
        f"dora_scale {key} has shape {list(dora_scale.shape)}, not [{out}, 1] (input-axis DoRA, A1111's and older "
        f"LyCORIS' default, has no PEFT form), {where}, re-train with LyCORIS wd_on_output=True or use the file in A1111"
    )


def parse_kohya_state(
    tensors: dict[str, torch.Tensor],
    header: dict[str, str] | None = None,
    module_names: dict[str, dict[str, str]] | None = None,
    where: str = "state dict",
    unet_layers_per_block: int = 2,
) -> LoraAdapter:
    """Parse a kohya/A1111 state dict; a module without ``.alpha`` gets alpha = rank (kohya's rule).

    Names are mapped by diffusers' public loader (:func:`kohya_module_paths`),
    SGM block numbers with the layout recorded in the header, else ``unet_layers_per_block`` (the
    base UNet's; SDXL's 2 when unknown). ``module_names`` (per component, ``{underscored name: dotted
    path}`` of the target model) overrides a rule-made path the model does not have.
    """
    header = dict(header or {})
    configs = parse_lora_adapter_metadata(
        {LORA_ADAPTER_METADATA_KEY: header.pop(KOHYA_CONFIG_KEY, "")}, where
    )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        lora_name, _, suffix = key.partition(".")
        kind = _SUFFIX_KIND.get(suffix)
        if kind is None:
            raise AdapterError(
                f"unrecognised kohya key {key!r}, {where}, expected <name>.lora_down.weight / .lora_up.weight / .alpha"
            )
        check_tensor(key, value, kind, where)
        parts.setdefault(lora_name, {})[kind] = value
    for lora_name, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_up" if "down" in p else "lora_down"
            raise AdapterError(f"kohya module {lora_name} has no {missing}.weight, {where}, re-export it")
        check_module(lora_name, p["down"], p["up"], where)
    layers = recorded_layers_per_block(header, where) or unet_layers_per_block
    paths = kohya_module_paths(list(parts), layers, where)
    modules: dict[str, dict[str, LoraModule]] = {}
    for lora_name, p in parts.items():
        component, path = paths[lora_name]
        table = (module_names or {}).get(component, {})
        flat = _component_flat(lora_name)[1]
        if table and path not in table.values() and flat in table:
            path = table[flat]
        if component.startswith("text_encoder"):
            path = canonical_te_path(path)
        rank = int(p["down"].shape[0])
        alpha = alpha_value(p["alpha"]) if "alpha" in p else rank
        magnitude = (
            _magnitude(f"{lora_name}.dora_scale", p["dora_scale"], p["up"], where)
            if "dora_scale" in p
            else None
        )
        modules.setdefault(component, {})[path] = LoraModule(p["down"], p["up"], alpha, magnitude)
    for component, mods in modules.items():
        check_dora_uniform(mods, component, where)
    return LoraAdapter(modules, configs=configs, metadata=header, source_format="kohya")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _alpha_tensor(alpha: float) -> torch.Tensor:
    # float32 is what kohya writes; use float64 only when float32 would round the value.
    t32 = torch.tensor(float(alpha), dtype=torch.float32)
    return t32 if float(t32.item()) == float(alpha) else torch.tensor(float(alpha), dtype=torch.float64)


def _kohya_prefixes(adapter: LoraAdapter) -> dict[str, str]:
    # kohya-ss/sd-scripts networks/lora.py: SD1/2 text encoder "lora_te_", SDXL "lora_te1_"/"lora_te2_".
    sdxl = adapter_family(adapter) == "sdxl"
    return {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }


def kohya_metadata(adapter: LoraAdapter) -> dict[str, str]:
    """``ss_*`` header of a kohya file: network shape plus the training facts we know."""
    keep = ("ss_", "sshs_", "modelspec.", UNET_LAYOUT_KEY, FAMILY_METADATA_KEY)
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(keep)}
    ranks = [m.rank for _, _, m in adapter.items()]
    alphas = [m.alpha for _, _, m in adapter.items()]
    if any(m.magnitude is not None for _, _, m in adapter.items()):
        # LyCORIS' own header for a DoRA LoRA (network_args as kohya stores them: strings).
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(most_common(ranks))
    meta["ss_network_alpha"] = str(most_common(alphas))
    meta.setdefault("ss_network_args", json.dumps({}))
    if adapter_family(adapter) == "sdxl":
        meta.setdefault("ss_base_model_version", "sdxl_base_v1-0")
    else:
        meta.setdefault("ss_base_model_version", "sd_v1")
    meta.setdefault("ss_v2", "False")
    for ss_key, sources in SS_METADATA_SOURCES.items():
        for src in sources:
            if src in adapter.metadata and ss_key not in meta:
                value = str(adapter.metadata[src])
                if ss_key == "ss_resolution" and value.isdigit():
                    value = f"({value}, {value})"  # kohya writes "(512, 512)"
                meta[ss_key] = value
                break
    meta.setdefault("ss_training_comment", f"converted from {adapter.source_format} by loracraft")
    return meta


def to_kohya_state(
    adapter: LoraAdapter, unet_layout: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya/A1111 file; each module carries its own ``alpha``.

    SDXL UNet modules get kohya's SGM names (``lora_unet_input_blocks_4_1_...``, what
    ``sdxl_train_network.py`` writes and A1111/ComfyUI/diffusers read), numbered with ``unet_layout``
    (the base UNet's, e.g. from ``--base``), else the layout recorded in the adapter's header, else
    the SDXL base's when the adapter fits it (:func:`sgm_layers_per_block`).
    SD1/SD2 keep the diffusers layout kohya itself uses for them. The source ``LoraConfig`` is kept
    under :data:`KOHYA_CONFIG_KEY` (kohya tools ignore unknown keys), so converting back restores it.
    """
    where = str(adapter.path or "adapter")
    prefixes = _kohya_prefixes(adapter)
    metadata = kohya_metadata(adapter)
    layers = None
    if adapter_family(adapter) == "sdxl" and adapter.modules.get("unet"):
        layers = sgm_layers_per_block(adapter, (unet_layout or {}).get("layers_per_block"))
        if unet_layout or UNET_LAYOUT_KEY not in metadata:
            metadata[UNET_LAYOUT_KEY] = json.dumps(
                unet_layout or {"layers_per_block": layers}, sort_keys=True
            )
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for component, mods in adapter.modules.items():
        for path, mod in mods.items():
            if component == "unet" and layers is not None:
                path = diffusers_to_sgm_unet_name(path, layers, where)
            name = prefixes[component] + module_to_kohya_name(path)
            tensors[f"{name}.lora_down.weight"] = mod.down
            tensors[f"{name}.lora_up.weight"] = mod.up
            tensors[f"{name}.alpha"] = _alpha_tensor(mod.alpha)
            if mod.magnitude is not None:
                # [out, 1, ...]: the output-axis orientation LyCORIS and ComfyUI recognise (module doc).
                tensors[f"{name}.dora_scale"] = mod.magnitude.reshape(-1, *[1] * (mod.up.dim() - 1))
        config = adapter.configs.get(component)
        if config and config_describes(config, mods, te=component.startswith("text_encoder")):
            configs[component] = config
    if configs:
        metadata[KOHYA_CONFIG_KEY] = adapter_metadata_json(configs)
    return tensors, metadata
