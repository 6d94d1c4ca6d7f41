"""The Train tab: a recipe, the main knobs mirrored into the full YAML, Start / Stop / Resume, progress."""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass

import gradio as gr

from loracraft.infer.errors import LoracraftError, UsageError
from loracraft.train.samples import prompt_line
from loracraft.train.ui import backend as B
from loracraft.train.ui.common import INTERNAL, UIContext, message, user_errors

KNOB_KEYS = list(B.KNOBS)
#: elem_id of each knob's field (the browser tests find them by it)
KNOB_IDS = {
    "lora.rank": "knob-rank",
    "lora.alpha": "knob-alpha",
    "train.max_steps": "knob-steps",
    "train.lr": "knob-lr",
    "data.resolution": "knob-resolution",
    "train.batch_size": "knob-batch",
    "train.seed": "knob-seed",
    "validation.prompts": "knob-prompts",
    "validation.every": "knob-val-every",
    "checkpoint.every": "knob-ckpt-every",
}
#: rows of knobs as laid out (validation.prompts gets a row of its own)
KNOB_ROWS = [
    ["lora.rank", "lora.alpha"],
    ["train.max_steps", "train.lr"],
    ["data.resolution", "train.batch_size", "train.seed"],
    ["validation.prompts"],
    ["validation.every", "checkpoint.every"],
]
#: knobs that hold whole numbers
INTEGER_KNOBS = {
    "lora.rank", "train.max_steps", "data.resolution", "train.batch_size", "train.seed",
    "validation.every", "checkpoint.every",
}  # fmt: skip


def knob_values(fields: dict) -> list:
    out = []
    for key in KNOB_KEYS:
        value = fields[key]
        # prompts with their own settings are shown in kohya's line syntax, which set_fields reads back
        out.append("\n".join(prompt_line(p) for p in value) if key == "validation.prompts" else value)
    return out


def run_dir_value(runs: B.RunManager, name: str) -> str | None:
    try:
        return str(runs.run_dir(name))
    except UsageError:
        return None


def free_name(runs: B.RunManager, stem: str) -> str:
    name, i = stem, 2
    while (runs.runs_dir / name).exists() or (runs.runs_dir / B.UI_DIR / name).exists():
        name, i = f"{stem}-{i}", i + 1
    return name


def status_markdown(st: B.RunStatus) -> str:
    badge = {
        "running": "<span class='run'>● running</span>",
        "starting": "<span class='wait'>● starting</span>",
        "stopping": "<span class='wait'>● stopping</span>",
        "stopped": "<span class='idle'>■ stopped</span>",
        "complete": "<span class='ok'>✔ complete</span>",
        "failed": "<span class='bad'>✘ failed</span>",
        "interrupted": "<span class='bad'>! interrupted</span>",
        "not started": "<span class='idle'>○ not started</span>",
    }[st.state]
    parts = [f"step **{st.step} / {st.total if st.total is not None else '?'}**"]
    if st.elapsed:
        parts.append(f"elapsed {st.elapsed}")
    if st.eta and st.state == "running":
        parts.append(f"ETA {st.eta}")
    if st.loss is not None:
        parts.append(f"loss {st.loss:.4f}")
    if st.checkpoints:
        parts.append("checkpoints at " + ", ".join(map(str, st.checkpoints)))
    if st.state == "not started":
        parts = ["press Start to train with the config above"]
    text = f"### {badge} · {st.name}\n" + " · ".join(parts)
    if st.message:
        text += f"\n\n{st.message}"
    return text


_PLOT_LOCK = threading.Lock()  # pyplot is not thread-safe; Gradio runs callbacks in threads
NO_CURVES = (
    "<p class='hint'>Loss and learning-rate curves appear here once the run logs its first "
    "metrics (every 10 steps and at each checkpoint).</p>"
)


def curves_html(metrics: list[dict]) -> str:
    """The run's loss (raw + smoothed) and LR curves: the same figure as report.html."""
    from loracraft.train.commands.report import curves_png

    if not metrics:
        return NO_CURVES
    with _PLOT_LOCK:
        uri = curves_png(metrics)
    return f'<img src="{uri}" alt="training loss and learning rate" style="max-width:100%">'


@dataclass
class TrainTab:
    recipe: gr.Dropdown
    name: gr.Textbox
    base: gr.Textbox
    data: gr.Textbox
    knobs: dict[str, gr.components.Component]
    yaml: gr.Code
    yaml_msg: gr.Markdown
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    status: gr.Markdown
    curves: gr.HTML
    samples: gr.Gallery
    log: gr.Textbox
    sig: gr.State
    timer: gr.Timer

    @property
    def knob_list(self) -> list:
        return [self.knobs[k] for k in KNOB_KEYS]

    @property
    def recipe_outputs(self) -> list:
        return [self.yaml, self.name, self.base, self.data, self.yaml_msg, *self.knob_list]


