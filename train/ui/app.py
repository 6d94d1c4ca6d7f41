"""The Gradio layout of ``loracraft ui``: four tabs wired to :mod:`loracraft.train.ui.backend`.

Every callback is a few lines that call the backend (or the existing loracraft APIs) and turn a
:class:`~loracraft.infer.errors.LoracraftError` into a message the user sees; nothing here
trains, checks or generates by itself.
"""

from __future__ import annotations

import functools
import html
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from loracraft.infer.errors import LoracraftError, UsageError
from loracraft.train.ui import backend as B

MAX_THUMBS = 120
ADAPTER_SLOTS = 3
DEFAULT_SCHEDULER = "model default"
#: Listeners that only serve the page: kept out of the API docs (generate and scale_sweep are the API).
INTERNAL = {"api_visibility": "undocumented"}

CSS = """
.pixel img, .pixel canvas { image-rendering: pixelated; }
#train-status, #ds-summary { min-height: 2.5em; }
#ds-findings { max-height: 360px; }
.hint { color: var(--body-text-color-subdued); font-size: 0.9em; }
.ok { color: #15803d; font-weight: 600; } .bad { color: #b91c1c; font-weight: 600; }
.run { color: #15803d; } .wait { color: #b45309; } .idle { color: #6b7280; }
#gen-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#ds-gallery .caption-label { white-space: normal; overflow: visible; text-overflow: clip;
  max-width: calc(100% - 8px); font-size: 11px; line-height: 1.25; }
"""


def _message(e: LoracraftError) -> str:
    return " · ".join(e.problems)


