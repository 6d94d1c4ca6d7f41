"""LoHa / LoKr adapters (LyCORIS) in the kohya file layout that A1111, ComfyUI and kohya load.

diffusers' ``load_lora_weights`` only knows LoRA, so a LoHa/LoKr trained with peft is written in
the layout the LyCORIS ecosystem reads (kohya names, one ``alpha`` per module)::

    lora_unet_<module with _>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b / alpha     LoHa
    lora_unet_<module with _>.lokr_w1 (or lokr_w1_a/_b), lokr_w2 (or lokr_w2_a/_b), alpha     LoKr

and loaded back onto a diffusers pipeline with peft's own LoHa/LoKr layers
(``inject_adapter_in_model`` + ``set_peft_model_state_dict``), so loracraft generates with it.

Scale conventions (why the LoKr writer rescales): peft and LyCORIS both apply
``alpha / dim`` with ``dim`` the rank of the decomposed factors (LoHa: ``hada_w1_b.shape[0]``;
LoKr: ``lokr_w1_b`` or ``lokr_w2_b``'s first dim). A LoKr module whose two Kronecker factors are
both full matrices has no ``dim``: A1111 (``network_lokr.py``), ComfyUI and LyCORIS then apply
scale 1 and ignore ``alpha``, while peft still applies ``alpha / r``. Such modules are written with
that scale folded into ``lokr_w2`` (and ``alpha = r``), so every loader computes the same weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats.files import read_safetensors, write_safetensors
from loracraft.infer.formats.kohya import model_module_table
from loracraft.infer.formats.model import most_common

__all__ = [
    "LYCORIS_TYPES",
    "is_lycoris_state",
    "is_lycoris_file",
    "to_lycoris_state",
    "save_lycoris",
    "read_lycoris",
    "load_lycoris",
]

LYCORIS_TYPES = ("loha", "lokr")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2", "dora_scale", "oft_", "lora_down", "lora_up")
_PEFT_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)(?:\.[^.]+)?$")


def is_lycoris_state(keys) -> bool:
    """True when the keys are LoHa/LoKr weights (any naming)."""
    return any(k.rsplit(".", 1)[-1].startswith(("hada_", "lokr_")) for k in keys)


def is_lycoris_file(path: str | Path) -> bool:
    """True for a ``.safetensors`` file holding LoHa/LoKr weights (reads the header only)."""
    from safetensors import safe_open

    if Path(path).suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return is_lycoris_state(fh.keys())
    except Exception:  # noqa: BLE001 - a damaged file is reported by the regular reader
        return False


def _kind(parts: dict[str, torch.Tensor]) -> str:
    return "loha" if any(k.startswith("hada_") for k in parts) else "lokr"


def _lokr_dim(parts: dict[str, torch.Tensor]) -> int | None:
    """LyCORIS's ``dim`` of a LoKr module (None when both factors are full matrices)."""
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return None


# --------------------------------------------------------------------------------------------
# Writing (from peft)
# --------------------------------------------------------------------------------------------
def to_lycoris_state(
    peft_state: dict[str, torch.Tensor],
    rank: dict[str, int] | int,
    alpha: dict[str, float] | float,
    prefix: str = "lora_unet_",
) -> dict[str, torch.Tensor]:
    """peft LoHa/LoKr state dict (``get_peft_model_state_dict`` naming) -> kohya/LyCORIS tensors.

    Args:
        peft_state: ``{<module>.hada_w1_a: tensor, ...}`` (an adapter-name segment is tolerated).
        rank: peft's ``r``, one for all modules or per module path.
        alpha: peft's ``alpha``, likewise.
        prefix: ``lora_unet_`` (UNet modules).
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"unrecognised LoHa/LoKr key {key!r}, peft state, expected <module>.hada_*/lokr_*"
            )
        modules.setdefault(m["mod"], {})[m["kind"]] = value.detach().to("cpu").contiguous()
    out: dict[str, torch.Tensor] = {}
    for path, parts in sorted(modules.items()):
        r = rank[path] if isinstance(rank, dict) else rank
        a = float(alpha[path] if isinstance(alpha, dict) else alpha)
        name = prefix + path.replace(".", "_")
        if _kind(parts) == "lokr" and _lokr_dim(parts) is None:
            parts = dict(parts)
            parts["lokr_w2"] = parts["lokr_w2"] * (a / r)  # see module doc: loaders use scale 1 here
            a = float(r)
        for kind, tensor in parts.items():
            out[f"{name}.{kind}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    return out


def save_lycoris(
    path: str | Path,
    peft_state: dict[str, torch.Tensor],
    algo: str,
    rank: int,
    alpha: float,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a trained peft LoHa/LoKr UNet adapter as a kohya/LyCORIS ``.safetensors`` file (atomically)."""
    if algo not in LYCORIS_TYPES:
        raise AdapterError(
            f"unknown LyCORIS algorithm {algo!r}, save_lycoris, use one of {', '.join(LYCORIS_TYPES)}"
        )
    tensors = to_lycoris_state(peft_state, rank, alpha)
    meta = {"format": "pt", **(metadata or {})}
    meta.update(
        {
            "ss_network_module": "lycoris.kohya",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"algo": algo}),
        }
    )
    return write_safetensors(path, tensors, meta)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