def _knob_fields() -> dict[str, gr.components.Component]:
    knobs = {}
    for row in KNOB_ROWS:
        if row == ["validation.prompts"]:
            knobs[row[0]] = gr.Textbox(label=B.KNOBS[row[0]], lines=3, elem_id=KNOB_IDS[row[0]])
            continue
        with gr.Row():
            for key in row:
                precision = {"precision": 0} if key in INTEGER_KNOBS else {}
                knobs[key] = gr.Number(label=B.KNOBS[key], elem_id=KNOB_IDS[key], **precision)
    return knobs


def layout(ctx: UIContext) -> TrainTab:
    """The tab's components (call inside ``gr.Tabs``)."""
    default_recipe = "quickstart" if "quickstart" in ctx.recipes else next(iter(ctx.recipes), None)
    with gr.Tab("2 · Train", id="train"):
        gr.Markdown(
            "Pick a recipe, fill in base model and dataset, adjust the main settings (or the YAML "
            "directly) and start. Training runs as a separate process: it keeps going if you "
            "close this page or the UI. **Stop** writes a checkpoint; **Resume** continues from it.",
            elem_classes="hint",
        )
        with gr.Row():
            recipe = gr.Dropdown(
                choices=list(ctx.recipes),
                value=default_recipe,
                label="Recipe (configs/)",
                elem_id="train-recipe",
            )
            name = gr.Textbox(label=f"Run name (folder in {ctx.runs.runs_dir.name}/)", elem_id="train-name")
        with gr.Row():
            base = gr.Textbox(label="Base model (diffusers folder or hub id)", elem_id="train-base")
            data = gr.Textbox(label="Dataset folder", elem_id="train-data")
        with gr.Row():
            with gr.Column(scale=2):
                knobs = _knob_fields()
            with gr.Column(scale=3):
                yaml = gr.Code(
                    language="yaml",
                    lines=24,
                    max_lines=40,
                    interactive=True,
                    label="Full config (YAML) — exactly what will run; output.dir follows the run name",
                    elem_id="train-yaml",
                )
                yaml_msg = gr.Markdown(elem_id="train-yaml-msg")
        with gr.Row():
            start = gr.Button("▶ Start training", variant="primary", elem_id="train-start")
            stop = gr.Button(
                "■ Stop (writes a checkpoint)", variant="stop", interactive=False, elem_id="train-stop"
            )
            resume = gr.Button("⟳ Resume", interactive=False, elem_id="train-resume")
        status = gr.Markdown("Enter a run name to see its progress.", elem_id="train-status")
        # A matplotlib image (report.py's figure), not gr.LinePlot: in gradio 6.31 LinePlot draws
        # a constant series (e.g. a constant LR) squashed, and with height= draws y as categories.
        curves = gr.HTML(NO_CURVES, elem_id="train-curves")
        samples = gr.Gallery(
            label="Validation images (newest first; one row per prompt)",
            columns=4,
            height=300,
            object_fit="contain",
            format="png",
            elem_id="train-samples",
            elem_classes="pixel",
            interactive=False,
        )
        with gr.Accordion("Training log", open=False):
            log = gr.Textbox(
                lines=14,
                max_lines=14,
                interactive=False,
                show_label=False,
                elem_id="train-log",
                autoscroll=True,
            )
        sig = gr.State(None)
        timer = gr.Timer(1.0)
    return TrainTab(
        recipe, name, base, data, knobs, yaml, yaml_msg, start, stop, resume, status, curves, samples, log, sig,
        timer,
    )  # fmt: skip


def _load_recipe(ctx: UIContext, recipe, name, base, data):
    """The recipe's YAML with the run name, base and dataset already entered filled in."""
    if not recipe:
        return (gr.skip(),) * (5 + len(KNOB_KEYS))
    text = ctx.recipes[recipe].read_text(encoding="utf-8")
    fields = B.read_fields(text)
    name = (name or "").strip() or free_name(ctx.runs, recipe)
    base = (base or "").strip() or (fields["model.base"] or "")
    data = (data or "").strip() or (fields["data.path"] or "")
    text = B.set_fields(
        text, {"model.base": base, "data.path": data, "output.dir": run_dir_value(ctx.runs, name)}
    )
    return (text, name, base, data, "", *knob_values(B.read_fields(text)))


def _fields_to_yaml(ctx: UIContext, text, name, base, data, *values):
    updates = {
        "model.base": (base or "").strip(),
        "data.path": (data or "").strip(),
        "output.dir": run_dir_value(ctx.runs, name),
    }
    for key, value in zip(KNOB_KEYS, values, strict=True):
        if value is not None and value != "":
            updates[key] = value
    try:
        return B.set_fields(text, updates), ""
    except LoracraftError as e:
        return (
            gr.skip(),
            f"<span class='bad'>!</span> The YAML has an error, so the fields were not applied: {message(e)}",
        )


