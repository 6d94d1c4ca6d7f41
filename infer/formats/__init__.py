"""LoRA file formats: diffusers/PEFT safetensors with metadata, and the kohya/A1111/ComfyUI layout.

Two layouts of the same numbers exist in the wild, each in its own module:

* :mod:`.diffusers` - ``unet.<module>.lora_A.weight`` keys; the scale ``alpha / rank`` in the
  ``lora_adapter_metadata`` header as a ``LoraConfig`` per component.
* :mod:`.kohya` - ``lora_unet_<module with _>.lora_down.weight`` + a per-module ``.alpha``; SDXL UNet
  modules in kohya's SGM naming; training facts in ``ss_*`` header keys; DoRA as
  ``.dora_scale``.
* :mod:`.lycoris` - LoHa/LoKr in the kohya layout.

Both LoRA layouts are parsed into one neutral structure (:mod:`.model`: per module down, up, the
effective alpha such that ``scale = alpha / rank``, and a DoRA magnitude) and written back from it
(:mod:`.convert`); :mod:`.files` reads and writes the files, :mod:`.checks` refuses garbage values.
"""

from loracraft.infer.formats.checks import check_lora_config, check_module, check_tensor, unsupported_key
from loracraft.infer.formats.convert import (
    FORMATS,
    adapter_output_path,
    base_unet_layout,
    convert_lora_file,
    detect_format,
    read_lora,
    write_lora,
)
from loracraft.infer.formats.diffusers import (
    LORA_ADAPTER_METADATA_KEY,
    UNET_LAYOUT_KEY,
    build_lora_config,
    component_config,
    config_describes,
    config_module_params,
    parse_diffusers_state,
    parse_lora_adapter_metadata,
    save_diffusers_lora,
    to_diffusers_state,
    unet_layout,
)
from loracraft.infer.formats.files import (
    PICKLE_SUFFIXES,
    file_sha256,
    read_pickle,
    read_safetensors,
    resolve_adapter_file,
    tensors_sha256,
    write_safetensors,
)
from loracraft.infer.formats.kohya import (
    KOHYA_CONFIG_KEY,
    KOHYA_WEIGHT_NAME,
    SDXL_BASE_UNET,
    SS_METADATA_SOURCES,
    diffusers_to_sgm_unet_name,
    kohya_metadata,
    kohya_module_paths,
    kohya_name_to_module,
    model_module_table,
    module_to_kohya_name,
    parse_kohya_state,
    sgm_unet_names_to_diffusers,
    to_kohya_state,
)
from loracraft.infer.formats.model import (
    COMPONENTS,
    FAMILY_METADATA_KEY,
    LoraAdapter,
    LoraModule,
    adapter_family,
    family_evidence,
    most_common,
)
from loracraft.infer.names import LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME

__all__ = [
    "COMPONENTS", "FAMILY_METADATA_KEY", "FORMATS", "KOHYA_CONFIG_KEY", "KOHYA_WEIGHT_NAME",
    "LORA_ADAPTER_METADATA_KEY", "LORA_WEIGHT_NAME", "LYCORIS_WEIGHT_NAME", "PICKLE_SUFFIXES",
    "SDXL_BASE_UNET", "SS_METADATA_SOURCES", "UNET_LAYOUT_KEY", "LoraAdapter", "LoraModule",
    "adapter_family", "adapter_output_path", "base_unet_layout", "build_lora_config", "check_lora_config", "check_module",
    "check_tensor", "component_config", "config_describes", "config_module_params", "convert_lora_file",
    "detect_format", "diffusers_to_sgm_unet_name", "family_evidence", "file_sha256", "kohya_metadata",
    "kohya_module_paths", "kohya_name_to_module", "model_module_table", "module_to_kohya_name",
    "most_common", "parse_diffusers_state", "parse_kohya_state", "parse_lora_adapter_metadata",
    "read_lora", "read_pickle", "read_safetensors", "resolve_adapter_file", "save_diffusers_lora",
    "sgm_unet_names_to_diffusers", "tensors_sha256", "to_diffusers_state", "to_kohya_state",
    "unet_layout", "unsupported_key", "write_lora", "write_safetensors",
]  # fmt: skip
