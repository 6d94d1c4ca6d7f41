"""``loracraft merge``: several LoRAs into one adapter, or baked into a base model.

Exact merge: for adapters ``i`` with weights ``w_i`` the merged change of a layer is
``sum_i w_i * s_i * up_i @ down_i`` (``s_i = alpha_i / rank_i``). Stacking the factors,
``up = [c_1 up_1 | c_2 up_2 | ...]`` and ``down = [down_1; down_2; ...]`` with ``c_i = w_i s_i``,
gives exactly that sum as one LoRA of rank ``sum_i rank_i`` at scale 1 (alpha = rank); each
``c_i`` is split as ``sqrt|c_i|`` over both factors. kohya's ``merge_lora.py`` instead adds the
``up`` and ``down`` matrices of equal-rank files (so cross terms ``up_1 @ down_2`` appear) and,
with ``--concat``, scales both factors by the ratio (squaring it) while keeping the first file's
alpha over the grown rank.

``--rank R`` truncates that exact sum per layer by SVD (:mod:`loracraft.infer.ops.delta`): the
best rank-``R`` approximation, without kohya's ``svd_merge_lora.py`` clamping of the factors at
their 99th percentile.

``--into-base`` loads the adapters onto the base through diffusers' LoRA loader (after
loracraft's fit checks), fuses them with the pipeline's ``fuse_lora``, drops the LoRA layers
with ``unload_lora_weights`` and writes the model with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from loracraft.infer.errors import AdapterError, ModelError, UsageError
from loracraft.infer.formats import (
    LoraAdapter,
    LoraModule,
    family_evidence,
    file_sha256,
    read_lora,
    write_lora,
)
from loracraft.infer.ops.delta import (
    LayerReport,
    check_plain_lora,
    check_rank_args,
    choose_rank,
    factors_from_svd,
    flat_factors,
    fresh_metadata,
    kept_fraction,
    output_file,
    svd_of_factors,
    widest_dtype,
)

__all__ = ["merge_adapters", "merge_files", "merge_into_base", "parse_specs"]

#: Header keys naming the base model an adapter was trained on (ours, then kohya's).
BASE_KEYS = ("loracraft.base_model", "ss_sd_model_name")


def parse_specs(specs: Sequence[str | tuple[str | Path, float]]) -> list[tuple[Path, float]]:
    """``["a.safetensors:0.7", ("b", 0.3)]`` -> ``[(Path, weight), ...]`` (weight 1 when omitted)."""
    from loracraft.infer.adapters import parse_lora_arg

    out = []
    for spec in specs:
        path, weight = spec if isinstance(spec, tuple) else parse_lora_arg(str(spec))
        out.append((Path(path), float(weight)))
    return out


def _base_name(adapter: LoraAdapter) -> str | None:
    return next((adapter.metadata[k] for k in BASE_KEYS if adapter.metadata.get(k)), None)


def check_compatible(adapters: list[LoraAdapter], allow_different_bases: bool = False) -> str | None:
    """One family (and one named base) for all inputs; returns the family if any input tells it."""
    families = [(family_evidence(a), a.path) for a in adapters]
    known = [(fam, why, p) for (fam, why), p in families if fam is not None]
    for fam, why, p in known[1:]:
        if fam != known[0][0]:
            raise AdapterError(
                f"adapters for different model families ({known[0][2]}: {known[0][0]}, {known[0][1]}; "
                f"{p}: {fam}, {why}), merge, merge adapters made for the same base"
            )
    bases = [(b, a.path) for a in adapters if (b := _base_name(a))]
    if not allow_different_bases:
        for b, p in bases[1:]:
            if b != bases[0][0]:
                raise AdapterError(
                    f"adapters trained on different bases ({bases[0][1]}: {bases[0][0]}; {p}: {b}), merge, "
                    "merge adapters of one base or pass --allow-different-bases if these name the same model"
                )
    return known[0][0] if known else None


def _check_shapes(name: str, parts: list[tuple[LoraModule, Path]]) -> None:
    first, first_path = parts[0]
    want = (first.up.shape[0], tuple(first.down.shape[1:]))
    for mod, path in parts[1:]:
        got = (mod.up.shape[0], tuple(mod.down.shape[1:]))
        if got != want:
            raise AdapterError(
                f"module {name} has different shapes in {first_path} (out {want[0]}, in {list(want[1])}) and "
                f"{path} (out {got[0]}, in {list(got[1])}), merge, the adapters were made for different "
                "architectures; merge adapters of one base"
            )


def _concat(parts: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked flat ``(up, down)`` in float64 with ``up @ down = sum_i w_i s_i up_i @ down_i``."""
    ups, downs = [], []
    for mod, weight in parts:
        c = weight * mod.scale
        up, down = flat_factors(mod)
        root = abs(c) ** 0.5
        ups.append(up * (root if c >= 0 else -root))
        downs.append(down * root)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def merge_adapters(
    adapters: Sequence[tuple[LoraAdapter, float]],
    rank: int | None = None,
    allow_different_bases: bool = False,
) -> tuple[LoraAdapter, list[LayerReport]]:
    """Merge ``(adapter, weight)`` pairs into one adapter; exact without ``rank``.

    Returns the merged adapter and one report per layer (old rank = the summed ranks, kept =
    share of the exact merged delta's Frobenius norm; 1.0 for the exact merge).

    Raises:
        AdapterError: different families/bases, different shapes for one module, DoRA inputs.
        UsageError: ``rank`` <= 0 or above every layer's summed rank, no inputs, all weights zero.
    """
    if not adapters:
        raise UsageError("no adapters to merge, merge, pass two or more adapter files")
    check_rank_args(rank, None, None)
    for a, _ in adapters:
        check_plain_lora(a, str(a.path or "adapter"))
    family = check_compatible([a for a, _ in adapters], allow_different_bases)
    layers: dict[tuple[str, str], list[tuple[LoraModule, float, Path]]] = {}
    for a, weight in adapters:
        if weight == 0:
            continue  # contributes nothing; its modules must not appear as zero-rank layers
        for component, name, mod in a.items():
            layers.setdefault((component, name), []).append((mod, weight, a.path))
    if not layers:
        raise UsageError("every adapter has weight 0, merge, give at least one a non-zero weight")
    largest = max(sum(m.rank for m, _, _ in parts) for parts in layers.values())
    if rank is not None and rank > largest:
        raise UsageError(
            f"--rank {rank} is above the largest merged layer rank {largest}, merge, pass --rank {largest} or less "
            "(or drop --rank for the exact merge)"
        )
    modules: dict[str, dict[str, LoraModule]] = {}
    reports: list[LayerReport] = []
    for (component, name), parts in layers.items():
        _check_shapes(f"{component}.{name}", [(m, p) for m, _, p in parts])
        first = parts[0][0]
        dtype = widest_dtype(t for m, _, _ in parts for t in (m.up, m.down))
        up, down = _concat([(m, w) for m, w, _ in parts])
        total = up.shape[1]
        if rank is None:
            # Already exact; only the rank dimension is reshaped back to the layer's layout.
            new_up = up.reshape(first.up.shape[0], total, *first.up.shape[2:]).to(dtype).contiguous()
            new_down = down.reshape(total, *first.down.shape[1:]).to(dtype).contiguous()
            new, kept = LoraModule(new_down, new_up, total), 1.0
        else:
            u, s, vh = svd_of_factors(up, down)
            k = choose_rank(s, rank)
            new_up, new_down = factors_from_svd(
                u, s, vh, k, 1.0, tuple(first.up.shape), tuple(first.down.shape), dtype
            )
            new, kept = LoraModule(new_down, new_up, k), kept_fraction(s, k)
        modules.setdefault(component, {})[name] = new
        reports.append(LayerReport(f"{component}.{name}", total, new.rank, kept))
    metadata = _merged_metadata([a for a, _ in adapters], modules, family)
    metadata["loracraft.merged_from"] = json.dumps(
        [
            {
                "file": a.path.name if a.path else None,
                "weight": w,
                "sha256": file_sha256(a.path) if a.path else None,
            }
            for a, w in adapters
        ]
    )
    fmt = adapters[0][0].source_format
    return LoraAdapter(modules, metadata=metadata, source_format=fmt), reports


