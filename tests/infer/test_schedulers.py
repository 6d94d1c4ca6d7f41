"""--scheduler names: ours and A1111's, against the table in diffusers' scheduler overview."""

from __future__ import annotations

import diffusers
import pytest
import torch

from loracraft.infer.errors import UsageError
from loracraft.infer.generation import generate, scheduler_name, set_scheduler
from loracraft.infer.models import load_base
from loracraft.infer.schedulers import SCHEDULERS, a1111_name, resolve_scheduler

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}

# diffusers docs, api/schedulers/overview: "A1111/k-diffusion | Diffusers | Usage"
DOCUMENTED = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", KARRAS),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", SDE),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**SDE, **KARRAS}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", KARRAS),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", KARRAS),
    # A1111's own (non k-diffusion) samplers
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_a1111_names_map_to_the_documented_class_and_kwargs(name):
    cls, kwargs = DOCUMENTED[name]
    for spelling in (name, name.lower(), name.upper()):
        _, got_cls, got_kwargs = resolve_scheduler(spelling)
        assert (got_cls, got_kwargs) == (cls, kwargs)
    assert a1111_name(cls, {**getattr(diffusers, cls)().config, **kwargs}) == name


@pytest.mark.parametrize(
    "spelling, name",
    [("DPM++ 2M SDE (Karras)", "DPM++ 2M SDE Karras"), ("euler_a", "Euler a"), ("EulerAncestral", "EulerAncestral"),
     ("eulerdiscretescheduler", "Euler"), ("dpmsolvermultistep", "DPMSolverMultistep")],
)  # fmt: skip
def test_spellings(spelling, name):
    assert resolve_scheduler(spelling)[0] == name


def test_a1111_schedule_type_field():
    assert resolve_scheduler("DPM++ 2M", schedule_type="Karras")[1:] == (
        "DPMSolverMultistepScheduler",
        KARRAS,
    )
    assert resolve_scheduler("DPM++ 2M Karras", schedule_type="Karras")[0] == "DPM++ 2M Karras"


@pytest.mark.parametrize(
    "name, needle", [("DPM++ 2S a", "no diffusers equivalent"), ("Heun9", "unknown scheduler")]
)
def test_refused_names(name, needle):
    with pytest.raises(UsageError) as e:
        resolve_scheduler(name)
    assert needle in str(e.value) and "--scheduler" in str(e.value)


def test_short_names_are_the_plain_classes():
    for short, cls in SCHEDULERS.items():
        assert resolve_scheduler(short) == (short, cls, {})
        assert isinstance(getattr(diffusers, cls), type)


def test_a1111_name_builds_the_scheduler_and_is_recorded(tiny_sd):
    pipe = load_base(tiny_sd)
    base = dict(pipe.scheduler.config)
    assert set_scheduler(pipe, "dpm++ 2m sde karras") == "DPM++ 2M SDE Karras"
    sched = pipe.scheduler
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config.use_karras_sigmas is True and sched.config.algorithm_type == "sde-dpmsolver++"
    assert sched.config.beta_schedule == base["beta_schedule"]  # built from the base's own config
    img = generate(pipe, "a red circle", seed=1, steps=2)[0]
    assert img.record.scheduler == "DPM++ 2M SDE Karras" == scheduler_name(pipe)
    assert "Sampler: DPM++ 2M SDE Karras," in img.record.a1111_parameters()
    set_scheduler(pipe, "DPMSolverMultistep")
    assert pipe.scheduler.config.use_karras_sigmas is False  # nothing leaks from the previous choice


def test_ddim_does_not_clip_latents_like_diffusers_own_pipeline(tiny_sd):
    """A PNDM config that does not name clip_sample (the tiny model's, the toy base's) would give DDIM
    its class default (True), clipping each predicted latent to [-1, 1]; diffusers'
    StableDiffusionPipeline turns it off when it is built with such a scheduler, and a swapped-in
    scheduler must match that pipeline's images."""
    pipe = load_base(tiny_sd)
    raw = dict(pipe.scheduler.config)
    assert "clip_sample" not in {k for k in raw if not k.startswith("_")} - set(raw.get("_use_default_values", []))
    assert diffusers.DDIMScheduler.from_config(raw).config.clip_sample is True  # the trap
    reference = diffusers.StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=diffusers.DDIMScheduler.from_config(raw), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    assert reference.scheduler.config.clip_sample is False  # diffusers' own rewrite
    set_scheduler(pipe, "DDIM")
    assert pipe.scheduler.config.clip_sample is False
    ours = generate(pipe, "a red circle", seed=3, steps=4, guidance=3.0)[0].image
    want = reference("a red circle", num_inference_steps=4, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(3)).images[0]
    assert list(ours.getdata()) == list(want.getdata())
