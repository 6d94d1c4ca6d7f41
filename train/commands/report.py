"""``report.html``: one self-contained page per run (images inlined) to judge a LoRA at a glance.

Sections: run summary, loss (raw + smoothed) and LR curves, validation grids over training,
a LoRA-scale sweep (0 .. 1) on fixed seeds, the checkpoints side by side (held-out loss, files,
samples; the lowest held-out loss named best), evaluation figures (``eval.json``) when present,
and the full manifest. Written at the end of every run and by ``loracraft report RUN_DIR``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

from loracraft.infer.errors import UsageError
from loracraft.infer.names import run_adapter_file

SWEEP_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict]:
    """The training-loss rows (``{"step", "loss", "lr"}``); held-out rows are in :func:`read_heldout_rows`."""
    return [r for r in _metric_rows(run_dir) if "loss" in r]


def read_heldout_rows(run_dir: Path) -> dict[int, float]:
    """``{step: held-out loss}`` as logged during training (step 0 = before training)."""
    return {int(r["step"]): float(r["heldout_loss"]) for r in _metric_rows(run_dir) if "heldout_loss" in r}


def checkpoint_rows(run_dir: Path) -> list[dict]:
    """One row per kept checkpoint: step, held-out loss (None without validation.heldout), its
    adapter files and its validation grid."""
    from loracraft.train.checkpoint import list_checkpoints
    from loracraft.train.validation import read_heldout

    logged = read_heldout_rows(run_dir)
    rows = []
    for step, folder in list_checkpoints(run_dir / "checkpoints"):
        loss = read_heldout(folder)
        kohya = sorted(folder.glob(f"*-step-{step:06d}.safetensors"))
        diffusers = sorted(folder.glob("*_weights.safetensors"))
        grid = run_dir / "samples" / f"step-{step:06d}.png"
        rows.append({"step": step, "heldout_loss": loss if loss is not None else logged.get(step), "folder": folder,
                     "diffusers": diffusers[0] if diffusers else None, "kohya": kohya[0] if kohya else None,
                     "samples": grid if grid.is_file() else None})
    return rows


def best_checkpoint(rows: list[dict]) -> dict | None:
    """The checkpoint with the lowest held-out loss; None when no checkpoint has one."""
    scored = [r for r in rows if r["heldout_loss"] is not None]
    return min(scored, key=lambda r: r["heldout_loss"]) if scored else None


def checkpoints_html(run_dir: Path) -> str:
    rows, before = checkpoint_rows(run_dir), read_heldout_rows(run_dir).get(0)
    if not rows:
        return "<p>no checkpoints kept (checkpoint.every, checkpoint.keep)</p>"
    best = best_checkpoint(rows)
    if best is None:
        head = ("<p>No held-out loss was measured, so no checkpoint can be named best: set "
                "<code>validation.heldout</code> (a folder of captioned images, or a fraction such as 0.1) "
                "and train again.</p>")
    else:
        base = f" (before training: {before:.5f})" if before is not None else ""
        head = (f'<p class="best">Best checkpoint: <strong>step {best["step"]}</strong>, held-out loss '
                f'{best["heldout_loss"]:.5f}{base}; its files are in '
                f'<code>{html.escape(str(best["folder"]))}</code>.</p>')

    def cell(row: dict) -> str:
        loss = "n/a" if row["heldout_loss"] is None else f"{row['heldout_loss']:.5f}"
        files = [html.escape(row[k].name) if row[k] is not None else "-" for k in ("diffusers", "kohya")]
        grid = (f'<img alt="samples step {row["step"]}" src="{_png_data_uri(_open(row["samples"]))}">'
                if row["samples"] is not None else "-")
        mark = ' class="best"' if best is not None and row is best else ""
        return (f"<tr{mark}><td>{row['step']}</td><td>{loss}</td><td>{files[0]}</td><td>{files[1]}</td>"
                f"<td>{grid}</td></tr>")

    table = ("<table><tr><th>step</th><th>held-out loss</th><th>diffusers file</th><th>kohya file</th>"
             "<th>samples</th></tr>" + "".join(cell(r) for r in rows) + "</table>")
    return head + table


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _png_data_uri(fig_or_image) -> str:
    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    else:
        fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curves_png(rows: list[dict]) -> str | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(steps, losses, alpha=0.35, label="raw")
    ax1.plot(steps, smooth(losses), label="smoothed (EMA 0.9)")
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax1.legend()
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:green")
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    uri = _png_data_uri(fig)
    plt.close(fig)
    return uri


def sweep_grid(run_dir: Path, manifest: dict, prompts: list[str], pipe=None):
    """The adapter at each of SWEEP_SCALES (rows) for each prompt (columns), same seeds.

    ``pipe``: a pipeline of the run's base already in memory (the trainer's, at the end of a run);
    the run's adapter file is loaded into it as a user would load it, and taken out again after.
    Without one the base is read from disk."""
    from loracraft.infer.adapters import load_adapter, remove_adapter
    from loracraft.infer.generation import make_grid, sweep_scales
    from loracraft.infer.models import load_base

    cfg = manifest["config"]
    v, res = cfg["validation"], cfg["data"]["resolution"]
    reused = pipe is not None
    if reused:
        print("report: scale sweep on the base already in memory", file=sys.stderr, flush=True)
    else:
        print("report: loading the base for the scale sweep", file=sys.stderr, flush=True)
        pipe = load_base(cfg["model"]["base"], revision=cfg["model"].get("revision"),
                         variant=cfg["model"].get("variant"))
    adapter = load_adapter(pipe, run_adapter_file(run_dir), name="report-sweep")
    rows = []
    try:
        for i, scale in enumerate(SWEEP_SCALES):  # one scale at a time, to show progress; same seeds each
            print(f"report: scale sweep {i + 1}/{len(SWEEP_SCALES)}", file=sys.stderr, flush=True)
            rows += sweep_scales(
                pipe, [scale], prompt=prompts, seed=v["seed"], steps=v["steps"], guidance=v["guidance"],
                width=res, height=res,
            )
    finally:
        if reused:
            remove_adapter(pipe, adapter.name)
    images = [g.image for row in rows for g in row]
    return make_grid(images, rows=len(SWEEP_SCALES), cols=len(prompts))


def _sweep_prompts(manifest: dict) -> list[str]:
    prompts = [p["prompt"] if isinstance(p, dict) else p for p in manifest["config"]["validation"]["prompts"]]
    if prompts:
        return prompts[:4]
    from loracraft.train.data import load_captioned_images

    d = manifest["config"]["data"]
    # data.concepts only: the first concept's captions, read with its own columns
    first = {"path": d["path"]} if d.get("path") else d["concepts"][0]
    images = load_captioned_images(first["path"], first.get("image_column") or d["image_column"],
                                   first.get("caption_column") or d["caption_column"])
    return [images.caption(i) for i in range(min(2, len(images)))]


def _datasets(data: dict) -> str:
    """data.path and every data.concepts path (with its repeats), as trained."""
    paths = [data["path"]] if data.get("path") else []
    paths += [f"{c['path']} (x{c.get('repeats') or 1})" for c in data.get("concepts") or []]
    return ", ".join(paths) or "n/a"


def _table(pairs) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def write_report(run_dir: str | Path, sweep: bool = True, pipe=None) -> Path:
    """``report.html`` of a run; ``pipe``: the base already in memory for the scale sweep (see :func:`sweep_grid`)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "run.json"
    if not manifest_path.is_file():
        raise UsageError(f"no run.json in {run_dir}, point `loracraft report` at a run directory")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    rows = read_metrics(run_dir)
    parts = [f"<h1>loracraft run: {html.escape(run_dir.name)}</h1>"]
    final_loss = rows[-1]["loss"] if rows else None
    parts.append('<h2 id="summary">Summary</h2>' + _table([
        ("status", manifest.get("status")), ("steps", manifest.get("steps")),
        ("final loss", f"{final_loss:.5f}" if final_loss is not None else "n/a"),
        ("base", manifest["config"]["model"]["base"]), ("dataset", _datasets(manifest["config"]["data"])),
        ("rank / alpha", f"{manifest['config']['lora']['rank']} / {manifest['config']['lora']['alpha']}"),
        ("weights sha256", manifest.get("weights_sha256")), ("wall time (s)", manifest.get("wall_time_s")),
    ]))
    curves = curves_png(rows)
    parts.append('<h2 id="curves">Loss and learning rate</h2>'
                 + (f'<img alt="loss and lr curves" src="{curves}">' if curves else "<p>no metrics logged</p>"))
    samples = sorted((run_dir / "samples").glob("step-*.png")) if (run_dir / "samples").is_dir() else []
    parts.append('<h2 id="validation">Validation images over training</h2>' + (
        "".join(f'<figure><img alt="{s.stem}" src="{_png_data_uri(_open(s))}"><figcaption>{s.stem}</figcaption></figure>'
                for s in samples) or "<p>no validation images (set validation.prompts)</p>"))
    sweep_html = "<p>skipped</p>"
    if sweep and run_adapter_file(run_dir).is_file():
        prompts = _sweep_prompts(manifest)
        grid = sweep_grid(run_dir, manifest, prompts, pipe)
        grid.save(run_dir / "samples" / "scale-sweep.png") if (run_dir / "samples").is_dir() else None
        sweep_html = (f"<p>rows: LoRA scale {', '.join(str(s) for s in SWEEP_SCALES)} (top to bottom); "
                      f"columns: {html.escape(' | '.join(prompts))}</p>"
                      f'<img class="pixel" alt="scale sweep" src="{_png_data_uri(grid)}">')
    parts.append('<h2 id="sweep">LoRA scale sweep</h2>' + sweep_html)
    parts.append('<h2 id="checkpoints">Checkpoints</h2>' + checkpoints_html(run_dir))
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text(encoding="utf-8"))
        parts.append('<h2 id="eval">Evaluation</h2>' + _stale_note(ev, run_dir) + _table(_flat(ev)))
    parts.append('<h2 id="manifest">Run manifest</h2><pre>'
                 + html.escape(json.dumps(manifest, indent=2, sort_keys=True)) + "</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "img.pixel,figure img,td img{image-rendering:pixelated;min-width:256px}tr.best{background:#e8f5e9}"
             "figure{display:inline-block;margin:4px}"
             "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>loracraft report: "
            f"{html.escape(run_dir.name)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    out = run_dir / "report.html"
    from loracraft.infer.io import write_text_atomic

    write_text_atomic(out, page)
    return out


def _stale_note(ev: dict, run_dir: Path) -> str:
    """eval.json outlives the adapter it measured when a run is extended: say so next to it."""
    from loracraft.infer.formats import file_sha256

    adapter = run_adapter_file(run_dir)
    if adapter.is_file() and ev.get("adapter_sha256") == file_sha256(adapter):
        return ""
    return ('<p class="stale"><strong>Stale:</strong> these figures were computed for another adapter than the '
            "run's current one (the run was extended or re-trained); run <code>loracraft eval</code> again.</p>")


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", round(v, 4) if isinstance(v, float) else v))
    return out


def cmd_report(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir, sweep=not args.no_sweep)
    print(f"report written to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html (curves, samples, scale sweep, eval)",
                       description="Write a self-contained HTML report of a training run.")
    p.add_argument("run_dir")
    p.add_argument("--no-sweep", action="store_true", help="skip generating the LoRA-scale sweep")
    p.set_defaults(func=cmd_report)