def user_errors(fn):
    """Show a LoracraftError as Gradio's error toast (and API error) instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoracraftError as e:
            raise gr.Error(_message(e), duration=None) from e

    return wrapper


def _df(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


# ============================================================================ Dataset tab
FINDING_COLUMNS = ["severity", "file", "problem", "what / how to fix"]


def check(folder: str, resolution, base: str):
    """Run check-data on ``folder``: summary, findings, thumbnails, and the items for editing."""
    from loracraft.train.data.check import check_dataset, load_tokenizer

    folder = (folder or "").strip()
    if not folder:
        raise UsageError("no dataset folder given, Dataset folder, enter the folder that holds your images")
    if not Path(folder).expanduser().exists() and (
        folder.startswith((".", "/", "~")) or folder.count("/") != 1
    ):
        raise UsageError(f"dataset folder not found, {folder}, check the path")
    tokenizer = load_tokenizer(base.strip()) if (base or "").strip() else None
    res = int(resolution) if resolution else None
    report = check_dataset(folder, res, tokenizer, progress=False)
    errors, warnings = len(report.errors), len(report.warnings)
    verdict = (
        "<span class='ok'>✔ trainable</span>"
        if report.trainable
        else "<span class='bad'>✘ not trainable</span>: fix the errors below (or train with `data.on_error: skip`)"
    )
    summary = (
        f"### {report.images} images ({report.layout}) · {verdict}\n{errors} error(s), {warnings} warning(s)"
    )
    if report.notes:
        summary += "\n" + "\n".join(f"- {n}" for n in report.notes)
    ordered = sorted(report.findings, key=lambda f: f.severity != "error")
    findings = _df(
        [
            {"severity": f.severity, "file": f.file, "problem": f.problem, "what / how to fix": f.message}
            for f in ordered
        ],
        FINDING_COLUMNS,
    )
    items, thumbs = [], []
    for entry in report.entries:
        items.append({"key": entry.key, "caption": entry.caption or ""})
        if len(thumbs) < MAX_THUMBS and entry.path is not None and entry.path.is_file():
            try:
                thumbs.append((B.thumbnail(entry.path), f"{entry.key}: {entry.caption or '(no caption)'}"))
            except Exception:  # noqa: BLE001 - PIL raises many types; the findings table says why
                thumbs.append((B.thumbnail_placeholder(), f"{entry.key}: (unreadable image)"))
    if len(report.entries) > MAX_THUMBS:
        summary += f"\n\nShowing the first {MAX_THUMBS} of {len(report.entries)} images."
    items = items[: len(thumbs)]
    return summary, findings, thumbs, items, "", "", ""


def select_item(items: list[dict], evt: gr.SelectData):
    item = items[evt.index] if items and evt.index is not None and evt.index < len(items) else None
    if item is None:
        return "", ""
    return item["key"], item["caption"]


def save(folder: str, key: str, caption: str):
    if not key:
        raise UsageError("no image selected, caption editor, click an image in the grid first")
    written, backup = B.save_caption(folder.strip(), key, caption)
    where = f" (previous version kept in `{backup.relative_to(Path(folder).expanduser())}`)" if backup else ""
    return f"Saved the caption of **{key}** to `{written.name}`{where}."


# ============================================================================ Train tab
KNOB_KEYS = list(B.KNOBS)


def _knob_values(fields: dict) -> list:
    out = []
    for key in KNOB_KEYS:
        value = fields[key]
        out.append("\n".join(value) if key == "validation.prompts" else value)
    return out


def _run_dir_value(runs: B.RunManager, name: str) -> str | None:
    try:
        return str(runs.run_dir(name))
    except UsageError:
        return None


def _free_name(runs: B.RunManager, stem: str) -> str:
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


# ============================================================================ Generate tab
def _adapters(paths_scales) -> list[tuple[str, float]]:
    out = []
    for path, scale in paths_scales:
        if (path or "").strip():
            out.append((path.strip(), float(scale if scale is not None else 1.0)))
    return out


def _gen_kwargs(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler) -> dict:
    return dict(
        prompt=prompt or "",
        negative_prompt=(negative_prompt or None),
        seed=None if seed is None or int(seed) < 0 else int(seed),
        steps=int(steps),
        guidance=float(guidance),
        width=int(width) if width else None,
        height=int(height) if height else None,
        scheduler=None if not scheduler or scheduler == DEFAULT_SCHEDULER else scheduler,
    )


# ============================================================================ the app
def build_app(runs_dir: str | Path) -> gr.Blocks:
    """The whole UI as a ``gr.Blocks`` (not launched)."""
    from loracraft.infer.generation import SCHEDULERS

    runs = B.RunManager(runs_dir)
    generator = B.Generator(runs.runs_dir / B.UI_DIR / "generated")
    recipe_paths = B.recipes()
    default_recipe = "quickstart" if "quickstart" in recipe_paths else next(iter(recipe_paths), None)

    with gr.Blocks(title="loracraft") as demo:
        gr.Markdown(
            "## loracraft · LoRA training for Stable Diffusion\n"
            f"<span class='hint'>Runs folder: <code>{html.escape(str(runs.runs_dir))}</code> · every button "
            "runs the same code as the <code>loracraft</code> command line.</span>"
        )
        with gr.Tabs(selected="dataset") as tabs:
            # ---------------------------------------------------------------- Dataset
            with gr.Tab("1 · Dataset", id="dataset"):
                gr.Markdown(
                    "Check a folder of captioned images before training (`loracraft check-data`). "
                    "Click a thumbnail to edit its caption.",
                    elem_classes="hint",
                )
                with gr.Row():
                    ds_folder = gr.Textbox(
                        label="Dataset folder",
                        scale=4,
                        elem_id="ds-folder",
                        placeholder="/path/to/images (metadata.jsonl/csv, or one .txt caption per image)",
                    )
                    ds_res = gr.Number(
                        label="Training resolution (0 = don't check sizes)",
                        value=0,
                        minimum=0,
                        precision=0,
                        scale=1,
                        elem_id="ds-resolution",
                    )
                    ds_base = gr.Textbox(
                        label="Base model (optional, counts caption tokens)", scale=2, elem_id="ds-base"
                    )
                ds_check = gr.Button("Check dataset", variant="primary", elem_id="ds-check")
                ds_summary = gr.Markdown(elem_id="ds-summary")
                ds_findings = gr.Dataframe(
                    value=_df([], FINDING_COLUMNS),
                    label="Findings",
                    interactive=False,
                    wrap=True,
                    elem_id="ds-findings",
                    max_height=360,
                    column_widths=["9%", "16%", "15%", "60%"],
                )
                ds_items = gr.State([])
                with gr.Row():
                    ds_gallery = gr.Gallery(
                        label="Images (click one to edit its caption)",
                        columns=6,
                        height=420,
                        allow_preview=False,
                        format="png",
                        scale=3,
                        elem_id="ds-gallery",
                        elem_classes="pixel",
                        interactive=False,
                    )
                    with gr.Column(scale=2):
                        ds_key = gr.Textbox(label="Selected image", interactive=False, elem_id="ds-file")
                        ds_caption = gr.Textbox(label="Caption", lines=3, elem_id="ds-caption")
                        ds_save = gr.Button("Save caption", elem_id="ds-save")
                        ds_saved = gr.Markdown(elem_id="ds-saved")
                        ds_to_train = gr.Button("Use this dataset for training →", elem_id="ds-to-train")

            # ---------------------------------------------------------------- Train
            with gr.Tab("2 · Train", id="train"):
                gr.Markdown(
                    "Pick a recipe, fill in base model and dataset, adjust the main settings (or the YAML "
                    "directly) and start. Training runs as a separate process: it keeps going if you "
                    "close this page or the UI. **Stop** writes a checkpoint; **Resume** continues from it.",
                    elem_classes="hint",
                )
                with gr.Row():
                    tr_recipe = gr.Dropdown(
                        choices=list(recipe_paths),
                        value=default_recipe,
                        label="Recipe (configs/)",
                        elem_id="train-recipe",
                    )
                    tr_name = gr.Textbox(
                        label=f"Run name (folder in {runs.runs_dir.name}/)", elem_id="train-name"
                    )
                with gr.Row():
                    tr_base = gr.Textbox(
                        label="Base model (diffusers folder or hub id)", elem_id="train-base"
                    )
                    tr_data = gr.Textbox(label="Dataset folder", elem_id="train-data")
                with gr.Row():
                    with gr.Column(scale=2):
                        knobs = {}
                        with gr.Row():
                            knobs["lora.rank"] = gr.Number(
                                label=B.KNOBS["lora.rank"], precision=0, elem_id="knob-rank"
                            )
                            knobs["lora.alpha"] = gr.Number(label=B.KNOBS["lora.alpha"], elem_id="knob-alpha")
                        with gr.Row():
                            knobs["train.max_steps"] = gr.Number(
                                label=B.KNOBS["train.max_steps"], precision=0, elem_id="knob-steps"
                            )
                            knobs["train.lr"] = gr.Number(label=B.KNOBS["train.lr"], elem_id="knob-lr")
                        with gr.Row():
                            knobs["data.resolution"] = gr.Number(
                                label=B.KNOBS["data.resolution"], precision=0, elem_id="knob-resolution"
                            )
                            knobs["train.batch_size"] = gr.Number(
                                label=B.KNOBS["train.batch_size"], precision=0, elem_id="knob-batch"
                            )
                            knobs["train.seed"] = gr.Number(
                                label=B.KNOBS["train.seed"], precision=0, elem_id="knob-seed"
                            )
                        knobs["validation.prompts"] = gr.Textbox(
                            label=B.KNOBS["validation.prompts"], lines=3, elem_id="knob-prompts"
                        )
                        with gr.Row():
                            knobs["validation.every"] = gr.Number(
                                label=B.KNOBS["validation.every"], precision=0, elem_id="knob-val-every"
                            )
                            knobs["checkpoint.every"] = gr.Number(
                                label=B.KNOBS["checkpoint.every"], precision=0, elem_id="knob-ckpt-every"
                            )
                    with gr.Column(scale=3):
                        tr_yaml = gr.Code(
                            language="yaml",
                            lines=24,
                            max_lines=40,
                            interactive=True,
                            label="Full config (YAML) — exactly what will run; output.dir follows the run name",
                            elem_id="train-yaml",
                        )
                        tr_yaml_msg = gr.Markdown(elem_id="train-yaml-msg")
                with gr.Row():
                    tr_start = gr.Button("▶ Start training", variant="primary", elem_id="train-start")
                    tr_stop = gr.Button(
                        "■ Stop (writes a checkpoint)",
                        variant="stop",
                        interactive=False,
                        elem_id="train-stop",
                    )
                    tr_resume = gr.Button("⟳ Resume", interactive=False, elem_id="train-resume")
                tr_status = gr.Markdown("Enter a run name to see its progress.", elem_id="train-status")
                # A matplotlib image (report.py's figure), not gr.LinePlot: in gradio 6.31 LinePlot draws
                # a constant series (e.g. a constant LR) squashed, and with height= draws y as categories.
                tr_curves = gr.HTML(NO_CURVES, elem_id="train-curves")
                tr_samples = gr.Gallery(
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
                    tr_log = gr.Textbox(
                        lines=14,
                        max_lines=14,
                        interactive=False,
                        show_label=False,
                        elem_id="train-log",
                        autoscroll=True,
                    )
                tr_sig = gr.State(None)
                timer = gr.Timer(1.0)

            # ---------------------------------------------------------------- Runs
            with gr.Tab("3 · Runs", id="runs"):
                with gr.Row():
                    rn_refresh = gr.Button("↻ Refresh", elem_id="runs-refresh", scale=0)
                    gr.Markdown(f"Runs in `{runs.runs_dir}`", elem_classes="hint")
                rn_table = gr.Dataframe(interactive=False, wrap=True, elem_id="runs-table", label="Runs")
                with gr.Row():
                    rn_pick = gr.Dropdown(label="Run", choices=[], elem_id="runs-pick", scale=2)
                    rn_to_gen = gr.Button("Send to Generate →", elem_id="runs-to-generate", scale=1)
                    rn_to_train = gr.Button("Watch in Train tab", elem_id="runs-to-train", scale=1)
                    rn_report_btn = gr.Button("Open report", elem_id="runs-report", scale=1)
                rn_summary = gr.Dataframe(
                    headers=["", ""],
                    interactive=False,
                    wrap=True,
                    elem_id="runs-summary",
                    label="Manifest (run.json)",
                    visible=False,
                )
                rn_report = gr.HTML(elem_id="runs-report-view")
                rn_report_file = gr.File(
                    label="report.html (download)",
                    visible=False,
                    interactive=False,
                    elem_id="runs-report-file",
                )
                gr.Markdown("### Compare two runs")
                with gr.Row():
                    rn_a = gr.Dropdown(label="Run A", choices=[], elem_id="runs-a")
                    rn_b = gr.Dropdown(label="Run B", choices=[], elem_id="runs-b")
                    rn_compare = gr.Button("Compare", elem_id="runs-compare", scale=0)
                with gr.Row():
                    rn_diff = gr.Code(
                        label="Config differences (key: A -> B)",
                        language=None,
                        lines=8,
                        interactive=False,
                        wrap_lines=True,
                        elem_id="runs-diff",
                    )
                    rn_curves = gr.LinePlot(
                        value=pd.DataFrame(columns=["run", "step", "loss"]),
                        x="step",
                        y="loss",
                        color="run",
                        title="Loss, both runs",
                        elem_id="runs-curves",
                    )

            # ---------------------------------------------------------------- Generate
            with gr.Tab("4 · Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        gn_base = gr.Textbox(label="Base model", elem_id="gen-base")
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
                                    -1.0,
                                    2.0,
                                    value=1.0,
                                    step=0.05,
                                    label=f"Adapter {i} scale",
                                    scale=2,
                                    elem_id=f"gen-scale-{i}",
                                )
                            slots += [path, scale]
                        gn_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                        gn_negative = gr.Textbox(label="Negative prompt", value="", elem_id="gen-negative")
                        with gr.Row():
                            gn_seed = gr.Number(
                                label="Seed (-1 = random)", value=0, precision=0, elem_id="gen-seed"
                            )
                            gn_steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="gen-steps")
                            gn_guidance = gr.Slider(
                                0, 20, value=7.5, step=0.5, label="Guidance (CFG)", elem_id="gen-guidance"
                            )
                        with gr.Row():
                            gn_width = gr.Number(
                                label="Width (0 = model's own)",
                                value=0,
                                minimum=0,
                                precision=0,
                                elem_id="gen-width",
                            )
                            gn_height = gr.Number(
                                label="Height (0 = model's own)",
                                value=0,
                                minimum=0,
                                precision=0,
                                elem_id="gen-height",
                            )
                            gn_scheduler = gr.Dropdown(
                                [DEFAULT_SCHEDULER, *SCHEDULERS],
                                value=DEFAULT_SCHEDULER,
                                label="Scheduler",
                                elem_id="gen-scheduler",
                            )
                        gn_go = gr.Button("Generate", variant="primary", elem_id="gen-generate")
                        with gr.Row():
                            gn_scales = gr.Textbox(
                                value="0, 0.5, 1",
                                scale=3,
                                elem_id="gen-sweep-scales",
                                label="Scale sweep: multipliers applied to every adapter's scale",
                            )
                            gn_sweep = gr.Button("Run scale sweep", scale=1, elem_id="gen-sweep")
                    with gr.Column(scale=2):
                        gn_image = gr.Image(
                            label="Result",
                            type="filepath",
                            format="png",
                            interactive=False,
                            height=300,
                            elem_id="gen-image",
                            elem_classes="pixel",
                        )
                        gn_file = gr.File(
                            label="Download PNG (prompt, seed, adapters and scales embedded)",
                            interactive=False,
                            height=90,
                            elem_id="gen-file",
                        )
                        gn_params = gr.Textbox(
                            label="Recorded parameters", lines=3, interactive=False, elem_id="gen-params"
                        )
                        gn_gallery = gr.Gallery(
                            label="Scale sweep (left to right: each multiplier)",
                            columns=5,
                            height=220,
                            format="png",
                            elem_id="gen-sweep-gallery",
                            elem_classes="pixel",
                            interactive=False,
                        )
                        gn_files = gr.File(
                            label="Download sweep (one PNG per scale, plus the grid)",
                            file_count="multiple",
                            interactive=False,
                            elem_id="gen-sweep-files",
                        )

        knob_list = [knobs[k] for k in KNOB_KEYS]

        # ==================================================================== Dataset events
        ds_outputs = [ds_summary, ds_findings, ds_gallery, ds_items, ds_key, ds_caption, ds_saved]
        ds_check.click(user_errors(check), [ds_folder, ds_res, ds_base], ds_outputs, **INTERNAL)
        ds_folder.submit(user_errors(check), [ds_folder, ds_res, ds_base], ds_outputs, **INTERNAL)
        ds_gallery.select(select_item, [ds_items], [ds_key, ds_caption], **INTERNAL)

        @user_errors
        def save_and_recheck(folder, key, caption, resolution, base):
            msg = save(folder, key, caption)
            out = list(check(folder, resolution, base))
            out[4], out[5], out[6] = key, caption.strip(), msg
            return tuple(out)

        ds_save.click(
            save_and_recheck, [ds_folder, ds_key, ds_caption, ds_res, ds_base], ds_outputs, **INTERNAL
        )
        ds_to_train.click(
            lambda folder: (folder, gr.Tabs(selected="train")), [ds_folder], [tr_data, tabs], **INTERNAL
        )

        # ==================================================================== Train events
        def load_recipe(recipe, name, base, data):
            if not recipe:
                return (gr.skip(),) * (5 + len(knob_list))
            text = recipe_paths[recipe].read_text(encoding="utf-8")
            fields = B.read_fields(text)
            name = (name or "").strip() or _free_name(runs, recipe)
            base = (base or "").strip() or (fields["model.base"] or "")
            data = (data or "").strip() or (fields["data.path"] or "")
            text = B.set_fields(
                text, {"model.base": base, "data.path": data, "output.dir": _run_dir_value(runs, name)}
            )
            return (text, name, base, data, "", *_knob_values(B.read_fields(text)))

        recipe_out = [tr_yaml, tr_name, tr_base, tr_data, tr_yaml_msg, *knob_list]
        tr_recipe.input(load_recipe, [tr_recipe, tr_name, tr_base, tr_data], recipe_out, **INTERNAL)

        def fields_to_yaml(text, name, base, data, *values):
            updates = {
                "model.base": (base or "").strip(),
                "data.path": (data or "").strip(),
                "output.dir": _run_dir_value(runs, name),
            }
            for key, value in zip(KNOB_KEYS, values, strict=True):
                if value is not None and value != "":
                    updates[key] = value
            try:
                return B.set_fields(text, updates), ""
            except LoracraftError as e:
                return (
                    gr.skip(),
                    f"<span class='bad'>!</span> The YAML has an error, so the fields were not applied: {_message(e)}",
                )

        gr.on(
            [c.input for c in (tr_name, tr_base, tr_data, *knob_list)],
            fields_to_yaml,
            [tr_yaml, tr_name, tr_base, tr_data, *knob_list],
            [tr_yaml, tr_yaml_msg],
            show_progress="hidden",
            # one event per keystroke: "always_last" makes sure the final value lands ("once" drops it)
            trigger_mode="always_last",
            **INTERNAL,
        )

        def yaml_to_fields(text):
            try:
                fields = B.read_fields(text)
                B.validate_config(text)
                msg = "<span class='ok'>✔</span> config is valid"
            except LoracraftError as e:
                if "not valid YAML" in _message(e) or "must be a mapping" in _message(e):
                    return (
                        gr.skip(),
                        gr.skip(),
                        f"<span class='bad'>!</span> {html.escape(_message(e))}",
                        *[gr.skip()] * len(knob_list),
                    )
                msg = "<span class='bad'>!</span> " + "<br>".join(html.escape(p) for p in e.problems)
            return (fields["model.base"] or "", fields["data.path"] or "", msg, *_knob_values(fields))

        tr_yaml.blur(
            yaml_to_fields,
            [tr_yaml],
            [tr_base, tr_data, tr_yaml_msg, *knob_list],
            show_progress="hidden",
            **INTERNAL,
        )

        def start(name, text):
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

        tr_start.click(start, [tr_name, tr_yaml], [tr_status, tr_yaml, tr_sig], **INTERNAL)

        @user_errors
        def stop(name):
            runs.stop(name)
            return (
                "### <span class='wait'>● stopping</span>\nSIGTERM sent: the run writes a checkpoint, then exits.",
                gr.Button(interactive=False),
            )

        tr_stop.click(stop, [tr_name], [tr_status, tr_stop], **INTERNAL)

        @user_errors
        def resume(name):
            runs.resume(name)
            return (
                f"### <span class='wait'>● resuming</span> · {name}\nsame command again: continues from the newest checkpoint",
                None,
            )

        tr_resume.click(resume, [tr_name], [tr_status, tr_sig], **INTERNAL)

        def refresh(name, last):
            try:
                st = runs.status(name)
            except UsageError:
                return ("Enter a run name to see its progress.", *[gr.skip()] * 5, None)
            samples = list(reversed(st.samples))
            can_resume = (
                st.state in ("stopped", "failed", "interrupted") and runs.config_text(st.name) is not None
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

        timer.tick(
            refresh,
            [tr_name, tr_sig],
            [tr_status, tr_curves, tr_samples, tr_log, tr_stop, tr_resume, tr_sig],
            show_progress="hidden",
            **INTERNAL,
        )

        # ==================================================================== Runs events
        summary_columns = ["field", "value"]

        def list_all():
            rows = B.list_runs(runs.runs_dir)
            names = [r["name"] for r in rows]
            df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["name", "status"])
            first = names[0] if names else None
            second = names[1] if len(names) > 1 else first
            return (
                df,
                gr.Dropdown(choices=names, value=first),
                gr.Dropdown(choices=names, value=first),
                gr.Dropdown(choices=names, value=second),
            )

        rn_refresh.click(list_all, None, [rn_table, rn_pick, rn_a, rn_b], **INTERNAL)

        def pick(name):
            if not name:
                return gr.Dataframe(visible=False), "", gr.File(visible=False)
            pairs = B.manifest_summary(runs.run_dir(name))
            report = runs.run_dir(name) / "report.html"
            return (
                gr.Dataframe(
                    value=_df([dict(zip(summary_columns, p, strict=True)) for p in pairs], summary_columns),
                    visible=True,
                ),
                "",
                gr.File(value=str(report) if report.is_file() else None, visible=report.is_file()),
            )

        rn_pick.change(user_errors(pick), [rn_pick], [rn_summary, rn_report, rn_report_file], **INTERNAL)

        @user_errors
        def open_report(name):
            from loracraft.train.commands.report import write_report

            if not name:
                raise UsageError("no run selected, Run, pick a run first")
            run_dir = runs.run_dir(name)
            path = run_dir / "report.html"
            note = ""
            if not path.is_file():
                if not (run_dir / "run.json").is_file():
                    raise UsageError(
                        f"run {name!r} has not started training yet, Open report, nothing to report"
                    )
                path = write_report(run_dir)
                note = "<p class='hint'>report.html did not exist: written now (<code>loracraft report</code>).</p>"
            page = path.read_text(encoding="utf-8")
            frame = (
                f'{note}<iframe title="report of {html.escape(name)}" srcdoc="{html.escape(page, quote=True)}" '
                'style="width:100%;height:760px;border:1px solid #ccc;border-radius:6px;background:white"></iframe>'
            )
            return (frame, gr.File(value=str(path), visible=True), *list_all()[:1])

        rn_report_btn.click(open_report, [rn_pick], [rn_report, rn_report_file, rn_table], **INTERNAL)

        @user_errors
        def compare(a, b):
            if not a or not b:
                raise UsageError("pick two runs, Compare, choose Run A and Run B")
            diff, rows = B.compare_runs(runs.run_dir(a), runs.run_dir(b))
            text = "\n".join(diff) if diff else "(identical configs)"
            return text, pd.DataFrame(rows, columns=["run", "step", "loss"])

        rn_compare.click(compare, [rn_a, rn_b], [rn_diff, rn_curves], **INTERNAL)

        def to_generate(name):
            if not name:
                raise gr.Error("pick a run first")
            run_dir = runs.run_dir(name)
            m = B.read_manifest(run_dir) or {}
            adapter = run_dir / "pytorch_lora_weights.safetensors"
            if not adapter.is_file():
                raise gr.Error(f"run {name!r} has no adapter yet (it is written when training completes)")
            cfg = m.get("config") or {}
            prompts = (cfg.get("validation") or {}).get("prompts") or []
            return (
                cfg.get("model", {}).get("base") or gr.skip(),
                str(adapter),
                1.0,
                prompts[0] if prompts else gr.skip(),
                gr.Tabs(selected="generate"),
            )

        rn_to_gen.click(to_generate, [rn_pick], [gn_base, slots[0], slots[1], gn_prompt, tabs], **INTERNAL)

        def to_train(name):
            if not name:
                raise gr.Error("pick a run first")
            text = runs.config_text(name)
            if text is None:
                m = B.read_manifest(runs.run_dir(name)) or {}
                text = B.dump_yaml(m.get("config") or {})
            fields = B.read_fields(text)
            return (
                name,
                text,
                fields["model.base"] or "",
                fields["data.path"] or "",
                None,
                *_knob_values(fields),
                gr.Tabs(selected="train"),
            )

        rn_to_train.click(
            to_train, [rn_pick], [tr_name, tr_yaml, tr_base, tr_data, tr_sig, *knob_list, tabs], **INTERNAL
        )

        # ==================================================================== Generate events
        def generate_image(
            base: str,
            lora_1: str,
            scale_1: float,
            lora_2: str,
            scale_2: float,
            lora_3: str,
            scale_3: float,
            prompt: str,
            negative_prompt: str,
            seed: float,
            steps: float,
            guidance: float,
            width: float | None,
            height: float | None,
            scheduler: str,
        ):
            """Generate one image with a base model and up to three LoRA adapters; returns the PNG
            (with its generation record embedded) twice (display, download) and the recorded parameters."""
            from loracraft.infer.generation import read_record

            adapters = _adapters([(lora_1, scale_1), (lora_2, scale_2), (lora_3, scale_3)])
            kwargs = _gen_kwargs(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler)
            paths = generator.generate(base, adapters, **kwargs)
            path = str(paths[0])
            return path, path, read_record(path).a1111_parameters()

        gen_inputs = [
            gn_base,
            *slots,
            gn_prompt,
            gn_negative,
            gn_seed,
            gn_steps,
            gn_guidance,
            gn_width,
            gn_height,
            gn_scheduler,
        ]
        gn_go.click(
            user_errors(generate_image), gen_inputs, [gn_image, gn_file, gn_params], api_name="generate"
        )
        gn_prompt.submit(user_errors(generate_image), gen_inputs, [gn_image, gn_file, gn_params], **INTERNAL)

        def scale_sweep(
            base: str,
            lora_1: str,
            scale_1: float,
            lora_2: str,
            scale_2: float,
            lora_3: str,
            scale_3: float,
            prompt: str,
            negative_prompt: str,
            seed: float,
            steps: float,
            guidance: float,
            width: float | None,
            height: float | None,
            scheduler: str,
            scales: str,
        ):
            """The same image at several LoRA strengths (multipliers of every adapter's scale)."""
            from loracraft.infer.cli import _parse_sweep

            adapters = _adapters([(lora_1, scale_1), (lora_2, scale_2), (lora_3, scale_3)])
            kwargs = _gen_kwargs(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler)
            cells, grid = generator.sweep(base, adapters, _parse_sweep(scales or ""), **kwargs)
            gallery = [(str(p), f"scale ×{s:g}") for p, s in cells]
            return gallery, [str(p) for p, _ in cells] + [str(grid)]

        gn_sweep.click(
            user_errors(scale_sweep), [*gen_inputs, gn_scales], [gn_gallery, gn_files], api_name="scale_sweep"
        )

        # ==================================================================== on page load
        demo.load(load_recipe, [tr_recipe, tr_name, tr_base, tr_data], recipe_out, **INTERNAL)
        demo.load(list_all, None, [rn_table, rn_pick, rn_a, rn_b], **INTERNAL)
    return demo


def theme():
    return gr.themes.Default(primary_hue="indigo")


def launch(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, auth=None, block: bool = True):
    """Build and serve the UI. With ``block=False`` returns ``(demo, url)`` and keeps serving in a thread."""
    demo = build_app(runs_dir)
    demo.queue(default_concurrency_limit=2)
    runs_abs = str(Path(runs_dir).expanduser().resolve())
    try:
        _, url, _ = demo.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            auth_message="loracraft: log in with the credentials from LORACRAFT_UI_AUTH or --auth-file",
            allowed_paths=[runs_abs],
            theme=theme(),
            css=CSS,
            footer_links=["api"],
            run_history=False,
            ssr_mode=False,
            show_error=True,
            prevent_thread_lock=True,
            quiet=False,
        )
    except OSError as e:
        raise UsageError(
            f"cannot serve on {host}:{port} ({e}), --port, pick a free port (e.g. --port 7861)"
        ) from e
    if not block:
        return demo, url
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return demo, url
