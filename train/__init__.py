"""loracraft.train: everything needed to *make* a LoRA adapter (may import loracraft.infer)."""
