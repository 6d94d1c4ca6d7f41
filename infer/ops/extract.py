"""``loracraft extract``: a LoRA approximating a full fine-tune, from its difference to the base.

For every targeted layer, ``dW = W_tuned - W_base`` (a Conv2d flattened to ``(out, in*kh*kw)``)
is decomposed by a full SVD and its top ``k`` triplets become ``up``/``down`` (alpha = k, scale 1):
the best rank-``k`` approximation in Frobenius norm, whose relative error
``sqrt(sum_{i>k} S_i^2 / sum S_i^2)`` is reported per layer. kohya's
``extract_lora_from_models.py`` additionally clamps the factors at their 99th percentile, which
moves the result off that optimum; nothing is clamped here.

Targets follow kohya's LoRA: Linear and 1x1 Conv2d layers in the UNet's transformer blocks, the
text encoders' attention and MLP layers (a text encoder whose layers all match the base is left
out), and with ``conv_rank`` the ResNet/up/down-sampler layers (3x3 convs at ``conv_rank``).

Memory: tensors are read one pair at a time straight from the safetensors files (``safe_open``),
so the peak is one layer's base, tuned and delta matrices plus the (small) factors kept so far -
never a whole model, let alone three.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import ModelError, UsageError
from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    UNET_LAYOUT_KEY,
    LoraAdapter,
    LoraModule,
    base_unet_layout,
    write_lora,
)
from loracraft.infer.ops.delta import (
    LayerReport,
    check_rank_args,
    choose_rank,
    factors_from_svd,
    kept_fraction,
    network_metadata,
    output_file,
    svd_of_matrix,
)

__all__ = ["ExtractResult", "extract_lora", "extract_file", "target_rank"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_INDEX_SUFFIX = ".safetensors.index.json"
_CONV_PARTS = (".resnets.", ".downsamplers.", ".upsamplers.")


@dataclass
class ExtractResult:
    adapter: LoraAdapter
    reports: list[LayerReport]
    #: ``{component: number of targeted layers equal to the base (within min_diff)}``.
    unchanged: dict[str, int]


def target_rank(
    component: str, key: str, shape: tuple[int, ...], rank: int, conv_rank: int | None
) -> int | None:
    """The rank a weight gets, or ``None`` when it is not extracted (see the module docstring)."""
    if not key.endswith(".weight") or len(shape) not in (2, 4):
        return None
    if component != "unet":
        return rank if len(shape) == 2 and ".encoder.layers." in f".{key}" else None
    pointwise = len(shape) == 2 or tuple(shape[2:]) == (1, 1)
    if ".attentions." in key:
        return rank if pointwise else None
    if conv_rank is not None and any(p in key for p in _CONV_PARTS):
        return rank if pointwise else conv_rank
    return None


class _Weights:
    """Lazy access to one component's tensors across its (possibly sharded) safetensors files."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.folder = folder
        files = _weight_files(folder)
        self.handles = {
            f: stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files
        }
        self.where: dict[str, Path] = {}
        for f, h in self.handles.items():
            for key in h.keys():
                self.where[key] = f

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def _weight_files(folder: Path) -> list[Path]:
    """The component's safetensors files: the shard index if any, else the one weights file.

    A variant (``*.fp16.safetensors``) is used only when it is the folder's sole weights file.
    """
    indexes = sorted(folder.glob(f"*{_INDEX_SUFFIX}"))
    plain = [i for i in indexes if i.name.count(".") == 3]  # name.safetensors.index.json
    for index in plain or indexes[:1]:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / f for f in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    main = [f for f in files if f.name.count(".") == 1]
    if len(main) == 1:
        return main
    if len(files) == 1:
        return files
    what = "no .safetensors weights" if not files else f"{len(files)} candidate weight files"
    raise ModelError(
        f"{what} in {folder}, extract, re-save the model with save_pretrained(safe_serialization=True)"
    )


