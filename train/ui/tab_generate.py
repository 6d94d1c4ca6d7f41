"""The Generate tab: a base model, up to three adapters with their scales, one image or a scale sweep.

Its two buttons are the UI's public API (``/generate``, ``/scale_sweep``): their parameters are
the tab's fields, one by one, so ``gradio_client`` callers name them (``base``, ``lora_1``,
``scale_1``, ..., ``scheduler``). Inside, those fields travel as one :class:`GenerateRequest`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import gradio as gr

from loracraft.train.ui.common import INTERNAL, UIContext, user_errors

ADAPTER_SLOTS = 3
DEFAULT_SCHEDULER = "model default"


@dataclass(frozen=True)
class GenerateRequest:
    """The Generate tab's fields, as the API receives them (numbers arrive as floats or None)."""

    base: str
    lora_1: str = ""
    scale_1: float = 1.0
    lora_2: str = ""
    scale_2: float = 1.0
    lora_3: str = ""
    scale_3: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    seed: float = 0
    steps: float = 25
    guidance: float = 7.5
    width: float | None = 0
    height: float | None = 0
    scheduler: str = DEFAULT_SCHEDULER

    def adapters(self) -> list[tuple[str, float]]:
        """The filled-in adapter slots as ``(path, scale)``."""
        slots = [(self.lora_1, self.scale_1), (self.lora_2, self.scale_2), (self.lora_3, self.scale_3)]
        return [
            (path.strip(), float(scale if scale is not None else 1.0))
            for path, scale in slots
            if (path or "").strip()
        ]

    def generate_kwargs(self) -> dict:
        """Keyword arguments of :func:`loracraft.infer.generation.generate` (0 / -1 mean "default")."""
        seed = self.seed
        return dict(
            prompt=self.prompt or "",
            negative_prompt=(self.negative_prompt or None),
            seed=None if seed is None or int(seed) < 0 else int(seed),
            steps=int(self.steps),
            guidance=float(self.guidance),
            width=int(self.width) if self.width else None,
            height=int(self.height) if self.height else None,
            scheduler=None if not self.scheduler or self.scheduler == DEFAULT_SCHEDULER else self.scheduler,
        )


_REQUEST_PARAMS = [
    p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, default=inspect.Parameter.empty)
    for p in inspect.signature(GenerateRequest).parameters.values()
]


def takes_request(fn):
    """Let Gradio call ``fn(request, *rest)`` with the tab's fields spread out as separate inputs.

    Gradio names API parameters after the listener's signature, so the wrapper shows the
    request's fields followed by ``fn``'s own remaining parameters.
    """
    rest = list(inspect.signature(fn).parameters.values())[1:]
    count = len(_REQUEST_PARAMS)

    @functools.wraps(fn)
    def wrapper(*values):
        return fn(GenerateRequest(*values[:count]), *values[count:])

    wrapper.__signature__ = inspect.Signature([*_REQUEST_PARAMS, *rest])
    wrapper.__annotations__ = {}  # the dataclass' annotations are strings Gradio need not resolve
    return wrapper


@dataclass
class GenerateTab:
    base: gr.Textbox
    slots: list  # path, scale, path, scale, ...
    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Number
    height: gr.Number
    scheduler: gr.Dropdown
    go: gr.Button
    scales: gr.Textbox
    sweep: gr.Button
    image: gr.Image
    file: gr.File
    params: gr.Textbox
    gallery: gr.Gallery
    files: gr.File

    @property
    def request_inputs(self) -> list:
        """The components in :class:`GenerateRequest` field order."""
        return [
            self.base, *self.slots, self.prompt, self.negative, self.seed, self.steps, self.guidance,
            self.width, self.height, self.scheduler,
        ]  # fmt: skip


def _adapter_slots() -> list:
    slots = []
    for i in range(1, ADAPTER_SLOTS + 1):
        with gr.Row():
            path = gr.Textbox(
                label=f"Adapter {i} (file or run folder, optional)",
                value="",  # a value makes the argument optional for API clients
                scale=3,
                elem_id=f"gen-lora-{i}",
            )
            scale = gr.Slider(
                -1.0, 2.0, value=1.0, step=0.05, label=f"Adapter {i} scale", scale=2, elem_id=f"gen-scale-{i}"
            )
        slots += [path, scale]
    return slots


