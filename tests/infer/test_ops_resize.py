"""loracraft resize: full rank is lossless, dynamic rules as kohya defines them, optimality, refusals.

Singular values are fixed by construction (orthonormal factors times chosen values), so the
rank each rule picks is computed by hand in the test, not by the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch

from loracraft.infer.formats import LoraAdapter, LoraModule, convert_lora_file, read_lora, write_lora
from loracraft.infer.ops.resize import resize_file
from loracraft.train.cli import main


def delta(mod: LoraModule) -> torch.Tensor:
    up = mod.up.double().reshape(mod.up.shape[0], -1)
    down = mod.down.double().reshape(mod.down.shape[0], -1)
    return mod.alpha / mod.rank * up @ down


def test_resize_to_full_rank_reproduces_every_delta(lora_dir, tmp_path):
    src = read_lora(lora_dir)
    path, reports = resize_file(lora_dir, tmp_path / "r.safetensors", rank=8)
    out = read_lora(path)
    for component, name, mod in src.items():
        new = out.modules[component][name]
        assert new.rank == 8 and new.scale == mod.scale  # alpha rescaled: alpha / rank unchanged
        torch.testing.assert_close(delta(new), delta(mod), rtol=1e-5, atol=1e-6)
    assert all(r.kept_fro == pytest.approx(1.0) for r in reports)


def test_resized_file_loads_in_plain_diffusers_and_generates(tiny_sd, lora_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from loracraft.infer.formats import LORA_WEIGHT_NAME

    def unet_out(weights_dir):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), torch_dtype=torch.float32)
        pipe.load_lora_weights(str(weights_dir), weight_name=LORA_WEIGHT_NAME, adapter_name="x")
        g = torch.Generator().manual_seed(0)
        sample, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 32, generator=g)
        with torch.no_grad():
            return pipe.unet(sample, 10, encoder_hidden_states=hidden).sample

    out = tmp_path / "full"
    resize_file(lora_dir, out, rank=8)  # a folder: the diffusers file name inside
    torch.testing.assert_close(unet_out(out), unet_out(lora_dir), rtol=1e-5, atol=1e-5)
    small, _ = resize_file(lora_dir, tmp_path / "small.safetensors", dynamic="sv_fro", param=0.9)
    images = tmp_path / "images"
    argv = ["generate", "--base", str(tiny_sd), "--lora", f"{small}:0.8", "--prompt", "a red circle"]
    assert main([*argv, "--steps", "2", "--seed", "1", "--out", str(images)]) == 0
    assert len(list(images.glob("*.png"))) == 1


def test_sv_fro_keeps_at_least_the_fraction_with_the_fewest_singular_values(lora_dir, tmp_path):
    src = read_lora(lora_dir)
    path, reports = resize_file(lora_dir, tmp_path / "r.safetensors", dynamic="sv_fro", param=0.9)
    out = read_lora(path)
    by_name = {r.name: r for r in reports}
    for component, name, mod in src.items():
        d = delta(mod)
        new = out.modules[component][name]
        k = new.rank
        s = torch.linalg.svdvals(d)
        kept = float(delta(new).norm() / d.norm())
        assert kept >= 0.9, name
        assert float(s[: k - 1].norm() / s.norm()) < 0.9, name  # one fewer would not reach 0.9
        u, s_, vh = torch.linalg.svd(d, full_matrices=False)
        torch.testing.assert_close(delta(new), u[:, :k] @ torch.diag(s_[:k]) @ vh[:k], rtol=1e-5, atol=1e-6)
        assert by_name[f"{component}.{name}"].kept_fro == pytest.approx(kept, rel=1e-6)
    assert len({m.rank for _, _, m in out.items()}) >= 1


@pytest.fixture()
def known_spectrum(tmp_path):
    """One Linear layer (out 12, in 10) whose delta has singular values 8, 4, 2, 1 (scale 0.5)."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=torch.float64))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    up, down = q1 * (2 * s), q2.T  # scale alpha/rank = 2/4 = 0.5 halves 2*s back to s
    adapter = LoraAdapter(
        {"unet": {"mid_block.attentions.0.proj_in": LoraModule(down.float(), up.float(), 2)}}
    )
    return write_lora(adapter, tmp_path / "known.safetensors")


@pytest.mark.parametrize(
    "method,param,rank",
    [
        ("sv_ratio", 3, 2),  # keep S > 8/3: 8, 4
        ("sv_ratio", 10, 4),  # 8/10 = 0.8 < 1: all four
        ("sv_cumulative", 0.85, 3),  # cumulative 8/15, 12/15, 14/15, 1: first >= 0.85 is 14/15
        ("sv_fro", 0.9, 2),  # sqrt(80/85) = 0.970 >= 0.9, sqrt(64/85) = 0.868 < 0.9
        ("sv_fro", 0.98, 3),  # sqrt(84/85) = 0.994, sqrt(80/85) = 0.970
    ],
)
def test_dynamic_rules_pick_the_hand_computed_rank(known_spectrum, tmp_path, method, param, rank):
    path, reports = resize_file(known_spectrum, tmp_path / "r.safetensors", dynamic=method, param=param)
    (mod,) = [m for _, _, m in read_lora(path).items()]
    assert mod.rank == rank
    assert mod.scale == pytest.approx(0.5)  # the layer's scale is kept
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    torch.testing.assert_close(torch.linalg.svdvals(delta(mod)).float()[:rank], s[:rank])
    assert reports[0].kept_fro == pytest.approx(float(s[:rank].norm() / s.norm()))


def test_dynamic_rank_is_capped_by_rank(known_spectrum, tmp_path):
    path, _ = resize_file(known_spectrum, tmp_path / "r.safetensors", dynamic="sv_fro", param=0.98, rank=2)
    assert {m.rank for _, _, m in read_lora(path).items()} == {2}


def test_kohya_input_stays_kohya_and_matches_the_diffusers_result(lora_dir, tmp_path, capsys):
    kohya = convert_lora_file(lora_dir, tmp_path / "k.safetensors", "kohya")
    assert main(["resize", str(kohya), "--rank", "3", "--out", str(tmp_path / "rk.safetensors")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("resize: ") and "rank 3" in lines[-1] and "wrote" in lines[-1]
    assert len(lines) == read_lora(lora_dir).num_modules + 1  # one line per layer, then the summary
    resized_k = read_lora(tmp_path / "rk.safetensors")
    assert resized_k.source_format == "kohya"
    resized_d, _ = resize_file(lora_dir, tmp_path / "rd.safetensors", rank=3)
    for component, name, mod in read_lora(resized_d).items():
        torch.testing.assert_close(
            delta(resized_k.modules[component][name]), delta(mod), rtol=1e-5, atol=1e-6
        )
    assert resized_k.metadata["ss_training_comment"].startswith("resized from rank 8 to rank 3")
    record = json.loads(read_lora(resized_d).metadata["loracraft.resized_from"])
    assert record["rank"] == 3 and record["file"] == "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--rank", "9"], "above the adapter's largest layer rank 8"),
        (["--rank", "0"], "positive"),
        (["--dynamic", "sv_magic", "--param", "0.9"], "unknown --dynamic method"),
        (["--dynamic", "sv_fro"], "needs a target"),
        (["--dynamic", "sv_fro", "--param", "1.5"], "(0, 1]"),
        (["--dynamic", "sv_ratio", "--param", "0.5"], ">= 1"),
        (["--param", "0.9"], "--param needs a method"),
        ([], "no new rank"),
    ],
)
def test_refusals_are_one_line_usage_errors(lora_dir, tmp_path, capsys, argv, expected):
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(lora_dir), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()