def yaml_to_fields(text):
    try:
        fields = B.read_fields(text)
        B.validate_config(text)
        msg = "<span class='ok'>✔</span> config is valid"
    except LoracraftError as e:
        if "not valid YAML" in message(e) or "must be a mapping" in message(e):
            return (
                gr.skip(),
                gr.skip(),
                f"<span class='bad'>!</span> {html.escape(message(e))}",
                *[gr.skip()] * len(KNOB_KEYS),
            )
        msg = "<span class='bad'>!</span> " + "<br>".join(html.escape(p) for p in e.problems)
    return (fields["model.base"] or "", fields["data.path"] or "", msg, *knob_values(fields))


def _start(ctx: UIContext, name, text):
    runs = ctx.runs
    try:
        cmd = runs.start(name, text)
    except LoracraftError as e:
        problems = "\n".join(f"- {html.escape(p)}" for p in e.problems)
        return f"### <span class='bad'>✘ not started</span>\n{problems}", gr.skip(), None
    shown = " ".join(cmd[1:]).replace(str(runs.runs_dir), runs.runs_dir.name)
    return (
        f"### <span class='wait'>● starting</span> · {name}\n`python {html.escape(shown)}`",
        B.set_fields(text, {"output.dir": str(runs.run_dir(name))}),
        None,
    )


def _refresh(ctx: UIContext, name, last):
    """The run's status every second; the heavy outputs only when something changed (``last``)."""
    try:
        st = ctx.runs.status(name)
    except UsageError:
        return ("Enter a run name to see its progress.", *[gr.skip()] * 5, None)
    samples = list(reversed(st.samples))
    can_resume = (
        st.state in ("stopped", "failed", "interrupted") and ctx.runs.config_text(st.name) is not None
    )
    sig = (st.name, len(st.metrics), [str(s) for s in samples], st.state, can_resume)
    md = status_markdown(st)
    if sig == last:
        return md, gr.skip(), gr.skip(), st.log_tail, gr.skip(), gr.skip(), last
    gallery = [(str(p), f"step {int(p.stem.split('-')[-1])}") for p in samples]
    return (
        md,
        curves_html(st.metrics),
        gallery,
        st.log_tail,
        gr.Button(interactive=st.active),
        gr.Button(interactive=can_resume),
        sig,
    )


def wire(ctx: UIContext, tab: TrainTab, demo: gr.Blocks) -> None:
    """The tab's events (the handlers above, bound to this UI's runs); the recipe loads with the page."""
    knob_list = tab.knob_list

    def load_recipe(recipe, name, base, data):
        return _load_recipe(ctx, recipe, name, base, data)

    recipe_in = [tab.recipe, tab.name, tab.base, tab.data]
    tab.recipe.input(load_recipe, recipe_in, tab.recipe_outputs, **INTERNAL)
    demo.load(load_recipe, recipe_in, tab.recipe_outputs, **INTERNAL)

    def fields_to_yaml(text, name, base, data, *values):
        return _fields_to_yaml(ctx, text, name, base, data, *values)

    gr.on(
        [c.input for c in (tab.name, tab.base, tab.data, *knob_list)],
        fields_to_yaml,
        [tab.yaml, tab.name, tab.base, tab.data, *knob_list],
        [tab.yaml, tab.yaml_msg],
        show_progress="hidden",
        # one event per keystroke: "always_last" makes sure the final value lands ("once" drops it)
        trigger_mode="always_last",
        **INTERNAL,
    )
    yaml_outputs = [tab.base, tab.data, tab.yaml_msg, *knob_list]
    tab.yaml.blur(yaml_to_fields, [tab.yaml], yaml_outputs, show_progress="hidden", **INTERNAL)

    def start(name, text):
        return _start(ctx, name, text)

    tab.start.click(start, [tab.name, tab.yaml], [tab.status, tab.yaml, tab.sig], **INTERNAL)

    @user_errors
    def stop(name):
        ctx.runs.stop(name)
        return (
            "### <span class='wait'>● stopping</span>\nSIGTERM sent: the run writes a checkpoint, then exits.",
            gr.Button(interactive=False),
        )

    tab.stop.click(stop, [tab.name], [tab.status, tab.stop], **INTERNAL)

    @user_errors
    def resume(name):
        ctx.runs.resume(name)
        return (
            f"### <span class='wait'>● resuming</span> · {name}\nsame command again: continues from the newest checkpoint",
            None,
        )

    tab.resume.click(resume, [tab.name], [tab.status, tab.sig], **INTERNAL)

    def refresh(name, last):
        return _refresh(ctx, name, last)

    tab.timer.tick(
        refresh,
        [tab.name, tab.sig],
        [tab.status, tab.curves, tab.samples, tab.log, tab.stop, tab.resume, tab.sig],
        show_progress="hidden",
        **INTERNAL,
    )
