"""Adapter tools: merge, resize, extract (operations on LoRA deltas)."""
