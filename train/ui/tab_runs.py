"""The Runs tab: every run folder, one run's manifest and report, two runs compared, hand-offs."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from loracraft.infer.errors import UsageError
from loracraft.train.ui import backend as B
from loracraft.train.ui.common import INTERNAL, UIContext, frame, user_errors
from loracraft.train.ui.tab_generate import GenerateTab
from loracraft.train.ui.tab_train import TrainTab, knob_values

SUMMARY_COLUMNS = ["field", "value"]


@dataclass
class RunsTab:
    refresh: gr.Button
    table: gr.Dataframe
    pick: gr.Dropdown
    to_generate: gr.Button
    to_train: gr.Button
    report_btn: gr.Button
    summary: gr.Dataframe
    report: gr.HTML
    report_file: gr.File
    run_a: gr.Dropdown
    run_b: gr.Dropdown
    compare: gr.Button
    diff: gr.Code
    curves: gr.LinePlot

    @property
    def listing(self) -> list:
        return [self.table, self.pick, self.run_a, self.run_b]


def layout(ctx: UIContext) -> RunsTab:
    """The tab's components (call inside ``gr.Tabs``)."""
    with gr.Tab("3 · Runs", id="runs"):
        with gr.Row():
            refresh = gr.Button("↻ Refresh", elem_id="runs-refresh", scale=0)
            gr.Markdown(f"Runs in `{ctx.runs.runs_dir}`", elem_classes="hint")
        table = gr.Dataframe(interactive=False, wrap=True, elem_id="runs-table", label="Runs")
        with gr.Row():
            pick = gr.Dropdown(label="Run", choices=[], elem_id="runs-pick", scale=2)
            to_generate = gr.Button("Send to Generate →", elem_id="runs-to-generate", scale=1)
            to_train = gr.Button("Watch in Train tab", elem_id="runs-to-train", scale=1)
            report_btn = gr.Button("Open report", elem_id="runs-report", scale=1)
        summary = gr.Dataframe(
            headers=["", ""],
            interactive=False,
            wrap=True,
            elem_id="runs-summary",
            label="Manifest (run.json)",
            visible=False,
        )
        report = gr.HTML(elem_id="runs-report-view")
        report_file = gr.File(
            label="report.html (download)", visible=False, interactive=False, elem_id="runs-report-file"
        )
        gr.Markdown("### Compare two runs")
        with gr.Row():
            run_a = gr.Dropdown(label="Run A", choices=[], elem_id="runs-a")
            run_b = gr.Dropdown(label="Run B", choices=[], elem_id="runs-b")
            compare = gr.Button("Compare", elem_id="runs-compare", scale=0)
        with gr.Row():
            diff = gr.Code(
                label="Config differences (key: A -> B)",
                language=None,
                lines=8,
                interactive=False,
                wrap_lines=True,
                elem_id="runs-diff",
            )
            curves = gr.LinePlot(
                value=pd.DataFrame(columns=["run", "step", "loss"]),
                x="step",
                y="loss",
                color="run",
                title="Loss, both runs",
                elem_id="runs-curves",
            )
    return RunsTab(
        refresh, table, pick, to_generate, to_train, report_btn, summary, report, report_file, run_a, run_b,
        compare, diff, curves,
    )  # fmt: skip


def _list_all(ctx: UIContext):
    rows = B.list_runs(ctx.runs.runs_dir)
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


def _pick(ctx: UIContext, name):
    if not name:
        return gr.Dataframe(visible=False), "", gr.File(visible=False)
    pairs = B.manifest_summary(ctx.runs.run_dir(name))
    report = ctx.runs.run_dir(name) / "report.html"
    return (
        gr.Dataframe(
            value=frame([dict(zip(SUMMARY_COLUMNS, p, strict=True)) for p in pairs], SUMMARY_COLUMNS),
            visible=True,
        ),
        "",
        gr.File(value=str(report) if report.is_file() else None, visible=report.is_file()),
    )


