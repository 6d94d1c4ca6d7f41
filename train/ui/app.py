"""The Gradio app of ``loracraft ui``: the four tabs assembled, and the server that runs them.

Each tab lives in its own module (``tab_data``, ``tab_train``, ``tab_runs``, ``tab_generate``):
a ``layout`` that places its components and a ``wire`` that connects their events to
:mod:`loracraft.train.ui.backend`. Nothing here trains, checks or generates by itself.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from loracraft.infer.errors import UsageError
from loracraft.train.ui import tab_data, tab_generate, tab_runs, tab_train
from loracraft.train.ui.common import CSS, UIContext, theme


def build_app(runs_dir: str | Path, ctx: UIContext | None = None) -> gr.Blocks:
    """The whole UI as a ``gr.Blocks`` (not launched)."""
    ctx = ctx or UIContext.for_runs_dir(runs_dir)
    with gr.Blocks(title="loracraft") as demo:
        gr.Markdown(
            "## loracraft · LoRA training for Stable Diffusion\n"
            f"<span class='hint'>Runs folder: <code>{html.escape(str(ctx.runs.runs_dir))}</code> · every "
            "button runs the same code as the <code>loracraft</code> command line.</span>"
        )
        with gr.Tabs(selected="dataset") as tabs:
            data = tab_data.layout()
            train = tab_train.layout(ctx)
            runs = tab_runs.layout(ctx)
            generate = tab_generate.layout()
        tab_data.wire(ctx, data, train_data=train.data, tabs=tabs)
        tab_train.wire(ctx, train, demo)
        tab_runs.wire(ctx, runs, demo, train=train, generate=generate, tabs=tabs)
        tab_generate.wire(ctx, generate)
    return demo


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
