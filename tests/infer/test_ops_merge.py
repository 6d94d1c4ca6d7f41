"""loracraft merge: exact concatenation, SVD truncation, baking into the base, refusals.

References are independent of the merge code: the weighted sum of deltas written out from the
LoRA formula, a dense ``torch.linalg.svd`` for the truncation, and diffusers' own
``load_lora_weights`` + ``set_adapters`` (+ ``fuse_lora``) for what a pipeline does with the files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    LORA_WEIGHT_NAME,
    UNET_LAYOUT_KEY,
    LoraModule,
    base_unet_layout,
    read_lora,
    write_lora,
)
from loracraft.infer.ops.merge import merge_files
from loracraft.train.cli import main

W_A, W_B = 0.7, -0.3


def delta(mod: LoraModule) -> torch.Tensor:
    """``alpha / rank * up @ down`` flattened to 2-D, in float64 (the LoRA formula)."""
    up = mod.up.double().reshape(mod.up.shape[0], -1)
    down = mod.down.double().reshape(mod.down.shape[0], -1)
    return mod.alpha / mod.rank * up @ down


def weighted_sum(pairs) -> dict[tuple[str, str], torch.Tensor]:
    out: dict[tuple[str, str], torch.Tensor] = {}
    for adapter, weight in pairs:
        for component, name, mod in adapter.items():
            d = weight * delta(mod)
            out[(component, name)] = out[(component, name)] + d if (component, name) in out else d
    return out


@pytest.fixture(scope="module")
def unet_only_b(lora_dir_b, tmp_path_factory):
    """lora_dir_b without its text encoder part (plain diffusers cannot load CLIP LoRAs on transformers 5)."""
    adapter = read_lora(lora_dir_b)
    adapter.modules = {"unet": adapter.modules["unet"]}
    out = tmp_path_factory.mktemp("b-unet") / LORA_WEIGHT_NAME
    write_lora(adapter, out)
    return out


def test_concat_merge_equals_the_weighted_sum_of_deltas(lora_dir, lora_dir_b, tmp_path):
    a, b = read_lora(lora_dir), read_lora(lora_dir_b)
    path, reports = merge_files([f"{lora_dir}:{W_A}", f"{lora_dir_b}:{W_B}"], tmp_path / "m.safetensors")
    merged = read_lora(path)
    want = weighted_sum([(a, W_A), (b, W_B)])
    assert {(c, n) for c, n, _ in merged.items()} == set(want)
    for component, name, mod in merged.items():
        torch.testing.assert_close(delta(mod), want[(component, name)], rtol=1e-5, atol=1e-6)
        ranks = [x.modules.get(component, {}).get(name) for x in (a, b)]
        assert mod.rank == sum(m.rank for m in ranks if m is not None)
        assert mod.alpha == mod.rank  # scale 1
    assert all(r.kept_fro == 1.0 for r in reports)
    assert {m.rank for c, _, m in merged.items() if c == "text_encoder"} == {4}  # only B has a text encoder
    sources = json.loads(merged.metadata["loracraft.merged_from"])
    assert [s["weight"] for s in sources] == [W_A, W_B]


def test_rank_r_merge_is_the_best_rank_r_approximation(lora_dir, lora_dir_b, tmp_path):
    a, b = read_lora(lora_dir), read_lora(lora_dir_b)
    path, reports = merge_files(
        [f"{lora_dir}:{W_A}", f"{lora_dir_b}:{W_B}"], tmp_path / "m.safetensors", rank=5
    )
    merged = read_lora(path)
    want = weighted_sum([(a, W_A), (b, W_B)])
    kept = {r.name: r.kept_fro for r in reports}
    for component, name, mod in merged.items():
        u, s, vh = torch.linalg.svd(want[(component, name)], full_matrices=False)
        k = min(5, int((s > 1e-9 * s[0]).sum()))
        assert mod.rank == k
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        torch.testing.assert_close(delta(mod), best, rtol=1e-5, atol=1e-6)
        expected_kept = float(best.norm() / want[(component, name)].norm())
        assert kept[f"{component}.{name}"] == pytest.approx(expected_kept, rel=1e-9)


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(1, 4, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=hidden).sample


def _diffusers_pipe(base, files_weights):
    """Plain diffusers: load each file with load_lora_weights and weight it with set_adapters."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    names = []
    for i, (file, _) in enumerate(files_weights):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, [w for _, w in files_weights])
    return pipe


def test_merged_file_in_plain_diffusers_acts_as_the_weighted_inputs(tiny_sd, lora_dir, unet_only_b, tmp_path):
    a = lora_dir / LORA_WEIGHT_NAME
    path, _ = merge_files([(a, W_A), (unet_only_b, W_B)], tmp_path / "merged")
    assert path == tmp_path / "merged" / LORA_WEIGHT_NAME
    inputs = _unet_out(_diffusers_pipe(tiny_sd, [(a, W_A), (unet_only_b, W_B)]))
    merged = _unet_out(_diffusers_pipe(tiny_sd, [(path, 1.0)]))
    torch.testing.assert_close(merged, inputs, rtol=1e-5, atol=1e-5)
    images = tmp_path / "images"
    argv = [
        "generate",
        "--base",
        str(tiny_sd),
        "--lora",
        str(path),
        "--prompt",
        "a red circle",
        "--steps",
        "2",
    ]
    assert main([*argv, "--seed", "1", "--out", str(images)]) == 0
    assert len(list(images.glob("*.png"))) == 1


