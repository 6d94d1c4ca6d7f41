"""load_base(): folders, single files with a local config, variants, dtypes, and one-line ModelErrors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loracraft.infer.errors import ModelError, UsageError
from loracraft.infer.formats import LORA_WEIGHT_NAME
from loracraft.infer.generation import generate
from loracraft.infer.models import base_info, load_base, parse_dtype


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def _ldm_helper():
    import ldm_checkpoint  # tests/fixtures

    return ldm_checkpoint


def test_folder_loads_and_records_how(tiny_sd):
    pipe = load_base(tiny_sd)
    info = base_info(pipe)
    assert info.base == str(Path(tiny_sd).resolve()) and info.dtype == "float32" and info.device == "cpu"
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_single_file_checkpoint_with_local_config_matches_the_folder(tiny_sd, tmp_path):
    single = _ldm_helper().write_ldm_checkpoint(tiny_sd, tmp_path / "tiny.safetensors")
    with pytest.raises(ModelError) as e:
        load_base(single)
    assert "--base-config" in one_line(e)
    a = load_base(tiny_sd)
    b = load_base(single, config=tiny_sd)
    for component in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), component
    ia = generate(a, "a red circle", seed=0, steps=2)[0].image
    ib = generate(b, "a red circle", seed=0, steps=2)[0].image
    assert np.array_equal(np.asarray(ia), np.asarray(ib))
    assert base_info(b).config == str(Path(tiny_sd).resolve())


def test_pickle_checkpoint_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelError) as e:
        load_base(ckpt)
    assert "--allow-pickle" in one_line(e)


def test_variant_and_dtype(tiny_sd, tmp_path):
    pipe = load_base(tiny_sd, torch_dtype="fp16")
    assert pipe.unet.dtype == torch.float16 and base_info(pipe).dtype == "float16"
    variant_dir = tmp_path / "variant"
    pipe.save_pretrained(variant_dir, variant="fp16")
    loaded = load_base(variant_dir, variant="fp16", torch_dtype="float16")
    assert base_info(loaded).variant == "fp16"
    with pytest.raises(ModelError) as e:
        load_base(tiny_sd, variant="int3")
    assert "variant" in one_line(e)
    with pytest.raises(UsageError):
        parse_dtype("float8")


def test_path_that_is_not_a_model(tmp_path, lora_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as e:
        load_base(tmp_path / "empty")
    msg = one_line(e)
    assert "not a diffusers model folder" in msg and "model_index.json" in msg
    with pytest.raises(ModelError) as e:
        load_base(lora_dir)
    assert "--lora" in one_line(e)  # an adapter folder passed as the base
    with pytest.raises(ModelError) as e:
        load_base(lora_dir / LORA_WEIGHT_NAME)
    assert "single-file" in one_line(e)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError) as e:
        load_base(tmp_path / "notes.txt")
    assert "not a model checkpoint" in one_line(e)


def test_missing_path_and_unreachable_hub_id(tmp_path):
    with pytest.raises(ModelError) as e:
        load_base(tmp_path / "nowhere")
    assert "base model not found" in one_line(e)
    with pytest.raises(ModelError) as e:
        load_base("loracraft-test/does-not-exist", revision="main")  # HF_HUB_OFFLINE=1 in tests
    msg = one_line(e)
    assert "cannot load hub model loracraft-test/does-not-exist@main" in msg


def test_damaged_model_folder(tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError) as e:
        load_base(broken)
    assert "cannot load diffusers model" in one_line(e)


def test_attention_slicing_gives_the_same_image(tiny_sd):
    plain = generate(load_base(tiny_sd), "a red circle", seed=0, steps=2)[0].image
    sliced = generate(load_base(tiny_sd, attention_slicing=True), "a red circle", seed=0, steps=2)[0].image
    assert np.abs(np.asarray(plain).astype(int) - np.asarray(sliced)).max() <= 2
