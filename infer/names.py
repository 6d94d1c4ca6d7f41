"""File names shared by both layers, importable without torch (the CLI parser needs them)."""

#: The diffusers adapter file name (``diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: LoHa/LoKr adapters (kohya/LyCORIS layout: A1111, ComfyUI, kohya; diffusers cannot load them).
LYCORIS_WEIGHT_NAME = "lycoris_weights.safetensors"


def run_adapter_file(run_dir):
    """The final adapter of a loracraft run folder: the diffusers LoRA file, or the LyCORIS file of
    a LoHa/LoKr run (``pathlib.Path``; may not exist for unfinished runs)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    lycoris = run_dir / LYCORIS_WEIGHT_NAME
    return lycoris if lycoris.is_file() and not (run_dir / LORA_WEIGHT_NAME).is_file() else run_dir / LORA_WEIGHT_NAME