@contextlib.contextmanager
def _as_folder(model: str | Path, config: str | Path | None, flag: str) -> Iterator[Path]:
    """A diffusers folder for ``model``; a single-file checkpoint is converted into a temp folder
    (one model in memory while it is re-saved, released before extraction starts)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"not a diffusers folder (no model_index.json), {flag} {model}, pass a model folder"
            )
        yield path
        return
    if not path.is_file():
        raise ModelError(
            f"model not found, {flag} {model}, pass a diffusers folder or a .safetensors checkpoint"
        )
    from loracraft.infer.models import load_base

    with tempfile.TemporaryDirectory(prefix="loracraft-extract-") as tmp:
        pipe = load_base(path, config=config)
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        yield Path(tmp)


def _components(base: Path, tuned: Path) -> list[str]:
    present = []
    for c in COMPONENTS:
        a, b = (base / c).is_dir(), (tuned / c).is_dir()
        if a != b:
            raise ModelError(
                f"{c} exists in only one model ({base if a else tuned}), extract, "
                "pass a base and a fine-tune of the same architecture"
            )
        if a:
            present.append(c)
    return present


def _layers(component: str, base: _Weights, tuned: _Weights, rank: int, conv_rank: int | None):
    """``[(key, rank)]`` of the layers to extract; refuses a shape that differs between the models."""
    out = []
    for key in sorted(base.where):
        shape = base.shape(key)
        r = target_rank(component, key, shape, rank, conv_rank)
        if r is None:
            continue
        if key not in tuned.where or tuned.shape(key) != shape:
            got = list(tuned.shape(key)) if key in tuned.where else "missing"
            raise ModelError(
                f"{component}.{key} is {list(shape)} in the base but {got} in the tuned model, extract, "
                "pass a fine-tune of this base (same architecture)"
            )
        out.append((key, r))
    return out


def _module_path(component: str, key: str) -> str:
    path = key.removesuffix(".weight")
    if component != "unet":  # loracraft names text encoder modules text_model.encoder... (as kohya files do)
        path = f"text_model.{path.removeprefix('text_model.')}"
    return path


def _extract_layer(delta: torch.Tensor, r: int) -> tuple[LoraModule, float, int]:
    """One layer's factors (on the CPU) from its dense delta (on any device)."""
    shape = tuple(delta.shape)
    mat = delta.reshape(shape[0], -1)
    full = min(mat.shape)
    u, s, vh = svd_of_matrix(mat)
    k = choose_rank(s, min(r, full))
    up_shape = (shape[0], 0, 1, 1) if len(shape) == 4 else (shape[0], 0)
    up, down = factors_from_svd(u, s, vh, k, 1.0, up_shape, (0, *shape[1:]), torch.float32)
    return LoraModule(down.cpu(), up.cpu(), k), kept_fraction(s, k), full


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UsageError(f"unknown torch device {device!r}, --device, use cpu or cuda") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"no CUDA device here, --device {device}, use --device cpu")


