"""``loracraft eval RUN_DIR``: did the LoRA learn what it was trained on, and what else did it change?

Figures against the base on the same seeds, written to ``RUN_DIR/eval.json``. Each figure is
either computed or says why it was not (``{"not_computed": reason}``), never a number that
means nothing for the run at hand:

(a) held-out denoising loss (any run with a held-out folder): the diffusion loss on held-out
    images with noise and timesteps fixed per image, base vs adapter, as a relative reduction.
(b) drift (any run with a trigger): mean absolute pixel difference base vs LoRA on prompts
    *without* the trigger, as a fraction of the same difference *with* it. A good style LoRA
    changes little without its trigger.
(c) toy-world figures, only for runs on the bundled toy world (scene captions and the demo's
    trigger): the style score (``loracraft.infer.toyworld.style_score``: stripes and dark edges)
    of trigger generations, as progress from the base to the style set; and *content kept*: the
    toy world's shape/colour probe on the LoRA's trigger images, relative to the base's probe
    accuracy on the same prompts without the trigger. The style score alone said 97 % for
    images a person would call broken; content kept is what tells the style *on the prompt's
    content* from noise in the style's colours.

The trigger comes from ``--trigger``, else the run's ``preserve.trigger``; without one, the
figures that need it say so.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from loracraft.infer.errors import UsageError
from loracraft.infer.io import write_json_atomic

#: Figures of the toy world are only meaningful with its own trigger.
TOY_TRIGGER = "in lcstyle style"


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(getattr(g, "image", g), dtype=np.float64) for g in images])


def mean_abs_px(a, b) -> float:
    """Mean absolute pixel difference (0-255 scale) between two equally long image lists."""
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def drift_figures(base_trigger, lora_trigger, base_plain, lora_plain) -> dict:
    """How much the adapter changes images without its trigger, relative to with it."""
    trigger_shift, plain_shift = mean_abs_px(lora_trigger, base_trigger), mean_abs_px(lora_plain, base_plain)
    return {
        "plain_prompts_mean_abs_px": plain_shift, "trigger_prompts_mean_abs_px": trigger_shift,
        "ratio": plain_shift / trigger_shift if trigger_shift else float("nan"),
    }


def style_progress(base: float, lora: float, style_set: float) -> float:
    """Fraction of the way from the base's style score to the style set's (1 = all the way)."""
    return (lora - base) / (style_set - base) if style_set != base else float("nan")


def content_kept(lora_trigger_accuracy: float, base_plain_accuracy: float) -> float:
    """The probe's accuracy on the LoRA's trigger images relative to the base's on the plain
    prompts: 1 = the adapter draws the prompt's content as well as the base does."""
    return lora_trigger_accuracy / base_plain_accuracy if base_plain_accuracy else float("nan")


def strip_trigger(caption: str, trigger: str) -> str:
    """The caption without the trigger phrase (and the separator it leaves behind)."""
    out = re.sub(r"\s*,?\s*" + re.escape(trigger.strip()), "", caption).strip(" ,")
    return re.sub(r"\s{2,}", " ", out)


def with_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger phrase appended when it does not hold it yet."""
    return caption if trigger.strip() in caption else f"{caption.rstrip()} {trigger.strip()}"


def resolve_trigger(cfg: dict, flag: str | None) -> str | None:
    """``--trigger`` first, then the run's ``preserve.trigger``; None when the run has neither."""
    if flag is not None:
        if not flag.strip():
            raise UsageError("--trigger is empty, command line, pass the words your captions use, e.g. --trigger 'in mystyle style'")
        return flag.strip()
    preserve = cfg.get("preserve") or {}
    return (preserve.get("trigger") or "").strip() or None


def prompt_pairs(captions: list[str], trigger: str, n: int) -> tuple[list[str], list[str]]:
    """(prompts with the trigger, the same prompts without it), from distinct captions."""
    base_captions = sorted({strip_trigger(c, trigger) for c in captions})[:n]
    return [with_trigger(c, trigger) for c in base_captions], base_captions


def is_toy_world(captions: list[str], trigger: str | None) -> bool:
    """The toy world's figures apply only to its own scene captions and trigger."""
    from loracraft.infer.toyworld.probe import parse_caption

    if trigger != TOY_TRIGGER or not captions:
        return False
    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return False
    return True


def _not_computed(reason: str) -> dict:
    return {"not_computed": reason}


def _run_path(value: str | None, run_dir: Path) -> Path | None:
    """A path from run.json: absolute as written, else relative to the working directory or, for
    runs moved or evaluated from elsewhere, to the run folder's parent."""
    if not value:
        return None
    p = Path(value)
    if p.is_absolute() or p.exists():
        return p
    return run_dir.parent / p


