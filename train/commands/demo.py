"""``loracraft demo``: the embedded default — learn a visible style on the bundled toy base.

1. writes the style dataset: scenes in the "lcstyle" look (diagonal stripes + dark outline)
   captioned "... in lcstyle style", plus twice as many plain scenes with plain captions
   (regularisation: without the trigger nothing should change), and a held-out split of
   shape/colour combinations never trained on. The plain scenes train toward the base's own
   prediction (``preserve:`` in ``configs/demo.yaml``), not the noise: measured on the toy base
   (600 steps), non-trigger drift 17% with 3 plain per styled trained on the noise, 8% with 2
   plain per styled preserved at weight 10;
2. trains ``configs/demo.yaml`` on the toy base;
3. writes a before/after grid (same prompts and seeds, base vs LoRA), runs ``eval`` and the
   report, and prints where everything is.
"""

from __future__ import annotations

import argparse
import json
import random
from importlib.resources import files
from pathlib import Path

from loracraft.infer.errors import UsageError
from loracraft.infer.names import LORA_WEIGHT_NAME
from loracraft.infer.toyworld.scenes import all_combinations, random_scene, render, write_style_dataset

DEMO_SEED = 0
#: Seeds per held-out prompt in the demo's eval: the content probe needs more than 8 images to mean anything.
EVAL_IMAGES_PER_PROMPT = 4


def write_demo_dataset(root: Path, n_style: int = 48, n_plain: int = 96, n_heldout: int = 16) -> Path:
    """Style train split + plain regularisation scenes + style held-out split (deterministic)."""
    if (root / "train" / "metadata.jsonl").is_file() and (root / "heldout" / "metadata.jsonl").is_file():
        return root
    write_style_dataset(root, n_train=n_style, n_heldout=n_heldout, seed=DEMO_SEED)
    rng = random.Random(DEMO_SEED + 1)
    rows = []
    for i in range(n_plain):
        scene = random_scene(rng, all_combinations())
        name = f"plain-{i:04d}.png"
        render(scene).save(root / "train" / name)
        rows.append({"file_name": name, "text": scene.caption})
    with open(root / "train" / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def before_after(run_dir: Path, out: Path, prompts: list[str], seed: int = 0) -> Path:
    """Top row: base; bottom row: base + LoRA; same prompts and seeds; upscaled for viewing."""
    from PIL import Image

    from loracraft.infer.adapters import load_adapter, set_scales
    from loracraft.infer.generation import generate, make_grid
    from loracraft.infer.models import load_base

    manifest = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    cfg = manifest["config"]
    v, res = cfg["validation"], cfg["data"]["resolution"]
    pipe = load_base(cfg["model"]["base"])
    adapter = load_adapter(pipe, run_dir / LORA_WEIGHT_NAME)
    rows = []
    for scale in (0.0, 1.0):
        set_scales(pipe, {adapter.name: scale})
        rows += [g.image for g in generate(pipe, prompts, seed=seed, steps=v["steps"], guidance=v["guidance"],
                                             width=res, height=res)]
    grid = make_grid(rows, rows=2, cols=len(prompts))
    grid = grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)
    grid.save(out)
    return out


def demo_prompts() -> list[str]:
    from loracraft.infer.toyworld.scenes import HELDOUT_PAIRS

    trig = [f"a {c} {s} on a {bg} background in lcstyle style"
            for (s, c), bg in zip(HELDOUT_PAIRS, ("blue", "green", "black"), strict=True)]
    return trig + ["a red circle on a white background in lcstyle style", "a red circle on a white background"]


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, base: str | Path | None = None) -> dict:
    from loracraft.infer.toyworld import toy_base_path
    from loracraft.train.commands.evaluate import evaluate, format_eval
    from loracraft.train.commands.report import write_report
    from loracraft.train.config import load_config
    from loracraft.train.trainer import RunAlreadyComplete, run_training

    out = Path(out)
    base = Path(base) if base else toy_base_path()
    data = write_demo_dataset(out / "data")
    run_dir = out / "run"
    recipe = files("loracraft.configs") / "demo.yaml"
    cfg = load_config(str(recipe), [f"model.base={base}", f"data.path={data / 'train'}",
                                     f"output.dir={run_dir}", *(overrides or [])])
    try:
        run_training(cfg)
    except RunAlreadyComplete as e:
        print(f"loracraft: {e}")
    grid = before_after(run_dir, out / "before_after.png", demo_prompts())
    result = evaluate(run_dir, data / "heldout", images_per_prompt=EVAL_IMAGES_PER_PROMPT)
    report = write_report(run_dir)
    print(format_eval(result, goals=True))
    print(f"before/after grid (top: base, bottom: with the LoRA): {grid}")
    print(f"adapter: {run_dir / LORA_WEIGHT_NAME}")
    print(f"report:  {report}")
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be positive (got {args.steps}), command line, pass e.g. --steps 200")
    overrides = list(args.overrides)
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
        if not any(o.startswith("train.warmup_steps=") for o in overrides):
            overrides.append(f"train.warmup_steps={min(30, args.steps // 10)}")  # recipe's warm-up, scaled
    run_demo(args.out, overrides, args.base)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="train a style LoRA on the bundled toy base and show before/after",
        description="The embedded default: style dataset -> LoRA on the toy base -> before/after grid, "
        "eval and report.",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides for configs/demo.yaml")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, help="shortcut for train.max_steps=N")
    p.add_argument("--base", help="another 32 px SD model folder instead of the bundled toy base")
    p.set_defaults(func=cmd_demo)
