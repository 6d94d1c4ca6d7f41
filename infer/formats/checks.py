"""Sanity checks on adapter files: a garbage header or tensor becomes one line naming the file and key.

Without them a hostile or damaged file either crashes deep inside peft/diffusers with a traceback or,
worse, converts into a file that looks fine and is not (a 1-d ``lora_down`` written as a kohya
module, an ``int64`` tensor, NaNs, a rank-0 module, ``lora_alpha: "abc"``).
"""

from __future__ import annotations

import math

import torch

from loracraft.infer.errors import AdapterError

_FIX = "re-export the adapter from its training tool (the file is damaged or not a LoRA)"
#: What each tensor of a module is; down/up are [rank, in] / [out, rank] (linear) or 4-d (conv).
_MATRIX_KINDS = ("down", "up")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def check_tensor(key: str, t: torch.Tensor, kind: str, where: str) -> None:
    """Refuse a tensor that cannot be the ``kind`` part (down/up/alpha/magnitude/dora_scale) of a LoRA."""
    integral_alpha = kind == "alpha" and t.dtype not in (torch.bool, torch.uint8) and not t.is_complex()
    if not torch.is_floating_point(t) and not integral_alpha:
        raise AdapterError(
            f"tensor {key} has dtype {str(t.dtype).removeprefix('torch.')} where floats are expected, {where}, {_FIX}"
        )
    if kind in _MATRIX_KINDS:
        if t.dim() not in (2, 4):
            raise AdapterError(
                f"tensor {key} is {t.dim()}-d (shape {_shape(t)}) where a 2-d (linear) or 4-d (conv) matrix is "
                f"expected, {where}, {_FIX}"
            )
        if t.numel() == 0:
            raise AdapterError(f"tensor {key} is empty (shape {_shape(t)}, rank 0), {where}, {_FIX}")
    elif kind == "alpha":
        if t.numel() != 1:
            raise AdapterError(
                f"alpha {key} holds {t.numel()} values (shape {_shape(t)}) where one number is expected, {where}, {_FIX}"
            )
    elif t.numel() == 0:
        raise AdapterError(f"tensor {key} is empty (shape {_shape(t)}), {where}, {_FIX}")
    if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
        raise AdapterError(f"tensor {key} holds NaN or Inf values, {where}, {_FIX}")
    if kind == "alpha" and float(t.reshape(-1)[0]) == 0.0:
        raise AdapterError(
            f"alpha {key} is 0 (kohya reads that as alpha = rank, A1111 and ComfyUI as scale 0), {where}, "
            "re-export it with the alpha it was trained with"
        )


def check_module(name: str, down: torch.Tensor, up: torch.Tensor, where: str) -> None:
    """``up @ down`` must be defined: the same rank on both sides and the same kind of layer."""
    if down.dim() != up.dim() or down.shape[0] != up.shape[1]:
        raise AdapterError(
            f"LoRA module {name} has lora_down {_shape(down)} and lora_up {_shape(up)}, which do not multiply "
            f"(rank {down.shape[0]} vs {up.shape[1]}), {where}, {_FIX}"
        )


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_lora_config(config, component: str, where: str) -> dict:
    """A component's ``LoraConfig`` dict from a header; the fields the scale depends on must be numbers."""
    label = f"lora_adapter_metadata {component}"
    if not isinstance(config, dict):
        raise AdapterError(f"{label} is a {type(config).__name__}, not a LoraConfig object, {where}, {_FIX}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if r is not None and (not _is_number(r) or int(r) != r or r <= 0):
        raise AdapterError(f"{label}.r is {r!r}, not a positive whole number, {where}, {_FIX}")
    if alpha is not None and (not _is_number(alpha) or alpha == 0):
        raise AdapterError(f"{label}.lora_alpha is {alpha!r}, not a non-zero number, {where}, {_FIX}")
    for field, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise AdapterError(
                f"{label}.{field} is a {type(pattern).__name__}, not a {{module: number}} object, {where}, {_FIX}"
            )
        for module, value in pattern.items():
            bad = not _is_number(value) or value == 0 or (positive_int and (int(value) != value or value < 0))
            if bad:
                raise AdapterError(
                    f"{label}.{field}[{module!r}] is {value!r}, not a non-zero number, {where}, {_FIX}"
                )
    for flag in ("use_rslora", "use_dora"):
        if flag in config and not isinstance(config[flag], bool) and config[flag] is not None:
            raise AdapterError(f"{label}.{flag} is {config[flag]!r}, not true/false, {where}, {_FIX}")
    return config


def unsupported_key(key: str, where: str, kohya: bool = True) -> AdapterError | None:
    """The error for a key of an adapter kind we cannot apply exactly, or None.

    ``dora_scale`` is DoRA in the kohya/LyCORIS layout (read by the kohya parser); elsewhere it is not ours.
    """
    if "dora_scale" in key and not kohya:
        kind = "DoRA with dora_scale outside the kohya layout"
    elif any(t in key for t in ("hada_", "lokr_", ".oft_", ".lora_mid.")) or key.endswith(
        (".diff", ".diff_b", ".w_norm", ".b_norm")
    ):
        kind = "LyCORIS (LoHa/LoKr/OFT/full-diff)"
    elif key.endswith("lora_B.bias") or key.endswith("lora_up.bias"):
        kind = "LoRA-with-bias"
    else:
        return None
    return AdapterError(f"{kind} adapters are not supported (key {key!r}), {where}, use a plain LoRA adapter")
