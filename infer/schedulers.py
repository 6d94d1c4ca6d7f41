"""Scheduler names accepted by ``generate``: loracraft's short names and AUTOMATIC1111's sampler names.

No torch import: the CLI parser lists the names. The A1111 -> diffusers table is the one in
diffusers' scheduler overview ("A1111/k-diffusion" column); samplers it marks as having no
diffusers equivalent (DPM++ 2S a, DPM fast, DPM adaptive) are refused rather than approximated.
A1111's own "DDIM", "PLMS" and "UniPC" samplers map to DDIMScheduler, PNDMScheduler and
UniPCMultistepScheduler.
"""

from __future__ import annotations

from loracraft.infer.errors import UsageError

__all__ = ["SCHEDULERS", "A1111_SAMPLERS", "resolve_scheduler", "a1111_name", "scheduler_choices"]

#: loracraft's short names -> diffusers classes (built with the base's own config).
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "DPMSolverSinglestep": "DPMSolverSinglestepScheduler",
    "EulerAncestral": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "KDPM2": "KDPM2DiscreteScheduler",
    "KDPM2Ancestral": "KDPM2AncestralDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "DEIS": "DEISMultistepScheduler",
}

_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

#: A1111 ``Sampler:`` names -> (diffusers class, constructor overrides).
A1111_SAMPLERS: dict[str, tuple[str, dict]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", _KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
_NO_EQUIVALENT = ("DPM++ 2S a", "DPM++ 2S a Karras", "DPM fast", "DPM adaptive", "DPM++ 3M SDE")


def _key(name: str) -> str:
    """Case- and punctuation-insensitive: 'dpm++ 2m sde (karras)' == 'DPM++ 2M SDE Karras'."""
    return " ".join(name.replace("(", " ").replace(")", " ").replace("_", " ").lower().split())


def scheduler_choices() -> list[str]:
    """Every accepted spelling's canonical form, for help texts and menus."""
    return [*SCHEDULERS, *(n for n in A1111_SAMPLERS if n not in SCHEDULERS)]


def resolve_scheduler(name: str, *, schedule_type: str | None = None) -> tuple[str, str, dict]:
    """``name`` -> (canonical name, diffusers class name, constructor overrides).

    Accepts loracraft's short names, diffusers class names and A1111 sampler names, any case;
    ``schedule_type`` is A1111 1.6+'s separate ``Schedule type:`` field ("Karras" is appended).

    >>> resolve_scheduler("dpm++ 2m karras")
    ('DPM++ 2M Karras', 'DPMSolverMultistepScheduler', {'use_karras_sigmas': True})
    """
    text = str(name).strip()
    if schedule_type and _key(schedule_type) == "karras" and "karras" not in _key(text):
        text = f"{text} Karras"
    k = _key(text)
    for short, cls in SCHEDULERS.items():
        if k in (_key(short), _key(cls)):
            return short, cls, {}
    for a1111, (cls, kwargs) in A1111_SAMPLERS.items():
        if k == _key(a1111):
            return a1111, cls, dict(kwargs)
    if any(k == _key(n) for n in _NO_EQUIVALENT):
        raise UsageError(
            f"sampler {name!r} has no diffusers equivalent, --scheduler, use e.g. 'DPM++ 2M Karras' or 'Euler a'"
        )
    raise UsageError(f"unknown scheduler {name!r}, --scheduler, use one of {', '.join(scheduler_choices())}")


def a1111_name(cls_name: str, config: dict) -> str | None:
    """The A1111 sampler name for a diffusers scheduler class and its config, if there is one."""
    best = None
    for a1111, (cls, kwargs) in A1111_SAMPLERS.items():
        if cls != cls_name:
            continue
        overrides_match = all(config.get(key) == value for key, value in kwargs.items())
        if overrides_match and (best is None or len(kwargs) > len(A1111_SAMPLERS[best][1])):
            best = a1111
    return best
