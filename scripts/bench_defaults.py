"""Do loracraft's defaults learn without tuning? Held-out loss of the default recipe at 200 steps
against loracraft with the diffusers reference script's settings (rank 4, alpha 4, lr 5e-4, AdamW,
constant lr) at 300 steps, per seed, in one run.

    python scripts/bench_defaults.py [--seeds 0 1 2] [--parallel 2] [--work-dir DIR] [--json FILE]

Method. Data: the demo's style set on the bundled toy base (32 px; 48 styled + 96 plain scenes; the
held-out split holds shape/colour pairs never trained on). Each (recipe, seed) is one ``loracraft
train`` process with batch 8, one thread, ``validation.heldout`` = the held-out split and a checkpoint
at the last step: the figure is the held-out denoising loss logged there (fixed noise and timesteps per
image, so recipes and seeds are compared on the same draws). The default recipe sets nothing but the
data, the batch size and the step count. Then the default recipe runs on a second dataset (the same
scenes in an inverted-colour look, captioned "in invstyle style") at batch 8 and at batch 1 (the
default batch size): it must stay finite and end below the base's held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REFERENCE = ["lora.rank=4", "lora.alpha=4", "train.lr=5e-4", "train.optimizer=adamw", "train.lr_scheduler=constant",
             "train.warmup_steps=0"]
RECIPES = {"default": ([], 200), "reference": (REFERENCE, 300)}


def write_inverted_dataset(root: Path, n_train: int = 48, n_heldout: int = 16, seed: int = 0) -> Path:
    """The second dataset: toy scenes with their colours inverted, captioned with another trigger."""
    from PIL import ImageOps

    from loracraft.infer.toyworld.scenes import random_scene, render, split_combinations

    if (root / "heldout" / "metadata.jsonl").is_file():
        return root
    rng = random.Random(seed)
    for split, n, combos in zip(("train", "heldout"), (n_train, n_heldout), split_combinations(), strict=True):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            scene = random_scene(rng, combos)
            ImageOps.invert(render(scene)).save(folder / f"{i:04d}.png")
            rows.append({"file_name": f"{i:04d}.png", "text": f"{scene.caption} in invstyle style"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def heldout_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["heldout_loss"] for r in rows if "heldout_loss" in r}


def train(data: Path, out: Path, overrides: list[str], steps: int, seed: int, batch: int = 8) -> dict:
    """One ``loracraft train`` run; its held-out loss at step 0 (the base) and at the end."""
    from loracraft.infer.toyworld import toy_base_path

    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(json.dumps({"model": {"base": str(toy_base_path())}, "data": {"path": str(data / "train")}}))
    cmd = [sys.executable, "-m", "loracraft.train.cli", "train", str(config),
           "data.resolution=32", "data.center_crop=true", f"train.batch_size={batch}", f"train.max_steps={steps}",
           f"train.seed={seed}", "train.threads=1", f"checkpoint.every={steps}", "checkpoint.keep=1",
           f"validation.heldout={data / 'heldout'}", "output.report=false", "output.report_to=[]",
           f"output.dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(f"{out}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    losses = heldout_losses(out) if (out / "logs" / "metrics.jsonl").is_file() else {}
    return {"rc": rc, "steps": steps, "seed": seed, "batch": batch, "base": losses.get(0), "end": losses.get(steps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each uses one thread)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--candidate", action="append", default=[], metavar="KEY=VALUE",
                   help="add to the default recipe: try a default before changing it in the schema")
    p.add_argument("--only-seed-runs", action="store_true", help="skip the second dataset")
    a = p.parse_args(argv)
    RECIPES["default"] = (a.candidate, RECIPES["default"][1])
    from loracraft.train.commands.demo import write_demo_dataset

    root = a.work_dir or Path(tempfile.mkdtemp(prefix="loracraft-bench-defaults-"))
    demo, other = write_demo_dataset(root / "data-demo"), write_inverted_dataset(root / "data-inverted")
    jobs = {(name, s): (demo, root / "runs" / f"{name}-seed{s}", over, steps, s, 8)
            for name, (over, steps) in RECIPES.items() for s in a.seeds}
    jobs |= {} if a.only_seed_runs else {("other-default", b): (other, root / "runs" / f"other-default-b{b}", [], 200, 0, b) for b in (8, 1)}
    with ThreadPoolExecutor(a.parallel) as pool:
        futures = {k: pool.submit(train, *v) for k, v in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    failed = [k for k, r in results.items() if r["rc"] != 0 or r["end"] is None]
    if failed:
        print(f"bench_defaults: runs failed: {failed}; see the .log files under {root / 'runs'}", file=sys.stderr)
    rows = []
    for s in a.seeds:
        d, r = results[("default", s)], results[("reference", s)]
        ratio = d["end"] / r["end"] if d["end"] and r["end"] else float("nan")
        rows.append({"seed": s, "base": d["base"], "default_200": d["end"], "reference_300": r["end"], "ratio": ratio})
        print(f"seed {s}: held-out loss base {d['base']:.4f}, default@200 {d['end']:.4f}, "
              f"reference settings@300 {r['end']:.4f}, default/reference = {ratio:.3f}")
    worst = max(r["ratio"] for r in rows)
    print(f"default recipe at 200 steps / reference settings at 300 steps: mean "
          f"{statistics.mean(r['ratio'] for r in rows):.3f}, worst {worst:.3f} over {len(rows)} seeds "
          f"({'goal met' if worst <= 1.0 else 'goal NOT met'}: <= 1.0)")
    for b in () if a.only_seed_runs else (8, 1):
        o = results[("other-default", b)]
        ok = o["end"] is not None and o["base"] is not None and o["end"] < o["base"]
        print(f"second dataset (inverted colours), default recipe, batch {b}, 200 steps: held-out loss "
              f"{o['base']} -> {o['end']} ({'learns, finite' if ok else 'DIVERGED or no gain'})")
    if a.json:
        a.json.write_text(json.dumps({"seeds": rows, "other": {b: results[("other-default", b)] for b in (8, 1) if ("other-default", b) in results},
                                      "failed": [list(map(str, k)) for k in failed]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
