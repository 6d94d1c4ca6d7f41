"""LoRA file formats: diffusers/PEFT safetensors with metadata, and kohya/A1111 conversion.

Two layouts of the same numbers exist in the wild:

* **diffusers / PEFT** - ``unet.<module>.lora_A.weight`` (PEFT) or ``unet.<module>.lora.down.weight``
  (what ``convert_state_dict_to_diffusers`` writes), ``text_encoder.<module>...``; the scale
  ``alpha / rank`` lives in the ``lora_adapter_metadata`` header as a ``LoraConfig``
  (``lora_alpha``, ``alpha_pattern``, ...). Without it diffusers assumes ``alpha = rank``.
* **kohya / A1111** - ``lora_unet_<module with _>.lora_down.weight``, ``.lora_up.weight`` and a
  per-module scalar ``.alpha``; ``lora_te_`` for the SD1 text encoder, ``lora_te1_``/``lora_te2_``
  for SDXL; training facts in ``ss_*`` header keys.

Both are parsed into one neutral structure, :class:`LoraAdapter` (per module: down, up and the
effective alpha such that ``scale = alpha / rank``), and written back from it. The kohya
exporter is ours because diffusers' ``convert_state_dict_to_kohya`` writes ``alpha = rank``
(losing the trained alpha) and names the SD1 text encoder ``lora_te1_``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.io import atomic_path
from loracraft.infer.names import LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME  # noqa: E402, F401  (re-exported)

#: diffusers' key for the per-component LoraConfig (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: Default file name ``convert --to kohya`` uses when the target is a folder.
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
#: Where a kohya file keeps the source ``LoraConfig``s. Not diffusers' own key: diffusers refuses a
#: kohya file holding both per-module alphas and ``lora_adapter_metadata``.
KOHYA_CONFIG_KEY = "loracraft_lora_adapter_metadata"

FORMATS = ("diffusers", "kohya")
#: Suffixes of pickle-based files: loading one can run arbitrary code, so they are refused by default.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

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


# --------------------------------------------------------------------------------------------
# The neutral in-memory form
# --------------------------------------------------------------------------------------------
@dataclass
class LoraModule:
    """One adapted layer: ``W' = W + (alpha / rank) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    #: DoRA (Liu et al. 2024) per-output-channel magnitude, PEFT's ``lora_magnitude_vector``.
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraAdapter:
    """An adapter independent of its file layout.

    Attributes:
        modules: ``{component: {module path: LoraModule}}``; component is ``unet``,
            ``text_encoder`` or ``text_encoder_2``; paths use diffusers/transformers naming with
            dots (text encoder paths start with ``text_model.`` as in kohya files).
        configs: the ``LoraConfig`` dicts found in a diffusers header, per component (kept so a
            round trip writes them back unchanged when they still describe the weights).
        metadata: every other header entry (``ss_*`` keys, training facts).
        source_format: ``"diffusers"`` or ``"kohya"``.
    """

    modules: dict[str, dict[str, LoraModule]]
    configs: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "diffusers"
    path: Path | None = None

    def items(self):
        for component, mods in self.modules.items():
            for name, mod in mods.items():
                yield component, name, mod

    @property
    def num_modules(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def tensors_sha256(self) -> str:
        """Hash of names, ranks, alphas and bytes: equal iff two adapters act identically."""
        tensors: dict[str, torch.Tensor] = {}
        for component, name, mod in self.items():
            tensors[f"{component}.{name}.down"] = mod.down
            tensors[f"{component}.{name}.up"] = mod.up
            tensors[f"{component}.{name}.alpha"] = torch.tensor([float(mod.alpha)], dtype=torch.float64)
            if mod.magnitude is not None:
                tensors[f"{component}.{name}.magnitude"] = mod.magnitude
        return tensors_sha256(tensors)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------
def resolve_adapter_file(path: str | Path) -> Path:
    """Return the weights file for ``path`` (a file, or a folder holding one adapter)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterError(
            f"adapter file not found, {p}, check the path (a .safetensors file or a folder holding {LORA_WEIGHT_NAME})"
        )
    if p.is_dir():
        for default in (LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME):  # a loracraft run folder
            if (p / default).is_file():
                return p / default
        candidates = sorted(x for x in p.iterdir() if x.suffix == ".safetensors" and x.is_file())
        if len(candidates) == 1:
            return candidates[0]
        what = "no .safetensors file" if not candidates else f"{len(candidates)} .safetensors files"
        raise AdapterError(f"adapter folder holds {what}, {p}, pass the adapter file itself")
    return p


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and header metadata; a damaged file becomes a one-line AdapterError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(
            f"adapter file is not a readable safetensors file ({reason}), {path}, "
            "re-download or re-export it (the header or data is damaged or truncated)"
        ) from e
    return tensors, metadata


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise AdapterError(
            f"refusing to load a pickle-based adapter (loading it can run arbitrary code), {path}, "
            "convert it to .safetensors or pass --allow-pickle if you trust its source"
        )
    try:
        # Even when the user allows pickles, only tensors and plain containers are unpickled:
        # weights_only=True cannot run code; a file that needs more is refused, not trusted.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AdapterError(
            f"cannot load pickle adapter with weights_only=True ({type(e).__name__}), {path}, "
            "re-export it as .safetensors"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterError(
            f"pickle file does not hold a flat tensor dict, {path}, re-export it as safetensors"
        )
    return obj


def read_lora(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    module_names: dict[str, dict[str, str]] | None = None,
    unet_layers_per_block: int = 2,
) -> LoraAdapter:
    """Read a LoRA file in either format (detected from its keys).

    Args:
        path: a ``.safetensors`` file, a folder holding one, or (with ``allow_pickle``) a
            ``.ckpt/.pt/.bin`` file.
        allow_pickle: permit pickle-based files, which can execute code when loaded.
        module_names: per component, ``{underscored name: dotted module path}`` of the model the
            adapter will be applied to; resolves kohya names exactly instead of by rule.
        unet_layers_per_block: the target UNet's ``layers_per_block``, to number kohya SGM blocks
            (SDXL's 2 when unknown: only SDXL files use the SGM layout).

    Raises:
        AdapterError: missing file, damaged header, pickle refused, unknown layout.
    """
    file = resolve_adapter_file(path)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        tensors, header = read_pickle(file, allow_pickle), {}
    else:
        tensors, header = read_safetensors(file)
    if not tensors:
        raise AdapterError(f"adapter file holds no tensors, {file}, re-export it")
    fmt = detect_format(tensors.keys(), where=str(file))
    if fmt == "kohya":
        adapter = parse_kohya_state(
            tensors, header, module_names=module_names, where=str(file), unet_layers_per_block=unet_layers_per_block
        )
    else:
        adapter = parse_diffusers_state(tensors, header, where=str(file))
    adapter.path = file
    return adapter


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DIFFUSERS_MARKERS = (
    ".lora_A.",
    ".lora_B.",
    ".lora.down.",
    ".lora.up.",
    ".lora_linear_layer.",
    "_lora.down.",
    "_lora.up.",
)


def detect_format(keys, where: str = "state dict") -> str:
    """``"kohya"`` if every key uses kohya prefixes, ``"diffusers"`` if keys look like diffusers/PEFT."""
    keys = list(keys)
    for key in keys:
        err = _unsupported(key, where)
        if err:
            raise err
    kohya = [k for k in keys if k.startswith(_KOHYA_PREFIXES)]
    if kohya and len(kohya) == len(keys):
        return "kohya"
    if kohya:
        other = next(k for k in keys if not k.startswith(_KOHYA_PREFIXES))
        raise AdapterError(
            f"adapter mixes kohya keys with others (e.g. {other!r}), {where}, re-export it in one format"
        )
    if any(m in k for k in keys for m in _DIFFUSERS_MARKERS):
        return "diffusers"
    raise AdapterError(
        f"not a LoRA adapter (first key {keys[0]!r} is neither diffusers/PEFT nor kohya), {where}, "
        "pass a LoRA .safetensors file (full model checkpoints go to --base)"
    )


def _unsupported(key: str, where: str) -> AdapterError | None:
    if "dora_scale" in key:
        kind = "LyCORIS DoRA (dora_scale)"
    elif any(t in key for t in ("hada_", "lokr_", ".oft_", ".lora_mid.")) or key.endswith(
        (".diff", ".diff_b", ".w_norm", ".b_norm")
    ):
        kind = "LyCORIS (LoHa/LoKr/OFT/full-diff)"
    elif key.endswith("lora_B.bias") or key.endswith("lora_up.bias"):
        kind = "LoRA-with-bias"
    else:
        return None
    return AdapterError(f"{kind} adapters are not supported (key {key!r}), {where}, use a plain LoRA adapter")


def _alpha_value(t: torch.Tensor) -> float:
    v = float(t.detach().to(torch.float64).reshape(-1)[0].item())
    return int(v) if v.is_integer() else v


#: Values of kohya's ``ss_base_model_version`` header for SDXL (sd-scripts ``train_network.py``).
_SDXL_VERSION_PREFIX = "sdxl"
#: Our own header key naming the model family an adapter was trained on.
FAMILY_METADATA_KEY = "loracraft.model_family"
_MULTI_LAYER_TRANSFORMER = re.compile(r"\.transformer_blocks\.[1-9]")


def adapter_family(adapter: LoraAdapter) -> str | None:
    """``"sdxl"``, ``"sd"`` (SD1.x/2.x) or ``None`` when nothing tells (see :func:`family_evidence`)."""
    return family_evidence(adapter)[0]


def family_evidence(adapter: LoraAdapter) -> tuple[str | None, str]:
    """(family, why we think so) of an adapter.

    Evidence, most explicit first: our ``loracraft.model_family`` header, kohya's
    ``ss_base_model_version``, a second text encoder (only SDXL has one), and UNet modules in a
    second transformer layer of a block (SD1/SD2 have one layer per block; SDXL has 2 and 10).
    """
    meta = adapter.metadata
    if meta.get(FAMILY_METADATA_KEY) in ("sd", "sdxl"):
        return meta[FAMILY_METADATA_KEY], f"header {FAMILY_METADATA_KEY}={meta[FAMILY_METADATA_KEY]}"
    version = str(meta.get("ss_base_model_version", ""))
    if version:
        family = "sdxl" if version.startswith(_SDXL_VERSION_PREFIX) else "sd"
        return family, f"header ss_base_model_version={version}"
    if "text_encoder_2" in adapter.modules:
        return "sdxl", "it has text_encoder_2 weights"
    if any(_MULTI_LAYER_TRANSFORMER.search(path) for path in adapter.modules.get("unet", {})):
        return "sdxl", "its UNet modules include a second transformer layer"
    return None, ""


# -- diffusers / PEFT -------------------------------------------------------------------------
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


def _split_component(key: str) -> tuple[str, str]:
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


def _parse_diffusers_key(rest: str, component: str) -> tuple[str, str] | None:
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


def _canonical_te_path(path: str) -> str:
    # kohya and diffusers<->transformers-4 files name CLIP layers text_model.encoder...;
    # transformers 5 flattened CLIPTextModel (no .text_model), so both spellings arrive here.
    return path if path.startswith("text_model.") else f"text_model.{path}"


def config_module_params(config: dict, module: str) -> tuple[int | None, float | None]:
    """Rank and alpha a ``LoraConfig`` dict assigns to ``module`` (PEFT's own pattern rules)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.get("r"))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha"))
    return r, alpha


def _effective_alpha(config: dict, module: str, rank: int) -> float:
    """Alpha such that ``alpha / rank`` is the scale PEFT applies to this module."""
    _, alpha = config_module_params(config, module)
    if alpha is None:
        return rank
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r) (Kalajdzievski 2023); express it as alpha' / r.
        return alpha * math.sqrt(rank)
    return alpha


def parse_lora_adapter_metadata(header: dict[str, str]) -> dict[str, dict]:
    """Split diffusers' ``lora_adapter_metadata`` JSON into ``{component: LoraConfig dict}``."""
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component in COMPONENTS and name:
            out.setdefault(component, {})[name] = value
    return out


def parse_diffusers_state(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None, where: str = "state dict"
) -> LoraAdapter:
    """Parse a diffusers/PEFT LoRA state dict (any of diffusers' key spellings)."""
    header = dict(header or {})
    configs = parse_lora_adapter_metadata(header)
    header.pop(LORA_ADAPTER_METADATA_KEY, None)
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        err = _unsupported(key, where)
        if err:
            raise err
        component, rest = _split_component(key)
        parsed = _parse_diffusers_key(rest, component) if component else None
        if parsed is None:
            raise AdapterError(
                f"unrecognised LoRA key {key!r}, {where}, expected unet./text_encoder. keys ending in "
                "lora_A/lora_B.weight or lora.down/up.weight (or a kohya lora_unet_ file)"
            )
        module, kind = parsed
        if component.startswith("text_encoder"):
            module = _canonical_te_path(module)
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
            rank = int(p["down"].shape[0])
            if "alpha" in p:
                alpha = _alpha_value(p["alpha"])
            else:
                lookup = (
                    module.removeprefix("text_model.") if component.startswith("text_encoder") else module
                )
                alpha = _effective_alpha(config, lookup, rank) if config else rank
            modules.setdefault(component, {})[module] = LoraModule(
                p["down"], p["up"], alpha, p.get("magnitude")
            )
        _check_dora_uniform(modules.get(component, {}), component, where)
    return LoraAdapter(modules, configs=configs, metadata=header, source_format="diffusers")


def _check_dora_uniform(mods: dict[str, LoraModule], component: str, where: str) -> None:
    """PEFT's ``use_dora`` is per config, so a component is all DoRA or not at all."""
    with_mag = [name for name, m in mods.items() if m.magnitude is not None]
    if with_mag and len(with_mag) != len(mods):
        missing = next(name for name, m in mods.items() if m.magnitude is None)
        raise AdapterError(
            f"adapter mixes DoRA and plain LoRA modules in {component} (e.g. {missing} has no magnitude), "
            f"{where}, re-export it"
        )


# -- kohya / A1111 ----------------------------------------------------------------------------
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
        dotted = _canonical_te_path(name) if te else name
        table.setdefault(module_to_kohya_name(dotted), dotted)
    return table


def _kohya_component(lora_name: str) -> tuple[str, str]:
    for prefix, component in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ):
        if lora_name.startswith(prefix):
            return component, lora_name[len(prefix) :]
    raise AssertionError(lora_name)  # detect_format guarantees a prefix


_SGM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d")
_DIFFUSERS_BLOCKS = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")


def sgm_unet_names_to_diffusers(
    lora_names: list[str], layers_per_block: int = 2, where: str = "state dict"
) -> dict[str, str]:
    """``{kohya SGM module name: diffusers UNet module path}``; empty when the names are not SGM.

    kohya trains SDXL on its own copy of Stability's (SGM) UNet, so its files name modules
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the same module is
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` in diffusers. The renaming is
    diffusers' own (``_maybe_map_sgm_blocks_to_diffusers`` for the block numbering, then
    ``_convert_unet_lora_key`` for the layer names), run on the names only; tensors stay ours.
    """
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sgm = [n for n in lora_names if _SGM_BLOCKS.match(n)]
    if not sgm:
        return {}
    mixed = [n for n in lora_names if _DIFFUSERS_BLOCKS.match(n)]
    if mixed:
        raise AdapterError(
            f"adapter mixes SGM (input_blocks/output_blocks) and diffusers (down_blocks/up_blocks) UNet names "
            f"(e.g. {sgm[0]} and {mixed[0]}), {where}, re-export it in one layout"
        )
    probe = {f"{n}.lora_down.weight": n for n in lora_names}
    try:
        mapped = _maybe_map_sgm_blocks_to_diffusers(probe, SimpleNamespace(layers_per_block=layers_per_block))
    except (ValueError, IndexError) as e:
        raise AdapterError(
            f"cannot map kohya SGM UNet names to diffusers ({e}), {where}, check it is an SDXL LoRA"
        ) from e
    out: dict[str, str] = {}
    for key, original in mapped.items():
        parsed = _parse_diffusers_key(_convert_unet_lora_key(key), "unet")
        if parsed is None:
            raise AdapterError(f"cannot map kohya SGM UNet module {original}, {where}, report this with the file")
        out[original] = parsed[0]
    return out


_RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
_TOP_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
_DIFFUSERS_UNET_PATH = re.compile(
    r"^(?P<block>down_blocks|up_blocks)\.(?P<i>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<j>\d+)\.(?P<rest>.+)$"
    r"|^mid_block\.(?P<mkind>resnets|attentions)\.(?P<mj>\d+)\.(?P<mrest>.+)$"
)


def diffusers_to_sgm_unet_name(path: str, layers_per_block: int = 2, where: str = "adapter") -> str:
    """A diffusers SDXL UNet module path in kohya's SGM layout (dots; the inverse of
    :func:`sgm_unet_names_to_diffusers`, which tests check on every module of an SDXL UNet).

    Block numbering: input block ``1 + i * (layers_per_block + 1) + j`` holds down block ``i``'s
    layer ``j`` (``.0`` resnet, ``.1`` attention), the block after its layers its downsampler
    (``.0.op``); output block ``i * (layers_per_block + 1) + j`` likewise, with the upsampler at
    ``.2``; the middle block is resnet, attention, resnet (0, 1, 2).
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


def parse_kohya_state(
    tensors: dict[str, torch.Tensor],
    header: dict[str, str] | None = None,
    module_names: dict[str, dict[str, str]] | None = None,
    where: str = "state dict",
    unet_layers_per_block: int = 2,
) -> LoraAdapter:
    """Parse a kohya/A1111 state dict; a module without ``.alpha`` gets alpha = rank (kohya's rule).

    UNet names may use the diffusers layout (``lora_unet_down_blocks_1_attentions_0_...``) or, as
    kohya's SDXL trainer writes them, the original SGM layout (``lora_unet_input_blocks_4_1_...``),
    which :func:`sgm_unet_names_to_diffusers` maps with diffusers' own converters
    (``unet_layers_per_block`` is the base UNet's ``layers_per_block``: 2 on SDXL).
    """
    header = dict(header or {})
    configs = parse_lora_adapter_metadata({LORA_ADAPTER_METADATA_KEY: header.pop(KOHYA_CONFIG_KEY, "")})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        err = _unsupported(key, where)
        if err:
            raise err
        lora_name, _, suffix = key.partition(".")
        kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
        if kind is None:
            raise AdapterError(
                f"unrecognised kohya key {key!r}, {where}, expected <name>.lora_down.weight / .lora_up.weight / .alpha"
            )
        parts.setdefault(lora_name, {})[kind] = value
    modules: dict[str, dict[str, LoraModule]] = {}
    sgm = sgm_unet_names_to_diffusers(
        [n for n in parts if n.startswith("lora_unet_")], unet_layers_per_block, where
    )
    for lora_name, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_up" if "down" in p else "lora_down"
            raise AdapterError(f"kohya module {lora_name} has no {missing}.weight, {where}, re-export it")
        component, flat = _kohya_component(lora_name)
        table = (module_names or {}).get(component, {})
        path = sgm.get(lora_name) or table.get(flat) or kohya_name_to_module(flat)
        if component.startswith("text_encoder"):
            path = _canonical_te_path(path)
        rank = int(p["down"].shape[0])
        alpha = _alpha_value(p["alpha"]) if "alpha" in p else rank
        modules.setdefault(component, {})[path] = LoraModule(p["down"], p["up"], alpha)
    return LoraAdapter(modules, configs=configs, metadata=header, source_format="kohya")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _alpha_tensor(alpha: float) -> torch.Tensor:
    # float32 is what kohya writes; use float64 only when float32 would round the value.
    t32 = torch.tensor(float(alpha), dtype=torch.float32)
    return t32 if float(t32.item()) == float(alpha) else torch.tensor(float(alpha), dtype=torch.float64)


def _most_common(values) -> float:
    return Counter(values).most_common(1)[0][0]


def build_lora_config(modules: dict[str, LoraModule], paths: dict[str, str] | None = None) -> dict:
    """A minimal ``LoraConfig`` dict reproducing every module's rank and alpha exactly.

    Args:
        modules: ``{module path: LoraModule}`` of one component.
        paths: optional renaming of module paths to the names the target model uses.
    """
    paths = paths or {}
    named = {paths.get(k, k): m for k, m in modules.items()}
    r = _most_common(m.rank for m in named.values())
    alpha = _most_common(m.alpha for m in named.values())
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
        if r != mod.rank or _effective_alpha(config, lookup, mod.rank) != mod.alpha:
            return False
    return True


def component_config(adapter: LoraAdapter, component: str) -> dict:
    """The component's stored config if it still describes the weights, else a rebuilt one."""
    mods = adapter.modules[component]
    stored = adapter.configs.get(component)
    if stored and config_describes(stored, mods, te=component.startswith("text_encoder")):
        return stored
    return build_lora_config(mods)


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
    adapter_meta: dict[str, object] = {}
    for component, mods in adapter.modules.items():
        for path, mod in mods.items():
            tensors[_peft_key(component, path, "down")] = mod.down
            tensors[_peft_key(component, path, "up")] = mod.up
            if mod.magnitude is not None:
                tensors[_peft_key(component, path, "magnitude")] = mod.magnitude
        config = _jsonable_lora_config(component_config(adapter, component))
        adapter_meta.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", **{k: v for k, v in adapter.metadata.items() if k != "format"}}
    metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
    return _contiguous(tensors), metadata


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
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "sshs_", "modelspec."))}
    ranks = [m.rank for _, _, m in adapter.items()]
    alphas = [m.alpha for _, _, m in adapter.items()]
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(_most_common(ranks))
    meta["ss_network_alpha"] = str(_most_common(alphas))
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