def test_merge_into_base_equals_fusing_in_diffusers(tiny_sd, lora_dir, unet_only_b, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    a = lora_dir / LORA_WEIGHT_NAME
    out = tmp_path / "baked"
    assert (
        main(["merge", f"{a}:{W_A}", f"{unet_only_b}:{W_B}", "--into-base", str(tiny_sd), "--out", str(out)])
        == 0
    )
    assert "fused into" in capsys.readouterr().out
    baked = StableDiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    reference = _diffusers_pipe(tiny_sd, [(a, W_A), (unet_only_b, W_B)])
    reference.fuse_lora(components=["unet"], adapter_names=["a0", "a1"])
    torch.testing.assert_close(_unet_out(baked), _unet_out(reference), rtol=1e-5, atol=1e-5)
    record = json.loads((out / "loracraft_merge.json").read_text())
    assert [x["weight"] for x in record["adapters"]] == [W_A, W_B]
    assert not any(p.name.startswith(".baked") for p in tmp_path.iterdir())  # no temp folder left behind


def test_sdxl_merge_to_kohya_keeps_family_and_is_exact(tiny_sdxl, tmp_path):
    from loracraft.infer.adapters import build_random_lora

    a = build_random_lora(tiny_sdxl, tmp_path / "a" / LORA_WEIGHT_NAME, rank=4, alpha=2, seed=5)
    b = build_random_lora(tiny_sdxl, tmp_path / "b" / LORA_WEIGHT_NAME, rank=2, alpha=2, seed=6)
    layout = json.dumps(base_unet_layout(tiny_sdxl), sort_keys=True)
    for file in (a, b):  # what the trainer writes: the family and the UNet block layout
        adapter = read_lora(file)
        adapter.metadata.update({FAMILY_METADATA_KEY: "sdxl", UNET_LAYOUT_KEY: layout})
        write_lora(adapter, file)
    path, _ = merge_files([(a, 0.5), (b, 2.0)], tmp_path / "m.safetensors", to="kohya")
    with safe_open(str(path), framework="pt") as fh:
        keys, header = list(fh.keys()), fh.metadata()
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # kohya's SDXL (SGM) names
    assert header["ss_base_model_version"].startswith("sdxl")
    merged = read_lora(path)
    want = weighted_sum([(read_lora(a), 0.5), (read_lora(b), 2.0)])
    for component, name, mod in merged.items():
        torch.testing.assert_close(delta(mod), want[(component, name)], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Refusals: one line, exit code 2
# --------------------------------------------------------------------------------------------
def _refused(capsys, *argv) -> str:
    code = main(["merge", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def _variant(src, dst, edit_adapter=None, **metadata):
    adapter = read_lora(src)
    adapter.metadata.update(metadata)
    if edit_adapter:
        edit_adapter(adapter)
    return write_lora(adapter, dst)


def test_refuses_different_families_bases_and_shapes(lora_dir, tmp_path, capsys):
    a = lora_dir / LORA_WEIGHT_NAME
    sd = _variant(a, tmp_path / "sd.safetensors", **{FAMILY_METADATA_KEY: "sd"})
    xl = _variant(a, tmp_path / "xl.safetensors", **{FAMILY_METADATA_KEY: "sdxl"})
    assert "different model families" in _refused(capsys, sd, xl, "--out", tmp_path / "o.safetensors")
    other = _variant(a, tmp_path / "other.safetensors", **{"loracraft.base_model": "/elsewhere/model"})
    assert "--allow-different-bases" in _refused(capsys, a, other, "--out", tmp_path / "o.safetensors")
    assert (
        main(
            [
                "merge",
                str(a),
                str(other),
                "--out",
                str(tmp_path / "ok.safetensors"),
                "--allow-different-bases",
                "--quiet",
            ]
        )
        == 0
    )

    def widen(adapter):
        name = next(iter(adapter.modules["unet"]))
        mod = adapter.modules["unet"][name]
        adapter.modules["unet"][name] = LoraModule(
            torch.zeros(mod.rank, mod.down.shape[1] + 1), mod.up, mod.alpha
        )

    wide = _variant(a, tmp_path / "wide.safetensors", widen)
    assert "different shapes" in _refused(capsys, a, wide, "--out", tmp_path / "o.safetensors")


def test_refuses_bad_ranks_dora_lycoris_and_single_file(lora_dir, tiny_sd, tmp_path, capsys):
    from safetensors.torch import save_file

    a = lora_dir / LORA_WEIGHT_NAME
    out = tmp_path / "o.safetensors"
    assert "positive" in _refused(capsys, a, a, "--rank", 0, "--out", out)
    assert "above the largest merged layer rank 16" in _refused(capsys, a, a, "--rank", 17, "--out", out)

    def add_magnitude(adapter):
        for mods in adapter.modules.values():
            for m in mods.values():
                m.magnitude = torch.ones(m.up.shape[0])

    dora = _variant(a, tmp_path / "dora.safetensors", add_magnitude)
    assert "DoRA" in _refused(capsys, a, dora, "--out", out)
    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_x_to_q.hada_w1_a": torch.zeros(2, 2), "lora_unet_x_to_q.hada_w1_b": torch.zeros(2, 2)},
        str(loha),
    )
    assert "LoHa" in _refused(capsys, a, loha, "--out", out)
    assert "single-file" in _refused(
        capsys, a, "--into-base", tiny_sd, "--single-file", "--out", tmp_path / "sf"
    )
    assert "overwrite" in _refused(capsys, a, "--out", a)
    assert not out.exists()
