"""The diffusers / PEFT layout: ``unet.<module>.lora_A.weight`` keys, scale in ``lora_adapter_metadata``.

diffusers and PEFT spell the same weights several ways (``lora_A``/``lora_B``, ``lora.down``/``lora.up``,
``lora_linear_layer``, the old ``to_q_lora`` attention processors); all parse to one module. The scale
``alpha / rank`` lives in the ``lora_adapter_metadata`` header as a ``LoraConfig`` per component
(``lora_alpha``, ``alpha_pattern``, ...); without it diffusers assumes ``alpha = rank``. Files are
written in PEFT's spelling only (see :func:`save_diffusers_lora` for why).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats.checks import check_lora_config, check_module, check_tensor, unsupported_key
from loracraft.infer.formats.files import write_safetensors
from loracraft.infer.formats.model import COMPONENTS, LoraAdapter, LoraModule, most_common

#: diffusers' key for the per-component LoraConfig (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: Our header key recording the base UNet's block layout (what kohya's SGM names depend on).
UNET_LAYOUT_KEY = "loracraft.unet_layout"

_DIFFUSERS_KEY_PATTERNS = [
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.weight$"), {"A": "down", "B": "up"}),
    (re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$"), {"A": "down", "B": "up"}),
    (re.compile(r"^(?P<mod>.+)\.lora\.(?P<ab>down|up)\.weight$"), None),
    (re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<ab>down|up)\.weight$"), None),
]
_OLD_DIFFUSERS = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ab>down|up)\.weight$"
)
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "time_embedding",
    "add_embedding",
)
_TE_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")


def split_component(key: str) -> tuple[str, str]:
    """(``unet``/``text_encoder``/``text_encoder_2`` or ``""``, the key without it)."""
    first, _, rest = key.partition(".")
    if first in COMPONENTS:
        return first, rest
    key = key.removeprefix("base_model.model.")
    root = key.split(".", 1)[0]
    if root in _UNET_ROOTS:
        return "unet", key
    if root in _TE_ROOTS:
        return "text_encoder", key
    return "", key


def parse_diffusers_key(rest: str, component: str) -> tuple[str, str] | None:
    """``(module path, "down"|"up"|"alpha"|"magnitude")`` for one key without its component prefix."""
    if rest.endswith(".alpha"):
        return rest[: -len(".alpha")], "alpha"
    bare = rest.removesuffix(".weight")
    if bare.endswith(".lora_magnitude_vector"):
        return bare[: -len(".lora_magnitude_vector")], "magnitude"
    for pattern, ab_map in _DIFFUSERS_KEY_PATTERNS:
        m = pattern.match(rest)
        if m:
            ab = m["ab"]
            return m["mod"], ab_map[ab] if ab_map else ab
    m = _OLD_DIFFUSERS.match(rest)
    if m:
        proj = m["proj"]
        if component.startswith("text_encoder"):
            proj = _OLD_TE_PROJ[proj]
        elif proj == "to_out":
            proj = "to_out.0"
        return f"{m['parent']}.{proj}", m["ab"]
    return None


def canonical_te_path(path: str) -> str:
    """kohya and diffusers<->transformers-4 files name CLIP layers ``text_model.encoder...``;
    transformers 5 flattened CLIPTextModel (no ``.text_model``), so both spellings arrive here."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def config_module_params(config: dict, module: str) -> tuple[int | None, float | None]:
    """Rank and alpha a ``LoraConfig`` dict assigns to ``module`` (PEFT's own pattern rules)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.get("r"))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha"))
    return r, alpha


def effective_alpha(config: dict, module: str, rank: int) -> float:
    """Alpha such that ``alpha / rank`` is the scale PEFT applies to this module."""
    _, alpha = config_module_params(config, module)
    if alpha is None:
        return rank
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r) (Kalajdzievski 2023); express it as alpha' / r.
        return alpha * math.sqrt(rank)
    return alpha


def parse_lora_adapter_metadata(header: dict[str, str], where: str = "adapter") -> dict[str, dict]:
    """Split diffusers' ``lora_adapter_metadata`` JSON into ``{component: LoraConfig dict}``."""
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterError(
            f"header {LORA_ADAPTER_METADATA_KEY} is not JSON ({e.msg} at character {e.pos}), {where}, "
            "re-export the adapter (diffusers writes it as a JSON object)"
        ) from e
    if not isinstance(flat, dict):
        raise AdapterError(
            f"header {LORA_ADAPTER_METADATA_KEY} is a JSON {type(flat).__name__}, not an object, {where}, "
            're-export the adapter (diffusers writes {"unet.r": ..., ...})'
        )
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component in COMPONENTS and name:
            out.setdefault(component, {})[name] = value
    for component, config in out.items():
        check_lora_config(config, component, where)
    return out


