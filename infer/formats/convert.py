"""Reading any LoRA file into a :class:`LoraAdapter`, writing it in either layout, and ``loracraft convert``."""

from __future__ import annotations

from pathlib import Path

from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.formats.checks import unsupported_key
from loracraft.infer.formats.diffusers import parse_diffusers_state, to_diffusers_state, unet_layout
from loracraft.infer.formats.files import read_tensors, resolve_adapter_file, write_safetensors
from loracraft.infer.formats.kohya import KOHYA_PREFIXES, KOHYA_WEIGHT_NAME, parse_kohya_state, to_kohya_state
from loracraft.infer.formats.model import LoraAdapter
from loracraft.infer.names import LORA_WEIGHT_NAME

FORMATS = ("diffusers", "kohya")
_DIFFUSERS_MARKERS = (
    ".lora_A.",
    ".lora_B.",
    ".lora.down.",
    ".lora.up.",
    ".lora_linear_layer.",
    "_lora.down.",
    "_lora.up.",
)


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
            adapter will be applied to; resolves kohya names the rules do not know.
        unet_layers_per_block: the target UNet's ``layers_per_block``, to number kohya SGM blocks
            when the file does not record its own (SDXL's 2 when unknown: only SDXL files use SGM names).

    Raises:
        AdapterError: missing file, damaged header, pickle refused, unknown layout, garbage values.
    """
    file, tensors, header = read_tensors(path, allow_pickle)
    fmt = detect_format(tensors.keys(), where=str(file))
    if fmt == "kohya":
        adapter = parse_kohya_state(
            tensors,
            header,
            module_names=module_names,
            where=str(file),
            unet_layers_per_block=unet_layers_per_block,
        )
    else:
        adapter = parse_diffusers_state(tensors, header, where=str(file))
    adapter.path = file
    return adapter


def detect_format(keys, where: str = "state dict") -> str:
    """``"kohya"`` if every key uses kohya prefixes, ``"diffusers"`` if keys look like diffusers/PEFT."""
    keys = list(keys)
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES)]
    for key in keys:
        err = unsupported_key(key, where, kohya=key in kohya)
        if err:
            raise err
    if kohya and len(kohya) == len(keys):
        return "kohya"
    if kohya:
        other = next(k for k in keys if not k.startswith(KOHYA_PREFIXES))
        raise AdapterError(
            f"adapter mixes kohya keys with others (e.g. {other!r}), {where}, re-export it in one format"
        )
    if any(m in k for k in keys for m in _DIFFUSERS_MARKERS):
        return "diffusers"
    raise AdapterError(
        f"not a LoRA adapter (first key {keys[0]!r} is neither diffusers/PEFT nor kohya), {where}, "
        "pass a LoRA .safetensors file (full model checkpoints go to --base)"
    )


def write_lora(
    adapter: LoraAdapter, path: str | Path, to: str = "diffusers", unet_layout: dict | None = None
) -> Path:
    """Write ``adapter`` atomically in format ``to`` (``"diffusers"`` or ``"kohya"``).

    ``unet_layout`` (see :func:`~loracraft.infer.formats.diffusers.unet_layout`) numbers kohya's SDXL
    block names; without it the adapter's own record (or the SDXL base's layout) is used.
    """
    if to not in FORMATS:
        raise UsageError(f"unknown adapter format {to!r}, --to, use one of {', '.join(FORMATS)}")
    tensors, metadata = to_kohya_state(adapter, unet_layout) if to == "kohya" else to_diffusers_state(adapter)
    return write_safetensors(path, tensors, metadata)


def base_unet_layout(base: str | Path) -> dict:
    """The block layout of ``base``'s UNet (a diffusers folder or a Hub id in the cache): its config only."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(str(base), subfolder="unet")
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"cannot read the base's UNet config ({reason}), --base {base}, pass a diffusers model folder or Hub id"
        ) from e
    return unet_layout(config)


def convert_lora_file(
    src: str | Path, dst: str | Path, to: str, *, allow_pickle: bool = False, base: str | Path | None = None
) -> Path:
    """``loracraft convert``: read ``src`` in either format, write ``dst`` in format ``to``.

    A folder ``dst`` (existing, or a path without a suffix) receives the format's default file name.
    ``base`` (a diffusers model) supplies the UNet layout kohya's SDXL names are numbered with.
    """
    if to not in FORMATS:
        raise UsageError(f"unknown adapter format {to!r}, --to, use one of {', '.join(FORMATS)}")
    layout = base_unet_layout(base) if base is not None else None
    _refuse_lycoris(src)
    adapter = read_lora(
        src, allow_pickle=allow_pickle, unet_layers_per_block=(layout or {}).get("layers_per_block") or 2
    )
    out = adapter_output_path(dst, to)
    if adapter.path is not None and out.resolve() == adapter.path.resolve():
        raise UsageError(f"output would overwrite the input, {dst}, choose another output path")
    return write_lora(adapter, out, to=to, unet_layout=layout)


def adapter_output_path(dst: str | Path, to: str, flag: str = "") -> Path:
    """The file an adapter in format ``to`` is written to for an output argument ``dst``: a folder
    (existing, a path without a suffix, or ending in a separator) gets the format's default file name.

    ``flag`` names the option in the error (``--out``); empty for a positional argument.
    """
    path = Path(dst).expanduser()
    if path.is_dir() or path.suffix == "" or str(dst).endswith(("/", "\\")):
        return path / (KOHYA_WEIGHT_NAME if to == "kohya" else LORA_WEIGHT_NAME)
    if path.suffix != ".safetensors":
        where = f"{flag} {dst}" if flag else str(dst)
        raise UsageError(
            f"output must be a .safetensors file or a folder, {where}, e.g. {path.with_suffix('.safetensors')}"
        )
    return path


def _refuse_lycoris(src: str | Path) -> None:
    """LoHa/LoKr: nothing to convert, and saying so beats "unsupported adapter"."""
    from loracraft.infer.formats.lycoris import is_lycoris_file

    path = resolve_adapter_file(src)
    if is_lycoris_file(path):
        raise UsageError(
            f"LoHa/LoKr weights are already in the kohya/LyCORIS layout that A1111, ComfyUI and kohya load, {path}, "
            "use the file as is (diffusers has no format for them; loracraft generate --lora loads it)"
        )
