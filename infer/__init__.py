"""loracraft.infer: everything needed to *use* a LoRA adapter (the lower layer; never imports train)."""

from loracraft.infer.errors import LoracraftError

__all__ = ["LoracraftError"]