def parse_diffusers_state(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None, where: str = "state dict"
) -> LoraAdapter:
    """Parse a diffusers/PEFT LoRA state dict (any of diffusers' key spellings)."""
    header = dict(header or {})
    configs = parse_lora_adapter_metadata(header, where)
    header.pop(LORA_ADAPTER_METADATA_KEY, None)
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        err = unsupported_key(key, where)
        if err:
            raise err
        component, rest = split_component(key)
        parsed = parse_diffusers_key(rest, component) if component else None
        if parsed is None:
            raise AdapterError(
                f"unrecognised LoRA key {key!r}, {where}, expected unet./text_encoder. keys ending in "
                "lora_A/lora_B.weight or lora.down/up.weight (or a kohya lora_unet_ file)"
            )
        module, kind = parsed
        check_tensor(key, value, kind, where)
        if component.startswith("text_encoder"):
            module = canonical_te_path(module)
        slot = parts.setdefault(component, {}).setdefault(module, {})
        if kind in slot:
            raise AdapterError(
                f"LoRA module {component}.{module} has two {kind} weights (key {key!r}), {where}, re-export it"
            )
        slot[kind] = value
    modules: dict[str, dict[str, LoraModule]] = {}
    for component, mods in parts.items():
        config = configs.get(component, {})
        for module, p in mods.items():
            if "down" not in p or "up" not in p:
                missing = "up" if "down" in p else "down"
                raise AdapterError(
                    f"LoRA module {component}.{module} has no {missing} weight, {where}, re-export it"
                )
            check_module(f"{component}.{module}", p["down"], p["up"], where)
            rank = int(p["down"].shape[0])
            if "alpha" in p:
                alpha = alpha_value(p["alpha"])
            else:
                lookup = (
                    module.removeprefix("text_model.") if component.startswith("text_encoder") else module
                )
                alpha = effective_alpha(config, lookup, rank) if config else rank
            magnitude = p.get("magnitude")
            if magnitude is not None and tuple(magnitude.shape) != peft_magnitude_shape(p["up"]):
                raise AdapterError(
                    f"DoRA magnitude of {component}.{module} has shape {list(magnitude.shape)}, not "
                    f"{list(peft_magnitude_shape(p['up']))} (one per output row), {where}, re-export it"
                )
            modules.setdefault(component, {})[module] = LoraModule(p["down"], p["up"], alpha, magnitude)
        check_dora_uniform(modules.get(component, {}), component, where)
    return LoraAdapter(modules, configs=configs, metadata=header, source_format="diffusers")


def peft_magnitude_shape(up: torch.Tensor) -> tuple[int, ...]:
    """PEFT's ``lora_magnitude_vector`` shape: ``[out]`` for a linear layer, ``[1, out, 1, 1]`` for a conv
    (peft ``_DoraConvNdLayer.get_weight_norm`` keeps the reduced dims and swaps the first two)."""
    out = int(up.shape[0])
    return (out,) if up.dim() == 2 else (1, out, *[1] * (up.dim() - 2))


def alpha_value(t: torch.Tensor) -> float:
    """A stored alpha as a Python number (an int when it is whole, as configs write it)."""
    v = float(t.detach().to(torch.float64).reshape(-1)[0].item())
    return int(v) if v.is_integer() else v