def _settings() -> dict:
    from loracraft.infer.generation import SCHEDULERS

    with gr.Row():
        seed = gr.Number(label="Seed (-1 = random)", value=0, precision=0, elem_id="gen-seed")
        steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="gen-steps")
        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance (CFG)", elem_id="gen-guidance")
    with gr.Row():
        size = dict(value=0, minimum=0, precision=0)
        width = gr.Number(label="Width (0 = model's own)", elem_id="gen-width", **size)
        height = gr.Number(label="Height (0 = model's own)", elem_id="gen-height", **size)
        scheduler = gr.Dropdown(
            [DEFAULT_SCHEDULER, *SCHEDULERS],
            value=DEFAULT_SCHEDULER,
            label="Scheduler",
            elem_id="gen-scheduler",
        )
    return dict(seed=seed, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler)


def _results() -> dict:
    image = gr.Image(
        label="Result",
        type="filepath",
        format="png",
        interactive=False,
        height=300,
        elem_id="gen-image",
        elem_classes="pixel",
    )
    file = gr.File(
        label="Download PNG (prompt, seed, adapters and scales embedded)",
        interactive=False,
        height=90,
        elem_id="gen-file",
    )
    params = gr.Textbox(label="Recorded parameters", lines=3, interactive=False, elem_id="gen-params")
    gallery = gr.Gallery(
        label="Scale sweep (left to right: each multiplier)",
        columns=5,
        height=220,
        format="png",
        elem_id="gen-sweep-gallery",
        elem_classes="pixel",
        interactive=False,
    )
    files = gr.File(
        label="Download sweep (one PNG per scale, plus the grid)",
        file_count="multiple",
        interactive=False,
        elem_id="gen-sweep-files",
    )
    return dict(image=image, file=file, params=params, gallery=gallery, files=files)


def layout() -> GenerateTab:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("4 · Generate", id="generate"), gr.Row():
        with gr.Column(scale=3):
            base = gr.Textbox(label="Base model", elem_id="gen-base")
            slots = _adapter_slots()
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", value="", elem_id="gen-negative")
            settings = _settings()
            go = gr.Button("Generate", variant="primary", elem_id="gen-generate")
            with gr.Row():
                scales = gr.Textbox(
                    value="0, 0.5, 1",
                    scale=3,
                    elem_id="gen-sweep-scales",
                    label="Scale sweep: multipliers applied to every adapter's scale",
                )
                sweep = gr.Button("Run scale sweep", scale=1, elem_id="gen-sweep")
        with gr.Column(scale=2):
            results = _results()
    return GenerateTab(
        base=base, slots=slots, prompt=prompt, negative=negative, go=go, scales=scales, sweep=sweep,
        **settings, **results,
    )  # fmt: skip


def wire(ctx: UIContext, tab: GenerateTab) -> None:
    """The two API endpoints and their buttons (Enter in the prompt generates too)."""

    @takes_request
    def generate_image(request: GenerateRequest):
        """Generate one image with a base model and up to three LoRA adapters; returns the PNG
        (with its generation record embedded) twice (display, download) and the recorded parameters."""
        from loracraft.infer.generation import read_record

        paths = ctx.generator.generate(request.base, request.adapters(), **request.generate_kwargs())
        path = str(paths[0])
        return path, path, read_record(path).a1111_parameters()

    outputs = [tab.image, tab.file, tab.params]
    tab.go.click(user_errors(generate_image), tab.request_inputs, outputs, api_name="generate")
    tab.prompt.submit(user_errors(generate_image), tab.request_inputs, outputs, **INTERNAL)

    @takes_request
    def scale_sweep(request: GenerateRequest, scales: str):
        """The same image at several LoRA strengths (multipliers of every adapter's scale)."""
        from loracraft.infer.cli import _parse_sweep

        multipliers = _parse_sweep(scales or "")
        cells, grid = ctx.generator.sweep(
            request.base, request.adapters(), multipliers, **request.generate_kwargs()
        )
        gallery = [(str(p), f"scale ×{s:g}") for p, s in cells]
        return gallery, [str(p) for p, _ in cells] + [str(grid)]

    tab.sweep.click(
        user_errors(scale_sweep),
        [*tab.request_inputs, tab.scales],
        [tab.gallery, tab.files],
        api_name="scale_sweep",
    )
