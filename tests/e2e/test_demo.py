"""`loracraft demo` end to end on the bundled toy base (a few steps: checks wiring, not quality)."""

import json

from PIL import Image


def test_short_demo_writes_grid_eval_and_report(tmp_path, cli):
    out = tmp_path / "demo"
    proc = cli("demo", "--out", out, "--steps", "12", "validation.every=12", "validation.steps=3",
               "validation.num_images=1", "checkpoint.every=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before/after grid" in proc.stdout and "report:" in proc.stdout
    grid = Image.open(out / "before_after.png")
    assert grid.size[1] == 2 * 32 * 4  # two rows (base, LoRA) of 32 px images, shown 4x
    ev = json.loads((out / "run" / "eval.json").read_text())
    assert {"heldout_loss", "toy_world", "drift"} <= set(ev) and ev["trigger"] == "in lcstyle style"
    assert ev["toy_world"]["style_score"]["style_set"] > 0.9  # the held-out style images themselves
    assert ev["toy_world"]["content"]["images"] == 4 * len(ev["prompts"])  # 4 seeds per prompt
    assert "toy-world content kept" in proc.stdout
    page = (out / "run" / "report.html").read_text()
    for section in ('id="summary"', 'id="curves"', 'id="validation"', 'id="sweep"', 'id="eval"', 'id="manifest"'):
        assert section in page
    # the dataset folders the demo wrote are the documented layout
    assert (out / "data" / "train" / "metadata.jsonl").is_file() and (out / "data" / "heldout").is_dir()