def find_heldout(cfg: dict, run_dir: Path, flag: str | Path | None) -> Path | None:
    """``--heldout``, else the run's ``validation.heldout`` folder, else a ``heldout`` folder
    beside the training data (the demo's layout); None when there is none."""
    if flag:
        heldout = Path(flag)
        if not heldout.is_dir():
            raise UsageError(f"held-out folder not found, --heldout {heldout}, pass an existing image folder")
        return heldout
    configured = (cfg.get("validation") or {}).get("heldout")
    if isinstance(configured, str) and not re.fullmatch(r"[0-9.]+", configured):
        candidate = _run_path(configured, run_dir)
        if candidate is not None and candidate.is_dir():
            return candidate
    data = _run_path((cfg.get("data") or {}).get("path"), run_dir)
    beside = data.parent / "heldout" if data is not None else None
    return beside if beside is not None and beside.is_dir() else None


def _read_manifest(run_dir: Path) -> dict:
    from loracraft.infer.names import run_adapter_file

    manifest_path = run_dir / "run.json"
    if not run_adapter_file(run_dir).is_file() or not manifest_path.is_file():
        raise UsageError(f"no finished run in {run_dir}, train it first (loracraft train / loracraft demo)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"run.json is not JSON, {manifest_path}, restore it or re-run training ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise UsageError(f"run.json has no 'config' section, {manifest_path}, it was not written by loracraft")
    return manifest


def evaluate(
    run_dir: str | Path,
    heldout: str | Path | None = None,
    trigger: str | None = None,
    n_prompts: int = 8,
    images_per_prompt: int = 1,
    seed: int = 0,
) -> dict:
    """Compute every figure that applies to the run; write and return ``eval.json``'s content."""
    from loracraft.infer.adapters import load_adapter, set_scales
    from loracraft.infer.formats import file_sha256
    from loracraft.infer.generation import generate
    from loracraft.infer.models import load_base
    from loracraft.infer.names import run_adapter_file
    from loracraft.train.data import load_captioned_images
    from loracraft.train.validation import heldout_loss  # torch: imported by the command, not by --help

    run_dir = Path(run_dir)
    cfg = _read_manifest(run_dir)["config"]
    trigger = resolve_trigger(cfg, trigger)
    heldout_dir = find_heldout(cfg, run_dir, heldout)
    images = load_captioned_images(str(heldout_dir)) if heldout_dir else None
    fraction = (cfg.get("validation") or {}).get("heldout")
    if images is None and isinstance(fraction, float):  # the share of the data the run set aside
        from loracraft.train.validation import split_heldout

        d = cfg["data"]
        if d.get("concepts"):  # the trainer split the merged concepts; one folder's split would be other images
            raise UsageError(f"{run_dir} set aside {fraction:g} of several datasets (data.concepts), eval cannot "
                             "re-split them, pass --heldout DIR (images the run never trained on)")
        data = load_captioned_images(str(_run_path(d["path"], run_dir)), d["image_column"], d["caption_column"])
        images = split_heldout(data, fraction, cfg["train"]["seed"])[1]
        heldout_dir = f"{fraction:g} of {d['path']} (validation.heldout)"
    captions = [images.caption(i) for i in range(len(images))] if images else []
    res, v = cfg["data"]["resolution"], cfg["validation"]
    model = cfg["model"]
    pipe = load_base(model["base"], revision=model.get("revision"), variant=model.get("variant"))
    adapter = load_adapter(pipe, run_adapter_file(run_dir))
    gen = dict(seed=seed, steps=v["steps"], guidance=v["guidance"], width=res, height=res,
               num_images_per_prompt=images_per_prompt)

    def at_scale(scale: float, fn):
        set_scales(pipe, {adapter.name: scale})
        return fn()

    result: dict = {"trigger": trigger, "heldout": str(heldout_dir) if heldout_dir else None, "seed": seed,
                    "adapter_sha256": file_sha256(run_adapter_file(run_dir))}  # the report spots a stale eval
    if images is None:
        result["heldout_loss"] = _not_computed(
            "no held-out folder: pass --heldout DIR (images the run never trained on)")
    else:
        base_loss, lora_loss = (at_scale(s, lambda: heldout_loss(pipe, images, res)) for s in (0.0, 1.0))
        result["heldout_loss"] = {"base": base_loss, "lora": lora_loss,
                                  "relative_reduction": (base_loss - lora_loss) / base_loss}
    if trigger is None:
        why = "no trigger: pass --trigger WORDS (or set preserve.trigger in the run's config)"
        result["drift"] = _not_computed(why + "; drift compares prompts with and without it")
        result["toy_world"] = _not_computed(why)
    elif not captions:
        result["drift"] = _not_computed("no prompts: pass --heldout DIR, whose captions give the prompts")
        result["toy_world"] = _not_computed("no prompts: pass --heldout DIR")
    else:
        trig_prompts, plain_prompts = prompt_pairs(captions, trigger, n_prompts)
        result["prompts"] = trig_prompts
        out = {s: {kind: at_scale(s, lambda p=p: generate(pipe, p, **gen))
                   for kind, p in (("trigger", trig_prompts), ("plain", plain_prompts))} for s in (0.0, 1.0)}
        set_scales(pipe, {adapter.name: 1.0})
        result["drift"] = drift_figures(out[0.0]["trigger"], out[1.0]["trigger"], out[0.0]["plain"], out[1.0]["plain"])
        result["toy_world"] = (
            toy_world_figures(images, out, trig_prompts, plain_prompts, images_per_prompt)
            if is_toy_world(captions, trigger)
            else _not_computed(f"applies to the bundled toy world only (scene captions, trigger {TOY_TRIGGER!r})")
        )
    write_json_atomic(run_dir / "eval.json", result)
    return result


def toy_world_figures(images, out: dict, trig_prompts, plain_prompts, per_prompt: int) -> dict:
    """Style score progress and content kept, from the generations :func:`evaluate` made."""
    from loracraft.infer.toyworld.probe import probe_accuracy
    from loracraft.infer.toyworld.style_score import mean_style_score

    def repeat(prompts):
        return [p for p in prompts for _ in range(per_prompt)]

    style_set = mean_style_score(images.image(i) for i in range(len(images)))
    s_base = mean_style_score(g.image for g in out[0.0]["trigger"])
    s_lora = mean_style_score(g.image for g in out[1.0]["trigger"])
    labels = [strip_trigger(p, TOY_TRIGGER) for p in repeat(trig_prompts)]
    lora_trigger = probe_accuracy([g.image for g in out[1.0]["trigger"]], labels)
    base_plain = probe_accuracy([g.image for g in out[0.0]["plain"]], repeat(plain_prompts))
    return {
        "style_score": {"base": s_base, "lora": s_lora, "style_set": style_set,
                        "progress": style_progress(s_base, s_lora, style_set)},
        "content": {"lora_trigger_probe": lora_trigger["full"], "base_plain_probe": base_plain["full"],
                    "kept": content_kept(lora_trigger["full"], base_plain["full"]), "images": lora_trigger["n"]},
    }


def format_eval(r: dict, goals: bool = False) -> str:
    """One line per figure; a figure that was not computed says why. ``goals`` adds the demo's goals."""

    def goal(text: str) -> str:
        return f"; goal {text}" if goals else ""

    lines = []
    h = r["heldout_loss"]
    lines.append(f"held-out denoising loss: not computed, {h['not_computed']}" if "not_computed" in h else
                 f"held-out denoising loss: base {h['base']:.4f} -> LoRA {h['lora']:.4f} "
                 f"({h['relative_reduction']:+.1%} reduction{goal('>= 20%')})")
    d = r["drift"]
    lines.append(f"drift without the trigger: not computed, {d['not_computed']}" if "not_computed" in d else
                 f"drift without the trigger: {d['plain_prompts_mean_abs_px']:.2f} px vs "
                 f"{d['trigger_prompts_mean_abs_px']:.2f} px with it = {d['ratio']:.1%}{goal('< 10%')}")
    t = r["toy_world"]
    if "not_computed" in t:
        lines.append(f"toy-world style score and content kept: not computed, {t['not_computed']}")
    else:
        s, c = t["style_score"], t["content"]
        lines.append(f"toy-world style score of trigger images: base {s['base']:.3f}, LoRA {s['lora']:.3f}, "
                     f"style set {s['style_set']:.3f} -> {s['progress']:.0%} of the way{goal('>= 80%')}")
        lines.append(f"toy-world content kept: the probe reads {c['lora_trigger_probe']:.0%} of the LoRA's trigger "
                     f"images right vs {c['base_plain_probe']:.0%} of the base's plain ones = {c['kept']:.2f}x"
                     f"{goal('>= 0.9x')}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.prompts <= 0 or args.images_per_prompt <= 0:
        raise UsageError("--prompts and --images-per-prompt must be positive, command line, e.g. --prompts 8")
    result = evaluate(args.run_dir, args.heldout, trigger=args.trigger, n_prompts=args.prompts,
                      images_per_prompt=args.images_per_prompt, seed=args.seed)
    print(format_eval(result))
    print(f"written to {Path(args.run_dir) / 'eval.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a LoRA against its base: held-out loss, drift without the trigger",
                       description="Held-out denoising loss, drift on prompts without the trigger and, for the toy "
                       "world, style score and content kept; writes RUN_DIR/eval.json. A figure that does not "
                       "apply to the run says why.")
    p.add_argument("run_dir")
    p.add_argument("--heldout", help="held-out image folder (default: validation.heldout, or <data.path>/../heldout)")
    p.add_argument("--trigger", help="the trigger words of the captions (default: the run's preserve.trigger)")
    p.add_argument("--prompts", type=int, default=8, help="distinct held-out captions to generate from (default 8)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="seeds per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)
