"""``loracraft resize``: lower a LoRA's rank per layer by truncated SVD of its delta.

Each layer's ``dW = scale * up @ down`` is decomposed exactly (see :mod:`loracraft.infer.ops.delta`)
and its top ``k`` singular triplets kept - by Eckart-Young the best rank-``k`` approximation in
Frobenius norm. ``k`` is ``--rank`` or one of kohya's dynamic rules (``sv_ratio``, ``sv_fro``,
``sv_cumulative``) capped by ``--rank``. The new alpha is ``scale * k``, so each layer keeps its
old ``alpha / rank`` scale and the kept part of ``dW`` is applied unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from loracraft.infer.errors import UsageError
from loracraft.infer.formats import (
    LoraAdapter,
    LoraModule,
    adapter_family,
    file_sha256,
    read_lora,
    write_lora,
)
from loracraft.infer.ops.delta import (
    LayerReport,
    check_plain_lora,
    check_rank_args,
    choose_rank,
    clean_alpha,
    factors_from_svd,
    flat_factors,
    fresh_metadata,
    kept_fraction,
    note,
    output_file,
    svd_of_factors,
)

__all__ = ["resize_adapter", "resize_file", "resize_module"]


def resize_module(
    mod: LoraModule, rank: int | None, dynamic: str | None = None, param: float | None = None
) -> tuple[LoraModule, float]:
    """One layer at its new rank, and the share of ``||dW||_F`` it keeps."""
    up, down = flat_factors(mod)
    u, s, vh = svd_of_factors(up, down)
    k = choose_rank(s, rank, dynamic, param)
    new_up, new_down = factors_from_svd(
        u, s, vh, k, 1.0, tuple(mod.up.shape), tuple(mod.down.shape), mod.down.dtype
    )
    return LoraModule(new_down, new_up, clean_alpha(mod.scale * k)), kept_fraction(s, k)


def resize_adapter(
    adapter: LoraAdapter,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    where: str = "adapter",
) -> tuple[LoraAdapter, list[LayerReport]]:
    """Resize every layer of ``adapter``; returns the new adapter and one report per layer.

    Args:
        adapter: a plain LoRA (no DoRA) in either layout.
        rank: the new rank; with ``dynamic`` the largest rank any layer may get.
        dynamic: ``sv_ratio``, ``sv_fro`` or ``sv_cumulative`` (kohya's definitions).
        param: the dynamic rule's target.
        where: the input's name for error messages.

    Raises:
        UsageError: no rank rule, a rank <= 0 or above the adapter's largest layer rank, an
            unknown method or an out-of-range ``param``.
        AdapterError: a DoRA adapter.
    """
    check_rank_args(rank, dynamic, param)
    if rank is None and dynamic is None:
        raise UsageError(f"no new rank, {where}, pass --rank R or --dynamic sv_fro --param 0.9")
    check_plain_lora(adapter, where)
    largest = max(m.rank for _, _, m in adapter.items())
    if dynamic is None and rank > largest:
        raise UsageError(
            f"--rank {rank} is above the adapter's largest layer rank {largest} (an SVD cannot add rank), "
            f"{where}, pass --rank {largest} or less"
        )
    modules: dict[str, dict[str, LoraModule]] = {}
    reports: list[LayerReport] = []
    for component, name, mod in adapter.items():
        new, kept = resize_module(mod, rank, dynamic, param)
        modules.setdefault(component, {})[name] = new
        reports.append(LayerReport(f"{component}.{name}", mod.rank, new.rank, kept))
    metadata = fresh_metadata(adapter.metadata, modules, adapter_family(adapter))
    rule = {"rank": rank} if dynamic is None else {"dynamic": dynamic, "param": param, "max_rank": rank}
    source = {"file": adapter.path.name, "sha256": file_sha256(adapter.path)} if adapter.path else {}
    metadata["loracraft.resized_from"] = json.dumps({**source, **rule}, sort_keys=True)
    how = (
        f"to rank {rank}"
        if dynamic is None
        else f"by {dynamic} {param:g}" + (f" (max rank {rank})" if rank else "")
    )
    note(metadata, f"resized from rank {largest} {how} by loracraft")
    out = LoraAdapter(modules, metadata=metadata, source_format=adapter.source_format)
    return out, reports


def resize_file(
    src: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    to: str | None = None,
) -> tuple[Path, list[LayerReport]]:
    """``loracraft resize``: read ``src`` (either layout), write the resized adapter to ``out``.

    The output keeps the input's layout unless ``to`` names one; a folder ``out`` receives the
    layout's default file name.
    """
    check_rank_args(rank, dynamic, param)
    adapter = read_lora(src)
    fmt = to or adapter.source_format
    path = output_file(out, fmt, [adapter.path])
    resized, reports = resize_adapter(adapter, rank, dynamic, param, where=str(adapter.path))
    return write_lora(resized, path, to=fmt), reports