def check_dora_uniform(mods: dict[str, LoraModule], component: str, where: str) -> None:
    """PEFT's ``use_dora`` is per config, so a component is all DoRA or not at all."""
    with_mag = [name for name, m in mods.items() if m.magnitude is not None]
    if with_mag and len(with_mag) != len(mods):
        missing = next(name for name, m in mods.items() if m.magnitude is None)
        raise AdapterError(
            f"adapter mixes DoRA and plain LoRA modules in {component} (e.g. {missing} has no magnitude), "
            f"{where}, re-export it"
        )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def build_lora_config(modules: dict[str, LoraModule], paths: dict[str, str] | None = None) -> dict:
    """A minimal ``LoraConfig`` dict reproducing every module's rank and alpha exactly.

    Args:
        modules: ``{module path: LoraModule}`` of one component.
        paths: optional renaming of module paths to the names the target model uses.
    """
    paths = paths or {}
    named = {paths.get(k, k): m for k, m in modules.items()}
    r = most_common(m.rank for m in named.values())
    alpha = most_common(m.alpha for m in named.values())
    return {
        "r": int(r),
        "lora_alpha": alpha,
        # "^" anchors the pattern at the start of the module name (peft#2419, as diffusers does).
        "rank_pattern": {f"^{k}": m.rank for k, m in sorted(named.items()) if m.rank != r},
        "alpha_pattern": {f"^{k}": m.alpha for k, m in sorted(named.items()) if m.alpha != alpha},
        "target_modules": sorted(named),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": any(m.magnitude is not None for m in named.values()),
        "lora_bias": False,
        "init_lora_weights": True,
    }


def config_describes(config: dict, modules: dict[str, LoraModule], te: bool = False) -> bool:
    """True if ``config`` assigns every module exactly its rank and alpha (so it may be kept)."""
    if not config or bool(config.get("use_dora")) != any(m.magnitude is not None for m in modules.values()):
        return False
    for path, mod in modules.items():
        lookup = path.removeprefix("text_model.") if te else path
        r, _ = config_module_params(config, lookup)
        if r != mod.rank or effective_alpha(config, lookup, mod.rank) != mod.alpha:
            return False
    return True


def component_config(adapter: LoraAdapter, component: str) -> dict:
    """The component's stored config if it still describes the weights, else a rebuilt one."""
    mods = adapter.modules[component]
    stored = adapter.configs.get(component)
    if stored and config_describes(stored, mods, te=component.startswith("text_encoder")):
        return stored
    return build_lora_config(mods)


def jsonable_lora_config(config: dict) -> dict:
    """LoraConfig.to_dict() holds sets and enums; safetensors metadata must be JSON strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def adapter_metadata_json(configs: dict[str, dict]) -> str:
    """``{component: config}`` as diffusers' flat ``lora_adapter_metadata`` JSON (``unet.r``, ...)."""
    flat = {f"{c}.{k}": v for c, config in configs.items() for k, v in jsonable_lora_config(config).items()}
    return json.dumps(flat, indent=2, sort_keys=True)


def _peft_key(component: str, module: str, kind: str) -> str:
    """PEFT's spelling, as ``get_peft_model_state_dict`` names the parameters (adapter name removed)."""
    if kind == "magnitude":
        return f"{component}.{module}.lora_magnitude_vector"
    return f"{component}.{module}.lora_{'A' if kind == 'down' else 'B'}.weight"