def extract_lora(
    base: str | Path,
    tuned: str | Path,
    rank: int,
    conv_rank: int | None = None,
    *,
    min_diff: float = 0.0,
    base_config: str | Path | None = None,
    progress: bool | None = None,
    device: str = "cpu",
) -> ExtractResult:
    """Extract a LoRA of ``rank`` (``conv_rank`` for 3x3 convs) approximating ``tuned - base``.

    Args:
        base, tuned: diffusers folders or single-file checkpoints of one architecture.
        rank: rank of Linear/1x1 layers (capped per layer at ``min(out, in)``).
        conv_rank: rank of 3x3 convs; also switches on the ResNet/sampler layers.
        min_diff: a layer whose largest ``|dW|`` is at most this is taken as unchanged and skipped.
        base_config: diffusers config folder for single-file checkpoints.
        progress: tqdm bar (``None``: only on a terminal).
        device: where the SVDs run (``cuda`` is much faster on SDXL-sized layers).

    Raises:
        UsageError: rank <= 0, both paths the same model, nothing changed.
        ModelError: missing/unreadable models, different families or architectures.
    """
    from tqdm.auto import tqdm

    from loracraft.infer.models import folder_family

    check_rank_args(rank, None, None)
    check_rank_args(conv_rank, None, None, flag="--conv-rank")
    _check_device(device)
    if min_diff < 0:
        raise UsageError(
            f"--min-diff must be >= 0, --min-diff {min_diff}, e.g. 0 (skip only identical layers)"
        )
    with contextlib.ExitStack() as stack:
        base_dir = stack.enter_context(_as_folder(base, base_config, "--base"))
        tuned_dir = stack.enter_context(_as_folder(tuned, base_config, "--tuned"))
        if base_dir.resolve() == tuned_dir.resolve():
            raise UsageError(
                f"--base and --tuned are the same model, {base}, pass the fine-tuned model as --tuned"
            )
        family, tuned_family = folder_family(base_dir), folder_family(tuned_dir)
        if family != tuned_family:
            raise ModelError(
                f"base is {family} but the tuned model is {tuned_family}, extract, pass a fine-tune of this base"
            )
        layout = json.dumps(base_unet_layout(base_dir), sort_keys=True)  # numbers kohya's SDXL names
        plan = []
        for c in _components(base_dir, tuned_dir):
            wb, wt = _Weights(base_dir / c, stack), _Weights(tuned_dir / c, stack)
            plan += [(c, key, r, wb, wt) for key, r in _layers(c, wb, wt, rank, conv_rank)]
        modules: dict[str, dict[str, LoraModule]] = {}
        reports: list[LayerReport] = []
        unchanged: dict[str, int] = {}
        with torch.no_grad():
            for c, key, r, wb, wt in tqdm(
                plan, desc="extract", unit="layer", disable=None if progress is None else not progress
            ):
                delta = wt.get(key).to(device, torch.float32) - wb.get(key).to(device, torch.float32)
                if float(delta.abs().max()) <= min_diff:
                    unchanged[c] = unchanged.get(c, 0) + 1
                    continue
                mod, kept, full = _extract_layer(delta, r)
                del delta
                name = _module_path(c, key)
                modules.setdefault(c, {})[name] = mod
                reports.append(LayerReport(f"{c}.{name}", full, mod.rank, kept))
    if not modules:
        raise UsageError(
            f"the tuned model equals the base in every targeted layer, --tuned {tuned}, "
            "pass the fine-tuned model (or a smaller --min-diff)"
        )
    metadata = {
        FAMILY_METADATA_KEY: family,
        UNET_LAYOUT_KEY: layout,
        "loracraft.base_model": str(base),
        "ss_sd_model_name": Path(str(base)).name,
        "loracraft.extracted_from": json.dumps(
            {
                "base": str(base),
                "tuned": str(tuned),
                "rank": rank,
                "conv_rank": conv_rank,
                "min_diff": min_diff,
            }
        ),
        **network_metadata(modules),
    }
    if family == "sdxl":
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    return ExtractResult(
        LoraAdapter(modules, metadata=metadata, source_format="diffusers"), reports, unchanged
    )


def extract_file(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    to: str = "diffusers",
    min_diff: float = 0.0,
    base_config: str | Path | None = None,
    progress: bool | None = None,
    device: str = "cpu",
) -> tuple[Path, ExtractResult]:
    """``loracraft extract``: write the extracted adapter to ``out`` in layout ``to``."""
    check_rank_args(rank, None, None)
    path = output_file(out, to, [])
    result = extract_lora(
        base,
        tuned,
        rank,
        conv_rank,
        min_diff=min_diff,
        base_config=base_config,
        progress=progress,
        device=device,
    )
    return write_lora(result.adapter, path, to=to), result
