"""loracraft.infer: everything needed to *use* a LoRA adapter (the lower layer; never imports train).

>>> from loracraft.infer import load_base, load_adapters, generate
>>> pipe = load_base("path/to/sd15")                              # doctest: +SKIP
>>> load_adapters(pipe, ["style.safetensors:0.8"])                # doctest: +SKIP
>>> images = generate(pipe, "a red circle", seed=0, steps=25)      # doctest: +SKIP
>>> images[0].save("out.png")                                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from loracraft.infer.errors import AdapterError, LoracraftError, ModelError, UsageError

# Public names -> defining module. Loaded on first use (PEP 562) so that importing
# ``loracraft.infer.errors`` (the CLI does it first thing) does not pull in torch/diffusers.
_EXPORTS = {
    "BaseInfo": "loracraft.infer.models",
    "load_base": "loracraft.infer.models",
    "base_info": "loracraft.infer.models",
    "size_multiple": "loracraft.infer.models",
    "LoadedAdapter": "loracraft.infer.adapters",
    "load_adapter": "loracraft.infer.adapters",
    "load_adapters": "loracraft.infer.adapters",
    "loaded_adapters": "loracraft.infer.adapters",
    "parse_lora_arg": "loracraft.infer.adapters",
    "set_scales": "loracraft.infer.adapters",
    "fuse": "loracraft.infer.adapters",
    "unfuse": "loracraft.infer.adapters",
    "is_fused": "loracraft.infer.adapters",
    "unload": "loracraft.infer.adapters",
    "check_fit": "loracraft.infer.adapter_fit",
    "build_random_lora": "loracraft.infer.random_lora",
    "LORA_WEIGHT_NAME": "loracraft.infer.formats",
    "LoraAdapter": "loracraft.infer.formats",
    "LoraModule": "loracraft.infer.formats",
    "read_lora": "loracraft.infer.formats",
    "write_lora": "loracraft.infer.formats",
    "detect_format": "loracraft.infer.formats",
    "convert_lora_file": "loracraft.infer.formats",
    "save_diffusers_lora": "loracraft.infer.formats",
    "SCHEDULERS": "loracraft.infer.generation",
    "GenerationRecord": "loracraft.infer.generation",
    "GeneratedImage": "loracraft.infer.generation",
    "generate": "loracraft.infer.generation",
    "sweep_scales": "loracraft.infer.generation",
    "regenerate": "loracraft.infer.generation",
    "read_record": "loracraft.infer.generation",
    "save_png": "loracraft.infer.generation",
    "make_grid": "loracraft.infer.generation",
    "set_scheduler": "loracraft.infer.generation",
    "denoise": "loracraft.infer.denoise",
    "encode_prompts": "loracraft.infer.denoise",
}

__all__ = ["LoracraftError", "AdapterError", "ModelError", "UsageError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loracraft.infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from loracraft.infer.adapter_fit import check_fit  # noqa: F401
    from loracraft.infer.adapters import (  # noqa: F401
        LoadedAdapter,
        fuse,
        is_fused,
        load_adapter,
        load_adapters,
        loaded_adapters,
        parse_lora_arg,
        set_scales,
        unfuse,
        unload,
    )
    from loracraft.infer.denoise import denoise, encode_prompts  # noqa: F401
    from loracraft.infer.formats import (  # noqa: F401
        LORA_WEIGHT_NAME,
        LoraAdapter,
        LoraModule,
        convert_lora_file,
        detect_format,
        read_lora,
        save_diffusers_lora,
        write_lora,
    )
    from loracraft.infer.generation import (  # noqa: F401
        SCHEDULERS,
        GeneratedImage,
        GenerationRecord,
        generate,
        make_grid,
        read_record,
        regenerate,
        save_png,
        set_scheduler,
        sweep_scales,
    )
    from loracraft.infer.models import BaseInfo, base_info, load_base, size_multiple  # noqa: F401
    from loracraft.infer.random_lora import build_random_lora  # noqa: F401
