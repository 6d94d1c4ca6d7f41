"""The Gradio app of ``loracraft ui``: the four tabs assembled, and the server that runs them.

Each tab lives in its own module (``tab_data``, ``tab_train``, ``tab_runs``, ``tab_generate``):
a ``layout`` that places its components and a ``wire`` that connects their events to
:mod:`loracraft.train.ui.backend`. Nothing here trains, checks or generates by itself.

The app is mounted in an outer FastAPI app whose first middleware is
:class:`~loracraft.train.ui.server.RequestGuard` (own host names, own origin, per-launch
secret), so the checks cover every route Gradio serves, including the queue's streams.
"""

from __future__ import annotations

import html
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from loracraft.train.ui import tab_data, tab_generate, tab_runs, tab_train
from loracraft.train.ui.common import CSS, UIContext, theme
from loracraft.train.ui.server import (
    Access,
    RequestGuard,
    Server,
    allowed_hosts,
    bind,
    cookie_name,
    host_names,
    new_token,
    url_host,
)


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


@dataclass
class RunningUI:
    """A served UI: ``url`` is the address to open (with ``?token=`` when the secret guards it)."""

    url: str
    token: str | None
    demo: gr.Blocks
    server: Server

    def close(self) -> None:
        self.server.close()


def serve(
    demo: gr.Blocks,
    *,
    host: str,
    port: int,
    auth=None,
    allowed_paths: list[str] | None = None,
    allow_hosts: tuple[str, ...] = (),
) -> RunningUI:
    """Serve ``demo`` behind the guard; ``auth`` (Gradio logins) replaces the per-launch secret."""
    from fastapi import FastAPI

    sock = bind(host, port)  # first: a taken port fails before anything else starts
    port = sock.getsockname()[1]
    token = None if auth else new_token()
    access = Access(allowed_hosts(host_names(host, allow_hosts), port), token, cookie_name(port))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, access=access)
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        server_name=host,
        server_port=port,
        auth=auth,
        auth_message="loracraft: log in with the credentials from LORACRAFT_UI_AUTH or --auth-file",
        allowed_paths=allowed_paths,
        theme=theme(),
        css=CSS,
        footer_links=["api"],
        run_history=False,
        ssr_mode=False,
        show_error=True,
    )
    server = Server(app, sock)
    server.start()
    shown = url_host(socket.gethostname() if host.strip("[]") in ("0.0.0.0", "::", "") else host)
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    return RunningUI(url=url, token=token, demo=demo, server=server)


def launch(
    runs_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth=None,
    allow_hosts: tuple[str, ...] = (),
    block: bool = True,
) -> RunningUI:
    """Build and serve the UI; prints the address to open. ``block=False`` returns while it serves."""
    demo = build_app(runs_dir)
    demo.queue(default_concurrency_limit=2)
    runs_abs = str(Path(runs_dir).expanduser().resolve())
    ui = serve(demo, host=host, port=port, auth=auth, allowed_paths=[runs_abs], allow_hosts=allow_hosts)
    print(f"loracraft ui: open {ui.url}", flush=True)
    if not block:
        return ui
    try:
        while ui.server.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        ui.close()
    return ui