def _merged_metadata(adapters: list[LoraAdapter], modules, family: str | None) -> dict[str, str]:
    """Header entries every input agrees on (base, family, resolution...), none that differ."""
    first = adapters[0].metadata
    common = {k: v for k, v in first.items() if all(a.metadata.get(k) == v for a in adapters[1:])}
    return fresh_metadata(common, modules, family)


def merge_files(
    specs: Sequence[str | tuple[str | Path, float]],
    out: str | Path,
    *,
    rank: int | None = None,
    to: str | None = None,
    allow_different_bases: bool = False,
) -> tuple[Path, list[LayerReport]]:
    """``loracraft merge A:W B:W --out F``: read each file (either layout), write the merged adapter.

    The output uses the first input's layout unless ``to`` names one.
    """
    check_rank_args(rank, None, None)
    pairs = [(read_lora(p), w) for p, w in parse_specs(specs)]
    fmt = to or pairs[0][0].source_format
    path = output_file(out, fmt, [a.path for a, _ in pairs])
    merged, reports = merge_adapters(pairs, rank, allow_different_bases)
    return write_lora(merged, path, to=fmt), reports


# --------------------------------------------------------------------------------------------
# Into the base model
# --------------------------------------------------------------------------------------------
SINGLE_FILE_REFUSAL = (
    "diffusers has no writer for single-file Stable Diffusion checkpoints, --single-file, drop it to write "
    "a diffusers folder (it loads with from_pretrained and `loracraft generate --base`; diffusers' "
    "scripts/convert_diffusers_to_original_stable_diffusion.py turns it into one file)"
)


