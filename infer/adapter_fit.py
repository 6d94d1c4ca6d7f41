"""Does an adapter fit a base? Checked before anything is injected.

diffusers warns about keys it cannot match and then loads nothing (a silent no-op), and a shape
mismatch surfaces as a torch traceback. Checking every module up front turns both into one
:class:`AdapterError` line naming the module and both shapes; a model-family mismatch (SDXL
adapter on an SD1 base, or the reverse) is named before any shape talk.
"""

from __future__ import annotations

import torch

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats import LoraAdapter, family_evidence

__all__ = ["check_fit"]


def _model_path(model: torch.nn.Module, component: str, path: str) -> str:
    """The module path inside ``model`` for an adapter path (CLIP naming differs by version)."""
    if component.startswith("text_encoder") and not hasattr(model, "text_model"):
        return path.removeprefix("text_model.")
    return path


def _expected_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple, tuple, tuple] | None:
    """(weight shape, expected down shape, expected up shape) for a LoRA of ``rank`` on ``module``."""
    if isinstance(module, torch.nn.Linear):
        return tuple(module.weight.shape), (rank, module.in_features), (module.out_features, rank)
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        down = (rank, module.in_channels // module.groups, kh, kw)
        return tuple(module.weight.shape), down, (module.out_channels, rank, 1, 1)
    return None


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


_FAMILY_NAMES = {"sd": "SD1.x/2.x", "sdxl": "SDXL"}


def _check_family(pipe, adapter: LoraAdapter, where: str) -> None:
    """An SDXL adapter on an SD1 base (or the reverse) gets one clear line before any shape talk."""
    from loracraft.infer.models import model_family

    made_for, why = family_evidence(adapter)
    base = model_family(pipe)
    if made_for is not None and made_for != base:
        example = (
            "stabilityai/stable-diffusion-xl-base-1.0"
            if made_for == "sdxl"
            else "runwayml/stable-diffusion-v1-5"
        )
        raise AdapterError(
            f"{_FAMILY_NAMES[made_for]} adapter ({why}) on an {_FAMILY_NAMES[base]} base, {where}, "
            f"load it on an {_FAMILY_NAMES[made_for]} base (e.g. {example}) or use an adapter trained for this base"
        )


def check_fit(pipe, adapter: LoraAdapter, where: str = "adapter") -> dict[str, dict[str, str]]:
    """Check every module of ``adapter`` exists in ``pipe`` with matching shapes.

    Returns:
        ``{component: {adapter module path: model module path}}``.

    Raises:
        AdapterError: naming the first missing module, or the first module whose shapes do not
            fit (with the base weight shape and the adapter's implied shape).
    """
    _check_family(pipe, adapter, where)
    mapping: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    total = adapter.num_modules
    for component, mods in adapter.modules.items():
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            raise AdapterError(
                f"adapter has {component} weights but the base has no {component} "
                f"(made for another model family, e.g. SDXL), {where}, use the base it was trained on"
            )
        names = dict(model.named_modules())
        mapping[component] = {}
        for path, mod in mods.items():
            mpath = _model_path(model, component, path)
            module = names.get(mpath)
            if module is None:
                missing.append(f"{component}.{path}")
                continue
            module = getattr(module, "base_layer", module)
            shapes = _expected_shapes(module, mod.rank)
            if shapes is None:
                raise AdapterError(
                    f"adapter targets {component}.{mpath}, a {type(module).__name__} (only Linear and Conv2d "
                    f"take LoRA here), {where}, use an adapter trained on attention/projection layers"
                )
            weight, want_down, want_up = shapes
            # (out,) for Linear, (1, out, 1, 1) for Conv2d in PEFT
            if mod.magnitude is not None and mod.magnitude.numel() != want_up[0]:
                raise AdapterError(
                    f"adapter does not fit the base: module {component}.{mpath} has {want_up[0]} output channels "
                    f"but the adapter's DoRA magnitude is {_fmt(mod.magnitude.shape)}, {where}, it was made for a "
                    "different base architecture; use the base it was trained on"
                )
            got_down, got_up = tuple(mod.down.shape), tuple(mod.up.shape)
            if got_down != want_down or got_up != want_up:
                implied = (
                    (got_up[0], got_down[1], *got_down[2:])
                    if len(got_down) == 4
                    else (got_up[0], got_down[1])
                )
                raise AdapterError(
                    f"adapter does not fit the base: module {component}.{mpath} has weight {_fmt(weight)} "
                    f"but the adapter's LoRA is {_fmt(implied)} (down {_fmt(got_down)}, up {_fmt(got_up)}), "
                    f"{where}, it was made for a different base architecture; use the base it was trained on"
                )
            mapping[component][path] = mpath
    if missing:
        if len(missing) == total:
            raise AdapterError(
                f"none of the adapter's {total} modules exist in the base (first: {missing[0]}), {where}, "
                "it was made for a different base model; use the base it was trained on"
            )
        raise AdapterError(
            f"{len(missing)} of the adapter's {total} modules do not exist in the base (first: {missing[0]}), "
            f"{where}, it was made for a different base model; use the base it was trained on"
        )
    return mapping
