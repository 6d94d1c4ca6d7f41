"""`loracraft train` as a user runs it, and the result in plain diffusers (no loracraft import there)."""

import json

import numpy as np
import torch


def _image(pipe, seed=0):
    return np.asarray(
        pipe("a red circle on a blue background", num_inference_steps=4, height=32, width=32,
             generator=torch.Generator().manual_seed(seed)).images[0],
        dtype=np.float64,
    )


def test_cli_run_writes_the_run_directory(cli_run):
    assert (cli_run / "pytorch_lora_weights.safetensors").is_file()
    manifest = json.loads((cli_run / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == 20
    assert len(manifest["weights_sha256"]) == 64 and manifest["dataset_fingerprint"]
    assert manifest["versions"]["diffusers"] and manifest["config"]["lora"]["rank"] == 8
    assert (cli_run / "samples" / "step-000020.png").is_file()
    assert [p.name for p in sorted((cli_run / "checkpoints").iterdir())] == ["step-000010", "step-000020"]
    rows = [json.loads(line) for line in (cli_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))


def test_safetensors_metadata_carries_training_parameters(cli_run):
    from safetensors import safe_open

    with safe_open(str(cli_run / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 8 and adapter["unet.lora_alpha"] == 4
    assert meta["ss_network_dim"] == "8" and meta["ss_max_train_steps"] == "20" and "loracraft_config" not in meta
    assert all(k.startswith("unet.") for k in keys)


def test_plain_diffusers_image_changes_and_unload_restores(cli_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.set_progress_bar_config(disable=True)
    base = _image(pipe)
    pipe.load_lora_weights(str(cli_run))
    with_lora = _image(pipe)
    pipe.unload_lora_weights()
    restored = _image(pipe)
    assert np.abs(with_lora - base).mean() >= 1.0, "adapter has no visible effect"
    assert np.array_equal(restored, base)


def test_rerunning_a_finished_run_exits_zero(cli_run, tiny_sd, tiny_dataset, cli):
    from importlib.resources import files

    recipe = files("loracraft.configs") / "quickstart.yaml"
    proc = cli(
        "train", recipe, f"model.base={tiny_sd}", f"data.path={tiny_dataset}", f"output.dir={cli_run}",
        "train.max_steps=20", "checkpoint.every=10",
    )
    assert proc.returncode == 0 and "already complete" in proc.stdout


def test_other_run_in_output_dir_is_refused(cli_run, tiny_sd, tiny_dataset, cli):
    from importlib.resources import files

    recipe = files("loracraft.configs") / "quickstart.yaml"
    before = (cli_run / "pytorch_lora_weights.safetensors").read_bytes()
    proc = cli(
        "train", recipe, f"model.base={tiny_sd}", f"data.path={tiny_dataset}", f"output.dir={cli_run}",
        "train.max_steps=20", "train.lr=0.5",
    )
    assert proc.returncode == 2
    assert "holds a different run" in proc.stderr and "train.lr" in proc.stderr
    assert (cli_run / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_report_has_every_section_and_inline_images(cli_run):
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.imgs, self.stack = set(), [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "id" in a:
                self.ids.add(a["id"])
            if tag == "img":
                self.imgs.append(a["src"])

    page = (cli_run / "report.html").read_text()
    parser = Collect()
    parser.feed(page)
    assert {"summary", "curves", "validation", "sweep", "manifest"} <= parser.ids
    assert len(parser.imgs) >= 3  # curves, one validation grid, the sweep
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    sweep = Image.open(cli_run / "samples" / "scale-sweep.png")
    assert sweep.size == (32, 32 * 5)  # 5 scales x 1 validation prompt


# ----------------------------------------------------------------------------- single-file bases
def _train_in_process(base, data, out, *over):
    from pathlib import Path

    from loracraft.train.cli import main

    recipe = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
    return main([
        "train", str(recipe), f"model.base={base}", f"data.path={data}", f"output.dir={out}", "train.max_steps=2",
        "checkpoint.every=100", "validation.prompts=[]", "output.report=false", "output.report_to=[]", *over,
    ])  # fmt: skip


def test_single_file_base_trains_the_same_weights_as_its_folder(tiny_sd, tiny_dataset, tmp_path):
    """An A1111/LDM-layout .safetensors holds the same weights as the diffusers folder it was
    written from, so training on it (model.config = the folder, for the configs) must give the
    identical adapter."""
    import ldm_checkpoint  # tests/fixtures

    single = ldm_checkpoint.write_ldm_checkpoint(tiny_sd, tmp_path / "tiny.safetensors")
    assert _train_in_process(tiny_sd, tiny_dataset, tmp_path / "folder") == 0
    assert _train_in_process(single, tiny_dataset, tmp_path / "file", f"model.config={tiny_sd}") == 0
    a, b = (json.loads((tmp_path / r / "run.json").read_text()) for r in ("folder", "file"))
    assert a["weights_sha256"] == b["weights_sha256"]
    assert b["config"]["model"]["base"] == str(single) and a["base_fingerprint"] != b["base_fingerprint"]


def test_single_file_base_refusals(tiny_sd, tiny_dataset, tmp_path, capsys):
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"x")
    pickled = tmp_path / "m.ckpt"
    pickled.write_bytes(b"x")
    cases = [
        ((single,), 2, "pass model.config DIR"),
        ((single, f"model.config={tmp_path / 'nope'}"), 2, "model.config folder not found"),
        ((single, f"model.config={tmp_path}"), 2, "model.config is not a diffusers folder"),
        ((pickled, f"model.config={tiny_sd}"), 2, "model.allow_pickle=true"),
    ]
    for (base, *over), code, needle in cases:
        assert _train_in_process(base, tiny_dataset, tmp_path / "out", *over) == code
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loracraft: error")]
        assert len(err) == 1 and needle in err[0], (needle, err)