def to_diffusers_state(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a diffusers file that plain ``pipe.load_lora_weights`` reads with its alpha.

    Every key uses PEFT's spelling (``unet.<module>.lora_A.weight``); see :func:`save_diffusers_lora`
    for why a single spelling matters.
    """
    tensors: dict[str, torch.Tensor] = {}
    for component, mods in adapter.modules.items():
        for path, mod in mods.items():
            tensors[_peft_key(component, path, "down")] = mod.down
            tensors[_peft_key(component, path, "up")] = mod.up
            if mod.magnitude is not None:
                tensors[_peft_key(component, path, "magnitude")] = mod.magnitude
    metadata = {"format": "pt", **{k: v for k, v in adapter.metadata.items() if k != "format"}}
    metadata[LORA_ADAPTER_METADATA_KEY] = adapter_metadata_json(
        {c: component_config(adapter, c) for c in adapter.modules}
    )
    return tensors, metadata


def _peft_spelling(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parsed = parse_diffusers_key(key, component)
        if parsed is None or parsed[1] == "alpha":
            raise AdapterError(
                f"unrecognised LoRA key {key!r}, {component} state, pass a PEFT/diffusers state dict"
            )
        module, kind = parsed
        if component.startswith("text_encoder"):
            module = canonical_te_path(module)
        out[_peft_key(component, module, kind)] = value
    return out


def unet_layout(unet_config) -> dict:
    """What kohya's SDXL (SGM) module names depend on: the UNet's block types and ``layers_per_block``.

    ``unet_config`` is a diffusers ``UNet2DConditionModel.config`` (or a dict of it).
    """
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    return {
        "layers_per_block": get("layers_per_block"),
        "down_block_types": list(get("down_block_types") or []),
        "up_block_types": list(get("up_block_types") or []),
    }


def save_diffusers_lora(
    path: str | Path,
    unet_state: dict[str, torch.Tensor],
    unet_lora_config: dict,
    extra_metadata: dict[str, str] | None = None,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    text_encoder_lora_config: dict | None = None,
    text_encoder_2_state: dict[str, torch.Tensor] | None = None,
    text_encoder_2_lora_config: dict | None = None,
    unet_config=None,
) -> Path:
    """Write an adapter that plain ``pipe.load_lora_weights(dir)`` loads with the trained alpha.

    Keys are written in one spelling, PEFT's (``unet.<module>.lora_A.weight``), whatever the
    input used. ``convert_state_dict_to_diffusers`` renames only attention projections
    (``to_q.lora.down``) and leaves every other module ``lora_A``, while diffusers' loader
    converts a file only if its *first* key lacks ``lora_A``: an adapter on attention plus
    ``proj_in``/``ff`` (``lora.targets: transformer``) then loads with its attention LoRAs
    silently dropped (measured on the tiny model: max pixel difference 31 against 0 for the
    same weights in one spelling).

    Args:
        path: target file (usually ``<dir>/pytorch_lora_weights.safetensors``).
        unet_state: UNet LoRA state dict, no ``unet.`` prefix, in PEFT naming or diffusers naming
            (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))``).
        unet_lora_config: ``LoraConfig.to_dict()``; stored under ``lora_adapter_metadata``
            as ``unet.<key>`` exactly like ``StableDiffusionPipeline.save_lora_weights``.
        extra_metadata: training parameters (strings) merged into the safetensors header.
        text_encoder_state: likewise for the text encoder (keys get the classic ``text_model.``
            path, which diffusers maps onto both old and flattened CLIP classes).
        text_encoder_lora_config: its ``LoraConfig.to_dict()``.
        text_encoder_2_state: SDXL's second text encoder, saved under ``text_encoder_2.`` with its
            config as ``text_encoder_2.<key>`` (``StableDiffusionXLPipeline.save_lora_weights``'s layout).
        text_encoder_2_lora_config: its ``LoraConfig.to_dict()``.
        unet_config: the base UNet's config; its block layout is recorded under
            :data:`UNET_LAYOUT_KEY` so ``convert --to kohya`` names SDXL blocks as that base numbers them.
    """
    tensors = _peft_spelling(unet_state, "unet")
    configs = {"unet": unet_lora_config}
    for component, state, config in (
        ("text_encoder", text_encoder_state, text_encoder_lora_config),
        ("text_encoder_2", text_encoder_2_state, text_encoder_2_lora_config),
    ):
        if state:
            tensors.update(_peft_spelling(state, component))
            if config:
                configs[component] = config
    metadata = {"format": "pt", **(extra_metadata or {})}
    metadata[LORA_ADAPTER_METADATA_KEY] = adapter_metadata_json(configs)
    if unet_config is not None:
        metadata[UNET_LAYOUT_KEY] = json.dumps(unet_layout(unet_config), sort_keys=True)
    return write_safetensors(path, tensors, metadata)
