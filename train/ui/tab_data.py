"""The Dataset tab: ``loracraft check-data`` on a folder, its thumbnails, and a caption editor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from loracraft.infer.errors import UsageError
from loracraft.train.ui.captions import thumbnail_placeholder
from loracraft.train.ui.common import INTERNAL, UIContext, frame, user_errors

MAX_THUMBS = 120
FINDING_COLUMNS = ["severity", "file", "problem", "what / how to fix"]


def run_check(ctx: UIContext, folder: str, resolution, base: str):
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
    findings = frame(
        [
            {"severity": f.severity, "file": f.file, "problem": f.problem, "what / how to fix": f.message}
            for f in ordered
        ],
        FINDING_COLUMNS,
    )
    # the folder is opened now: from here on its items' captions may be edited, and only these
    ctx.datasets.open(folder, [e.key for e in report.entries])
    items, thumbs = [], []
    for entry in report.entries:
        items.append({"key": entry.key, "caption": entry.caption or ""})
        if len(thumbs) < MAX_THUMBS and entry.path is not None and entry.path.is_file():
            try:
                thumbs.append(
                    (
                        ctx.datasets.thumbnail(folder, entry.key),
                        f"{entry.key}: {entry.caption or '(no caption)'}",
                    )
                )
            except Exception:  # noqa: BLE001 - PIL raises many types; the findings table says why
                thumbs.append((thumbnail_placeholder(), f"{entry.key}: (unreadable image)"))
    if len(report.entries) > MAX_THUMBS:
        summary += f"\n\nShowing the first {MAX_THUMBS} of {len(report.entries)} images."
    items = items[: len(thumbs)]
    return summary, findings, thumbs, items, "", "", ""


def select_item(items: list[dict], evt: gr.SelectData):
    item = items[evt.index] if items and evt.index is not None and evt.index < len(items) else None
    if item is None:
        return "", ""
    return item["key"], item["caption"]


def save(ctx: UIContext, folder: str, key: str, caption: str) -> str:
    if not key:
        raise UsageError("no image selected, caption editor, click an image in the grid first")
    written, backup = ctx.datasets.save_caption(folder, key, caption)
    where = f" (previous version kept in `{backup.relative_to(Path(folder).expanduser())}`)" if backup else ""
    return f"Saved the caption of **{key}** to `{written.name}`{where}."


@dataclass
class DataTab:
    folder: gr.Textbox
    resolution: gr.Number
    base: gr.Textbox
    check: gr.Button
    summary: gr.Markdown
    findings: gr.Dataframe
    items: gr.State
    gallery: gr.Gallery
    key: gr.Textbox
    caption: gr.Textbox
    save: gr.Button
    saved: gr.Markdown
    to_train: gr.Button


def layout() -> DataTab:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("1 · Dataset", id="dataset"):
        gr.Markdown(
            "Check a folder of captioned images before training (`loracraft check-data`). "
            "Click a thumbnail to edit its caption.",
            elem_classes="hint",
        )
        with gr.Row():
            folder = gr.Textbox(
                label="Dataset folder",
                scale=4,
                elem_id="ds-folder",
                placeholder="/path/to/images (metadata.jsonl/csv, or one .txt caption per image)",
            )
            resolution = gr.Number(
                label="Training resolution (0 = don't check sizes)",
                value=0,
                minimum=0,
                precision=0,
                scale=1,
                elem_id="ds-resolution",
            )
            base = gr.Textbox(
                label="Base model (optional, counts caption tokens)", scale=2, elem_id="ds-base"
            )
        check_btn = gr.Button("Check dataset", variant="primary", elem_id="ds-check")
        summary = gr.Markdown(elem_id="ds-summary")
        findings = gr.Dataframe(
            value=frame([], FINDING_COLUMNS),
            label="Findings",
            interactive=False,
            wrap=True,
            elem_id="ds-findings",
            max_height=360,
            column_widths=["9%", "16%", "15%", "60%"],
        )
        items = gr.State([])
        with gr.Row():
            gallery = gr.Gallery(
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
                key = gr.Textbox(label="Selected image", interactive=False, elem_id="ds-file")
                caption = gr.Textbox(label="Caption", lines=3, elem_id="ds-caption")
                save_btn = gr.Button("Save caption", elem_id="ds-save")
                saved = gr.Markdown(elem_id="ds-saved")
                to_train = gr.Button("Use this dataset for training →", elem_id="ds-to-train")
    return DataTab(
        folder, resolution, base, check_btn, summary, findings, items, gallery, key, caption, save_btn, saved,
        to_train,
    )  # fmt: skip


def wire(ctx: UIContext, tab: DataTab, *, train_data: gr.Textbox, tabs: gr.Tabs) -> None:
    """The tab's events; ``train_data`` and ``tabs`` receive the folder for training."""
    outputs = [tab.summary, tab.findings, tab.gallery, tab.items, tab.key, tab.caption, tab.saved]
    inputs = [tab.folder, tab.resolution, tab.base]

    @user_errors
    def check(folder, resolution, base):
        return run_check(ctx, folder, resolution, base)

    tab.check.click(check, inputs, outputs, **INTERNAL)
    tab.folder.submit(check, inputs, outputs, **INTERNAL)
    tab.gallery.select(select_item, [tab.items], [tab.key, tab.caption], **INTERNAL)

    @user_errors
    def save_and_recheck(folder, key, caption, resolution, base):
        msg = save(ctx, folder, key, caption)
        out = list(run_check(ctx, folder, resolution, base))
        out[4], out[5], out[6] = key, caption.strip(), msg
        return tuple(out)

    tab.save.click(
        save_and_recheck, [tab.folder, tab.key, tab.caption, tab.resolution, tab.base], outputs, **INTERNAL
    )
    tab.to_train.click(
        lambda folder: (folder, gr.Tabs(selected="train")), [tab.folder], [train_data, tabs], **INTERNAL
    )
