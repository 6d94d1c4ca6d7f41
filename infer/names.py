"""File names shared by both layers, importable without torch (the CLI parser needs them)."""

#: The diffusers adapter file name (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: LoHa/LoKr adapters (kohya/LyCORIS layout: A1111, ComfyUI, kohya; diffusers cannot load them).
LYCORIS_WEIGHT_NAME = "lycoris_weights.safetensors"
