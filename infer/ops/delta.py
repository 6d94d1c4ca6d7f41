"""Per-layer LoRA delta math shared by ``merge``, ``resize`` and ``extract``.

A LoRA module changes a weight by ``dW = (alpha / rank) * up @ down``. For a Conv2d, ``up`` is
1x1 and ``down`` carries the kernel, so ``dW`` reshaped to ``(out, in * kh * kw)`` is again the
product of two matrices. Every tool here is "factor pairs in, truncated SVD, factor pairs out".

The SVD of a product is taken without forming the product (thin QR of both factors, then the
SVD of the small ``r x r`` core): exact up to float rounding, ``O((out + in) * r^2)`` work and
memory, where kohya's ``resize_lora.py`` multiplies the factors out and, above 2048 rows and
columns, switches to the randomised ``torch.svd_lowrank`` (two power iterations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    LoraAdapter,
    LoraModule,
)

__all__ = [
    "DYNAMIC_METHODS",
    "LayerReport",
    "check_plain_lora",
    "check_rank_args",
    "choose_rank",
    "factors_from_svd",
    "flat_factors",
    "format_report",
    "output_file",
    "svd_of_factors",
    "svd_of_matrix",
    "summary_line",
    "network_metadata",
]

#: kohya-ss/sd-scripts ``networks/resize_lora.py`` rank rules (same names, same definitions).
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
#: Largest singular value below which a layer counts as all zeros (kohya's ``MIN_SV``).
MIN_SV = 1e-6
#: Header keys that no longer describe the weights once they change (kohya's hashes of the file).
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "ss_network_dim", "ss_network_alpha")


@dataclass
class LayerReport:
    """What happened to one layer: ranks and the share of ``||dW||_F`` the output keeps."""

    name: str
    old_rank: int
    new_rank: int
    kept_fro: float

    @property
    def error(self) -> float:
        """Relative Frobenius error ``||dW - dW_k|| / ||dW||`` (Eckart-Young: sqrt(1 - kept^2))."""
        return math.sqrt(max(0.0, 1.0 - self.kept_fro**2))


# --------------------------------------------------------------------------------------------
# Validation shared by the commands
# --------------------------------------------------------------------------------------------
def check_plain_lora(adapter: LoraAdapter, where: str) -> None:
    """DoRA rescales each output column by a learned norm, so its deltas neither add nor factor."""
    for component, name, mod in adapter.items():
        if mod.magnitude is not None:
            raise AdapterError(
                f"DoRA adapter (module {component}.{name} has a magnitude vector): its weight change is not "
                f"up @ down, so it cannot be merged, resized or extracted exactly, {where}, use a plain LoRA"
            )


def check_rank_args(rank: int | None, dynamic: str | None, param: float | None, flag: str = "--rank") -> None:
    """Every problem with ``--rank/--dynamic/--param`` as one-line UsageErrors, before any math."""
    if rank is not None and rank <= 0:
        raise UsageError(f"rank must be a positive integer, {flag} {rank}, pass e.g. {flag} 4")
    if dynamic is None:
        if param is not None:
            raise UsageError(
                f"--param needs a method, --param {param}, add --dynamic {'|'.join(DYNAMIC_METHODS)}"
            )
        return
    if dynamic not in DYNAMIC_METHODS:
        raise UsageError(
            f"unknown --dynamic method {dynamic!r}, --dynamic, use one of {', '.join(DYNAMIC_METHODS)}"
        )
    if param is None or not math.isfinite(param):
        raise UsageError(
            f"--dynamic {dynamic} needs a target, --param, e.g. --param {_EXAMPLE_PARAM[dynamic]}"
        )
    if dynamic == "sv_ratio" and param < 1:
        raise UsageError(
            f"sv_ratio keeps singular values above max/param, so param must be >= 1, --param {param}, e.g. --param 4"
        )
    if dynamic != "sv_ratio" and not 0 < param <= 1:
        raise UsageError(
            f"{dynamic} is a fraction of the layer's norm, so param must be in (0, 1], --param {param}, e.g. 0.9"
        )


_EXAMPLE_PARAM = {"sv_ratio": 4, "sv_fro": 0.9, "sv_cumulative": 0.9}


def output_file(out: str | Path, fmt: str, inputs: list[Path]) -> Path:
    """The ``.safetensors`` path for ``--out`` (a folder gets the format's default file name)."""
    path = Path(out).expanduser()
    if path.is_dir() or path.suffix == "" or str(out).endswith(("/", "\\")):
        path = path / (KOHYA_WEIGHT_NAME if fmt == "kohya" else LORA_WEIGHT_NAME)
    elif path.suffix != ".safetensors":
        raise UsageError(
            f"output must be a .safetensors file or a folder, --out {out}, e.g. {path.with_suffix('.safetensors')}"
        )
    for src in inputs:
        if src is not None and path.resolve() == Path(src).resolve():
            raise UsageError(f"output would overwrite an input, --out {out}, choose another output path")
    return path


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------
def flat_factors(mod: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up (out, r), down (r, in*kh*kw))`` in float64: ``scale * up @ down`` is ``dW`` flattened."""
    up = mod.up.detach().to(torch.float64).reshape(mod.up.shape[0], -1)
    down = mod.down.detach().to(torch.float64).reshape(mod.down.shape[0], -1)
    return up, down


def svd_of_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``up @ down`` from its factors, never forming the product.

    ``up = Qu Ru`` and ``down.T = Qd Rd`` (thin QR), so ``up @ down = Qu (Ru Rd.T) Qd.T``; the SVD
    of the small core gives the singular values exactly and rotates ``Qu``/``Qd`` into the
    singular vectors. ``S`` has ``min(r, out, in)`` entries.
    """
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    uc, s, vhc = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ uc, s, vhc @ qd.T


def svd_of_matrix(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense 2-D matrix (full LAPACK SVD, no randomised shortcut)."""
    return torch.linalg.svd(mat, full_matrices=False)


def choose_rank(
    s: torch.Tensor, cap: int | None, dynamic: str | None = None, param: float | None = None
) -> int:
    """How many singular values to keep: ``cap``, or kohya's dynamic rule capped at ``cap``.

    Definitions as kohya's ``index_sv_*`` (``k = index + 1``):

    * ``sv_ratio``: keep every ``S_i > S_0 / param``;
    * ``sv_cumulative``: the smallest ``k`` with ``sum(S[:k]) / sum(S) >= param``;
    * ``sv_fro``: the smallest ``k`` with ``sqrt(sum(S[:k]^2) / sum(S^2)) >= param``.

    A layer that is all zeros keeps rank 1 (as kohya does), so the module stays in the file.
    """
    s = s.detach().to(torch.float64)
    n = int(s.numel())
    if n == 0 or float(s[0]) <= MIN_SV:
        return 1
    if dynamic is None:
        k = n
    elif dynamic == "sv_ratio":
        k = int((s > s[0] / param).sum())
    elif dynamic == "sv_cumulative":
        k = (
            int(
                torch.searchsorted(
                    torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param), dtype=torch.float64)
                )
            )
            + 1
        )
    else:  # sv_fro
        sq = s.pow(2)
        target = torch.tensor(float(param) ** 2, dtype=torch.float64)
        k = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), target)) + 1
    k = max(1, min(k, n))
    return min(k, cap) if cap is not None else k


def kept_fraction(s: torch.Tensor, k: int) -> float:
    """``||dW_k||_F / ||dW||_F`` for the top-``k`` truncation (1.0 for an all-zero layer)."""
    sq = s.detach().to(torch.float64).pow(2)
    total = float(sq.sum())
    return 1.0 if total == 0 else math.sqrt(float(sq[:k].sum()) / total)


def factors_from_svd(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    k: int,
    scale: float,
    up_shape: tuple[int, ...],
    down_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``k`` ``(up, down)`` with ``scale * up @ down = U_k S_k Vh_k``.

    ``sqrt(S / scale)`` goes to both factors, so neither carries the whole magnitude (kohya puts
    ``S`` into ``up``); balanced factors keep fp16/bf16 files from losing small singular values.
    ``up_shape``/``down_shape`` are the original shapes: only the rank dimension changes.
    """
    root = (s[:k].to(torch.float64) / scale).sqrt()
    up = (u[:, :k].to(torch.float64) * root).reshape(up_shape[0], k, *up_shape[2:])
    down = (root[:, None] * vh[:k].to(torch.float64)).reshape(k, *down_shape[1:])
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def widest_dtype(tensors) -> torch.dtype:
    """The output dtype: the most precise dtype among the inputs (float16 with bfloat16 gives float32)."""
    out = None
    for t in tensors:
        out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return out or torch.float32


# --------------------------------------------------------------------------------------------
# Reports and headers
# --------------------------------------------------------------------------------------------
def format_report(r: LayerReport) -> str:
    return (
        f"{r.name}: rank {r.old_rank} -> {r.new_rank}, kept {r.kept_fro:.2%} of the Frobenius norm "
        f"(error {r.error:.2%})"
    )


def summary_line(reports: list[LayerReport], path: Path | None = None) -> str:
    """One line: layers, rank range, kept norm (mean and worst layer), and the file written."""
    if not reports:
        return "no layers"
    ranks = [r.new_rank for r in reports]
    worst = min(reports, key=lambda r: r.kept_fro)
    mean = sum(r.kept_fro for r in reports) / len(reports)
    rank_text = (
        str(ranks[0])
        if min(ranks) == max(ranks)
        else f"{min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"
    )
    text = (
        f"{len(reports)} layers, rank {rank_text}, Frobenius norm kept: mean {mean:.2%}, "
        f"worst {worst.kept_fro:.2%} ({worst.name})"
    )
    if path is not None:
        text += f"; wrote {path} ({path.stat().st_size / 1e6:.2f} MB)"
    return text


def network_metadata(modules: dict[str, dict[str, LoraModule]]) -> dict[str, str]:
    """kohya's ``ss_network_dim``/``ss_network_alpha`` for new weights ("Dynamic" when they vary)."""
    ranks = {m.rank for mods in modules.values() for m in mods.values()}
    alphas = {m.alpha for mods in modules.values() for m in mods.values()}
    return {
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
    }


def fresh_metadata(
    metadata: dict[str, str], modules: dict[str, dict[str, LoraModule]], family: str | None
) -> dict[str, str]:
    """``metadata`` without the keys the new weights invalidate, plus their network shape and the
    model family written out (so ``generate`` can still refuse the wrong base for the new file)."""
    out = {k: v for k, v in metadata.items() if k not in STALE_KEYS}
    out.update(network_metadata(modules))
    if family is not None:
        out.setdefault(FAMILY_METADATA_KEY, family)
    return out


def note(metadata: dict[str, str], text: str) -> None:
    """Prepend ``text`` to ``ss_training_comment``: the one free-text key kohya files keep (kohya's
    own resize writes "dimension is resized from ..." there), so the history survives ``--to kohya``."""
    old = metadata.get("ss_training_comment")
    metadata["ss_training_comment"] = f"{text}; {old}" if old else text


def clean_alpha(alpha: float) -> float:
    """An alpha written as ``4`` rather than ``4.0`` when it is whole (what the readers return)."""
    alpha = float(alpha)
    return int(alpha) if alpha.is_integer() else alpha
