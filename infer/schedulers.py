"""Scheduler names accepted by ``generate`` (no torch import: the CLI parser lists them)."""

SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}