@dataclass
class LycorisModule:
    """One adapted layer: its LyCORIS tensors and alpha."""

    parts: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def kind(self) -> str:
        return _kind(self.parts)


@dataclass
class LycorisAdapter:
    """A LoHa/LoKr file: ``{UNet module path (kohya underscores): LycorisModule}``."""

    modules: dict[str, LycorisModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def kind(self) -> str:
        kinds = {m.kind for m in self.modules.values()}
        if len(kinds) != 1:
            raise AdapterError(
                f"adapter mixes LoHa and LoKr modules, {self.path}, load one algorithm per file"
            )
        return kinds.pop()


def read_lycoris(path: str | Path) -> LycorisAdapter:
    """Parse a kohya/LyCORIS LoHa or LoKr file (UNet modules)."""
    file = Path(path)
    tensors, header = read_safetensors(file)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
            raise AdapterError(
                f"LoHa/LoKr text-encoder modules are not supported (key {key!r}), {file}, "
                "use an adapter that adapts only the UNet"
            )
        if not name.startswith("lora_unet_"):
            raise AdapterError(
                f"unrecognised LoHa/LoKr key {key!r}, {file}, expected lora_unet_<module>.<weight>"
            )
        flat = name.removeprefix("lora_unet_")
        if suffix == "alpha":
            alphas[flat] = float(value.float().reshape(-1)[0])
        elif suffix.startswith(_UNSUPPORTED) or suffix not in _LOHA + _LOKR:
            raise AdapterError(
                f"LyCORIS weight {suffix!r} is not supported (key {key!r}; only LoHa/LoKr without Tucker "
                f"decomposition or DoRA load here), {file}, use such an adapter"
            )
        else:
            modules.setdefault(flat, {})[suffix] = value
    for flat, parts in modules.items():
        need = _LOHA if _kind(parts) == "loha" else ()
        missing = [k for k in need if k not in parts]
        if _kind(parts) == "lokr":
            missing = [k for k in ("lokr_w1", "lokr_w2") if k not in parts and f"{k}_a" not in parts]
        if missing:
            raise AdapterError(f"LyCORIS module {flat} has no {missing[0]}, {file}, re-export it")
    adapter = LycorisAdapter({f: LycorisModule(p, alphas.get(f)) for f, p in modules.items()}, header, file)
    _ = adapter.kind
    return adapter


# --------------------------------------------------------------------------------------------
# Loading onto a pipeline (peft's LoHa/LoKr layers)
# --------------------------------------------------------------------------------------------
def _rank_alpha(mod: LycorisModule, kind: str) -> tuple[int, float]:
    """peft's (r, alpha) reproducing LyCORIS's scale for one module."""
    p = mod.parts
    if kind == "loha":
        r = int(p["hada_w1_b"].shape[0])
        return r, mod.alpha if mod.alpha is not None else float(r)
    dim = _lokr_dim(p)
    if dim is not None:
        return dim, mod.alpha if mod.alpha is not None else float(dim)
    # Both factors full: LyCORIS applies scale 1. peft keeps them full only when r >= half of each
    # factor's larger side, so take r = the largest side and alpha = r.
    w1, w2 = p["lokr_w1"], p["lokr_w2"]
    r = int(max(w1.shape[0], w1.shape[1], w2.shape[0], w2.shape[1]))
    return r, float(r)


def _peft_config(adapter: LycorisAdapter, paths: dict[str, str], decompose_factor: int = -1):
    from peft import LoHaConfig, LoKrConfig

    kind = adapter.kind
    ra = {paths[f]: _rank_alpha(m, kind) for f, m in adapter.modules.items()}
    r = most_common(v[0] for v in ra.values())
    alpha = most_common(v[1] for v in ra.values())
    common = dict(
        r=r,
        alpha=alpha,
        target_modules=sorted(ra),
        # "^" anchors the pattern at the start of the module name (peft#2419), as the LoRA config writer does.
        rank_pattern={f"^{k}": v[0] for k, v in sorted(ra.items()) if v[0] != r},
        alpha_pattern={f"^{k}": v[1] for k, v in sorted(ra.items()) if v[1] != alpha},
        init_weights=False,
    )
    if kind == "loha":
        return LoHaConfig(**common)
    both = any("lokr_w1_a" in m.parts for m in adapter.modules.values())
    return LoKrConfig(**common, decompose_both=both, decompose_factor=decompose_factor)


def _resolve_paths(unet: torch.nn.Module, adapter: LycorisAdapter, where: str) -> dict[str, str]:
    table = model_module_table(unet)
    missing = [f for f in adapter.modules if f not in table]
    if missing:
        raise AdapterError(
            f"{len(missing)} of the adapter's {len(adapter.modules)} modules do not exist in the base "
            f"(first: lora_unet_{missing[0]}), {where}, it was made for a different base model; use the base it was trained on"
        )
    return {f: table[f] for f in adapter.modules}


def _peft_state(
    adapter: LycorisAdapter, paths: dict[str, str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    state = {}
    for flat, mod in adapter.modules.items():
        for kind, tensor in mod.parts.items():
            state[f"{paths[flat]}.{kind}"] = tensor.to(dtype)
    return state


def _check_shapes(unet: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> str | None:
    """First mismatch between the file's tensors and the layers peft built, or None."""
    params = dict(unet.named_parameters())
    for key, tensor in state.items():
        mod, _, kind = key.rpartition(".")
        p = params.get(f"{mod}.{kind}.{name}")
        if p is None:
            return f"{key} has no peft parameter (the factorisation differs)"
        if tuple(p.shape) != tuple(tensor.shape):
            return f"{key} is {list(tensor.shape)} but the layer needs {list(p.shape)}"
    return None


def load_lycoris(pipe, path: str | Path, name: str) -> LycorisAdapter:
    """Attach a LoHa/LoKr file to ``pipe.unet`` as peft adapter ``name`` (scale via ``set_adapters``).

    Raises:
        AdapterError: unsupported tensors, modules the base lacks, or shapes that do not fit.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    adapter = read_lycoris(path)
    where = str(path)
    unet = pipe.unet
    paths = _resolve_paths(unet, adapter, where)
    state = _peft_state(adapter, paths, next(unet.parameters()).dtype)
    factors = [-1]
    if adapter.kind == "lokr":  # LyCORIS' factor option fixes w1's side; peft must rebuild the same split
        w1 = next(iter(adapter.modules.values())).parts
        side = int((w1["lokr_w1"] if "lokr_w1" in w1 else w1["lokr_w1_a"]).shape[0])
        factors.append(side)
    problem = None
    for factor in factors:
        config = _peft_config(adapter, paths, decompose_factor=factor)
        inject_adapter_in_model(config, unet, adapter_name=name)
        problem = _check_shapes(unet, state, name)
        if problem is None:
            break
        _remove(unet, name)
    if problem is not None:
        raise AdapterError(
            f"LoHa/LoKr adapter does not fit the base: {problem}, {where}, use the base it was trained on"
        )
    result = set_peft_model_state_dict(unet, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "hada_" in k or "lokr_" in k]
    if unexpected:
        _remove(unet, name)
        raise AdapterError(
            f"the UNet did not take LyCORIS weight {unexpected[0]}, {where}, report this with the file"
        )
    return adapter


def _remove(unet: torch.nn.Module, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "_available_adapters", set()):
            module.delete_adapter(name)
    config = getattr(unet, "peft_config", None) or {}
    config.pop(name, None)