def _open_report(ctx: UIContext, name):
    """The run's report.html inline (written first with ``loracraft report`` if it is missing)."""
    from loracraft.train.commands.report import write_report

    if not name:
        raise UsageError("no run selected, Run, pick a run first")
    run_dir = ctx.runs.run_dir(name)
    path = run_dir / "report.html"
    note = ""
    if not path.is_file():
        if not (run_dir / "run.json").is_file():
            raise UsageError(f"run {name!r} has not started training yet, Open report, nothing to report")
        path = write_report(run_dir)
        note = "<p class='hint'>report.html did not exist: written now (<code>loracraft report</code>).</p>"
    page = path.read_text(encoding="utf-8")
    iframe = (
        f'{note}<iframe title="report of {html.escape(name)}" srcdoc="{html.escape(page, quote=True)}" '
        'style="width:100%;height:760px;border:1px solid #ccc;border-radius:6px;background:white"></iframe>'
    )
    return (iframe, gr.File(value=str(path), visible=True), *_list_all(ctx)[:1])


def _compare(ctx: UIContext, a, b):
    if not a or not b:
        raise UsageError("pick two runs, Compare, choose Run A and Run B")
    diff, rows = B.compare_runs(ctx.runs.run_dir(a), ctx.runs.run_dir(b))
    text = "\n".join(diff) if diff else "(identical configs)"
    return text, pd.DataFrame(rows, columns=["run", "step", "loss"])


def _to_generate(ctx: UIContext, name):
    """Base model, final adapter and first validation prompt of a run, for the Generate tab."""
    if not name:
        raise gr.Error("pick a run first")
    run_dir = ctx.runs.run_dir(name)
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


def _to_train(ctx: UIContext, name):
    """A run's config in the Train tab, where its progress shows."""
    if not name:
        raise gr.Error("pick a run first")
    text = ctx.runs.config_text(name)
    if text is None:
        m = B.read_manifest(ctx.runs.run_dir(name)) or {}
        text = B.dump_yaml(m.get("config") or {})
    fields = B.read_fields(text)
    return (
        name,
        text,
        fields["model.base"] or "",
        fields["data.path"] or "",
        None,
        *knob_values(fields),
        gr.Tabs(selected="train"),
    )


def wire(
    ctx: UIContext, tab: RunsTab, demo: gr.Blocks, *, train: TrainTab, generate: GenerateTab, tabs: gr.Tabs
) -> None:
    """The tab's events; ``train``, ``generate`` and ``tabs`` receive what the hand-off buttons send."""

    def list_all():
        return _list_all(ctx)

    tab.refresh.click(list_all, None, tab.listing, **INTERNAL)
    demo.load(list_all, None, tab.listing, **INTERNAL)

    def pick(name):
        return _pick(ctx, name)

    tab.pick.change(user_errors(pick), [tab.pick], [tab.summary, tab.report, tab.report_file], **INTERNAL)

    @user_errors
    def open_report(name):
        return _open_report(ctx, name)

    tab.report_btn.click(open_report, [tab.pick], [tab.report, tab.report_file, tab.table], **INTERNAL)

    @user_errors
    def compare(a, b):
        return _compare(ctx, a, b)

    tab.compare.click(compare, [tab.run_a, tab.run_b], [tab.diff, tab.curves], **INTERNAL)

    def to_generate(name):
        return _to_generate(ctx, name)

    gen_slot = generate.slots[:2]  # adapter 1: path and scale
    tab.to_generate.click(
        to_generate, [tab.pick], [generate.base, *gen_slot, generate.prompt, tabs], **INTERNAL
    )

    def to_train(name):
        return _to_train(ctx, name)

    train_out = [train.name, train.yaml, train.base, train.data, train.sig, *train.knob_list, tabs]
    tab.to_train.click(to_train, [tab.pick], train_out, **INTERNAL)