def to_kohya_state(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of a kohya/A1111 file; each module carries its own ``alpha``.

    SDXL UNet modules get kohya's SGM names (``lora_unet_input_blocks_4_1_...``, what
    ``sdxl_train_network.py`` writes and A1111/ComfyUI/diffusers read); SD1/SD2 keep the diffusers
    layout kohya itself uses for them. The source ``LoraConfig`` is kept under :data:`KOHYA_CONFIG_KEY` (kohya tools ignore unknown
    keys), so converting back restores it verbatim.
    """
    dora = next((f"{c}.{n}" for c, n, m in adapter.items() if m.magnitude is not None), None)
    if dora:
        raise AdapterError(
            f"DoRA adapters have no kohya/A1111 LoRA form (module {dora} has a magnitude vector), "
            f"{adapter.path or 'adapter'}, keep the diffusers file (plain diffusers and loracraft load it)"
        )
    prefixes = _kohya_prefixes(adapter)
    # kohya's SDXL trainer names UNet modules in its own (SGM) layout; SD1/SD2 files use diffusers'.
    sgm = adapter_family(adapter) == "sdxl"
    tensors: dict[str, torch.Tensor] = {}
    adapter_meta: dict[str, object] = {}
    for component, mods in adapter.modules.items():
        for path, mod in mods.items():
            if component == "unet" and sgm:
                path = diffusers_to_sgm_unet_name(path, where=str(adapter.path or "adapter"))
            name = prefixes[component] + module_to_kohya_name(path)
            tensors[f"{name}.lora_down.weight"] = mod.down
            tensors[f"{name}.lora_up.weight"] = mod.up
            tensors[f"{name}.alpha"] = _alpha_tensor(mod.alpha)
        config = adapter.configs.get(component)
        if config and config_describes(config, mods, te=component.startswith("text_encoder")):
            adapter_meta.update({f"{component}.{k}": v for k, v in _jsonable_lora_config(config).items()})
    metadata = kohya_metadata(adapter)
    if adapter_meta:
        metadata[KOHYA_CONFIG_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
    return _contiguous(tensors), metadata


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_lora(adapter: LoraAdapter, path: str | Path, to: str = "diffusers") -> Path:
    """Write ``adapter`` atomically in format ``to`` (``"diffusers"`` or ``"kohya"``)."""
    if to not in FORMATS:
        raise UsageError(f"unknown adapter format {to!r}, --to, use one of {', '.join(FORMATS)}")
    tensors, metadata = to_kohya_state(adapter) if to == "kohya" else to_diffusers_state(adapter)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def convert_lora_file(src: str | Path, dst: str | Path, to: str, *, allow_pickle: bool = False) -> Path:
    """``loracraft convert``: read ``src`` in either format, write ``dst`` in format ``to``.

    A folder ``dst`` (existing, or a path without a suffix) receives the format's default file name.
    """
    if to not in FORMATS:
        raise UsageError(f"unknown adapter format {to!r}, --to, use one of {', '.join(FORMATS)}")
    _refuse_lycoris(src)
    adapter = read_lora(src, allow_pickle=allow_pickle)
    out = Path(dst).expanduser()
    if out.is_dir() or out.suffix == "" or str(dst).endswith(("/", "\\")):
        out = out / (KOHYA_WEIGHT_NAME if to == "kohya" else LORA_WEIGHT_NAME)
    elif out.suffix != ".safetensors":
        raise UsageError(
            f"output must be a .safetensors file or a folder, {dst}, e.g. {Path(dst).with_suffix('.safetensors')}"
        )
    if adapter.path is not None and out.resolve() == adapter.path.resolve():
        raise UsageError(f"output would overwrite the input, {dst}, choose another output path")
    return write_lora(adapter, out, to=to)


def _refuse_lycoris(src: str | Path) -> None:
    """LoHa/LoKr: nothing to convert, and saying so beats "unsupported adapter"."""
    from loracraft.infer.formats.lycoris import is_lycoris_file

    path = resolve_adapter_file(src)
    if is_lycoris_file(path):
        raise UsageError(
            f"LoHa/LoKr weights are already in the kohya/LyCORIS layout that A1111, ComfyUI and kohya load, {path}, "
            "use the file as is (diffusers has no format for them; loracraft generate --lora loads it)"
        )


# --------------------------------------------------------------------------------------------
# diffusers writer used by the trainer (kept stable: the trainer calls it)
# --------------------------------------------------------------------------------------------
def _jsonable_lora_config(config: dict) -> dict:
    """LoraConfig.to_dict() holds sets and enums; safetensors metadata must be JSON strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def _peft_spelling(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parsed = _parse_diffusers_key(key, component)
        if parsed is None or parsed[1] == "alpha":
            raise AdapterError(
                f"unrecognised LoRA key {key!r}, {component} state, pass a PEFT/diffusers state dict"
            )
        module, kind = parsed
        if component.startswith("text_encoder"):
            module = _canonical_te_path(module)
        out[_peft_key(component, module, kind)] = value
    return out


def save_diffusers_lora(
    path: str | Path,
    unet_state: dict[str, torch.Tensor],
    unet_lora_config: dict,
    extra_metadata: dict[str, str] | None = None,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    text_encoder_lora_config: dict | None = None,
    text_encoder_2_state: dict[str, torch.Tensor] | None = None,
    text_encoder_2_lora_config: dict | None = None,
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
    """
    tensors = _peft_spelling(unet_state, "unet")
    adapter_meta = {f"unet.{k}": v for k, v in _jsonable_lora_config(unet_lora_config).items()}
    for component, state, config in (
        ("text_encoder", text_encoder_state, text_encoder_lora_config),
        ("text_encoder_2", text_encoder_2_state, text_encoder_2_lora_config),
    ):
        if state:
            tensors.update(_peft_spelling(state, component))
            if config:
                adapter_meta.update({f"{component}.{k}": v for k, v in _jsonable_lora_config(config).items()})
    metadata = {"format": "pt", **(extra_metadata or {})}
    metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
    tensors = _contiguous(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, dtypes, shapes and bytes: equal iff the weights are bit-identical.

    Independent of the file's metadata (which holds wall times and paths), so two runs
    that learned the same weights compare equal.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