def _check_out_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder exists and is not empty, --out {out}, choose a new folder")


def merge_into_base(
    base: str | Path,
    specs: Sequence[str | tuple[str | Path, float]],
    out: str | Path,
    *,
    single_file: bool = False,
    dtype: str | None = None,
    base_config: str | Path | None = None,
) -> Path:
    """Bake adapters (with their weights) into ``base`` and save a diffusers folder at ``out``.

    The folder appears complete or not at all (written beside ``out``, then renamed).

    Args:
        base: diffusers folder, hub id or single-file checkpoint.
        specs: ``PATH[:WEIGHT]`` strings or ``(path, weight)`` pairs.
        out: a new (or empty) folder.
        single_file: refused - diffusers cannot write one (see :data:`SINGLE_FILE_REFUSAL`).
        dtype: the saved weights' dtype (default: the base's, fused in float32 either way).
        base_config: diffusers config folder for a single-file ``base``.
    """
    from loracraft.infer.adapters import load_adapters
    from loracraft.infer.models import load_base, parse_dtype

    if single_file:
        raise UsageError(SINGLE_FILE_REFUSAL)
    out = Path(out).expanduser()
    _check_out_folder(out)
    pairs = parse_specs(specs)
    adapters = [read_lora(p) for p, _ in pairs]
    for a in adapters:
        check_plain_lora(a, str(a.path))
    check_compatible(adapters, allow_different_bases=True)
    save_dtype = parse_dtype(dtype) if dtype else _stored_dtype(base)
    pipe = load_base(base, torch_dtype=torch.float32, config=base_config)
    loaded = load_adapters(pipe, [(a.path, w) for a, (_, w) in zip(adapters, pairs, strict=True)])
    components = [
        c
        for c in ("unet", "text_encoder", "text_encoder_2")
        if getattr(getattr(pipe, c, None), "peft_config", None)
    ]
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=[x.name for x in loaded])
    pipe.unload_lora_weights()
    _cast(pipe, save_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _record_merge(tmp, base, [(a.path, w) for a, (_, w) in zip(adapters, pairs, strict=True)])
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cast(pipe, dtype: torch.dtype) -> None:
    """Cast after fusing in float32; diffusers warns that ``to()`` ignores ``_keep_in_fp32_modules``, which
    Stable Diffusion's UNet, VAE and text encoders leave empty."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.to(dtype)
    finally:
        diffusers_logging.set_verbosity(before)


def _stored_dtype(base: str | Path) -> torch.dtype:
    """The dtype of the base's UNet weights on disk (a fp16 base stays fp16), else float32."""
    from safetensors import safe_open

    folder = Path(base).expanduser() / "unet"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return torch.float32
    with safe_open(str(files[0]), framework="pt") as fh:
        key = next(iter(fh.keys()), None)
        stored = fh.get_slice(key).get_dtype() if key else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(stored, torch.float32)


def _record_merge(folder: Path, base: str | Path, pairs: list[tuple[Path, float]]) -> None:
    """A ``loracraft_merge.json`` beside ``model_index.json``: which adapters, weights and hashes."""
    from loracraft.infer.io import write_json_atomic

    if not (folder / "model_index.json").is_file():
        raise ModelError(f"save_pretrained wrote no model_index.json, {folder}, report this")
    write_json_atomic(
        folder / "loracraft_merge.json",
        {
            "base": str(base),
            "adapters": [{"file": str(p), "weight": w, "sha256": file_sha256(p)} for p, w in pairs],
        },
    )
