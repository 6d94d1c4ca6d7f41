"""Garbage or hostile adapter files: one line naming the file and the key, exit 2, no output written.

Each case is a valid two-module adapter with one thing broken, checked both through ``read_lora`` and
through ``loracraft convert`` run in-process (``loracraft.train.cli.main``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats import read_lora
from loracraft.train.cli import main

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def diffusers_file(config: dict | None = None) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for mod in (Q, K):
        tensors[f"{mod}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        tensors[f"{mod}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    base = {"unet.r": 2, "unet.lora_alpha": 4, "unet.target_modules": ["to_q", "to_k"]}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps({**base, **(config or {})})}


def kohya_file() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{KQ}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{KQ}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{KQ}.alpha": torch.tensor(4.0),
    }, {"ss_network_module": "networks.lora"}


def with_header(raw: str):
    def build():
        tensors, header = diffusers_file()
        return tensors, {**header, "lora_adapter_metadata": raw}

    return build


def with_config(**fields):
    return lambda: diffusers_file({f"unet.{k}": v for k, v in fields.items()})


def with_tensor(key: str, value: torch.Tensor, kohya: bool = False):
    def build():
        tensors, header = kohya_file() if kohya else diffusers_file()
        return {**tensors, key: value}, header

    return build


nan = torch.randn(2, 8)
nan[0, 3] = float("nan")
inf = torch.randn(8, 2)
inf[5, 1] = float("inf")

#: (case id, file builder, words the one-line error must contain besides the file name)
CASES = [
    ("metadata-list", with_header("[1, 2]"), ["lora_adapter_metadata", "list"]),
    ("metadata-string", with_header('"unet.r=2"'), ["lora_adapter_metadata", "str"]),
    ("metadata-not-json", with_header("{unet.r: 2"), ["lora_adapter_metadata", "not JSON"]),
    ("alpha-pattern-list", with_config(alpha_pattern=["to_q"]), ["alpha_pattern", "list"]),
    ("rank-pattern-string", with_config(rank_pattern="to_q=4"), ["rank_pattern", "str"]),
    ("rank-pattern-value", with_config(rank_pattern={"to_q": "four"}), ["rank_pattern", "'four'"]),
    ("lora-alpha-string", with_config(lora_alpha="abc"), ["lora_alpha", "'abc'"]),
    ("r-zero", with_config(r=0), ["unet.r", "0"]),
    ("lora-alpha-zero", with_config(lora_alpha=0), ["lora_alpha", "0"]),
    ("0-d-down", with_tensor(f"{Q}.lora_A.weight", torch.tensor(1.0)), [f"{Q}.lora_A.weight", "0-d"]),
    ("1-d-down", with_tensor(f"{Q}.lora_A.weight", torch.ones(8)), [f"{Q}.lora_A.weight", "1-d"]),
    ("1-d-up", with_tensor(f"{K}.lora_B.weight", torch.ones(8)), [f"{K}.lora_B.weight", "1-d"]),
    (
        "int64",
        with_tensor(f"{Q}.lora_A.weight", torch.ones(2, 8, dtype=torch.int64)),
        ["int64", f"{Q}.lora_A"],
    ),
    ("bool", with_tensor(f"{K}.lora_B.weight", torch.ones(8, 2, dtype=torch.bool)), ["bool", f"{K}.lora_B"]),
    ("nan", with_tensor(f"{Q}.lora_A.weight", nan), ["NaN", f"{Q}.lora_A.weight"]),
    ("inf", with_tensor(f"{K}.lora_B.weight", inf), ["Inf", f"{K}.lora_B.weight"]),
    ("rank-0-down", with_tensor(f"{Q}.lora_A.weight", torch.ones(0, 8)), ["empty", f"{Q}.lora_A.weight"]),
    ("rank-mismatch", with_tensor(f"{Q}.lora_B.weight", torch.ones(8, 3)), ["do not multiply", Q]),
    ("kohya-1-d-down", with_tensor(f"{KQ}.lora_down.weight", torch.ones(8), kohya=True), ["1-d", KQ]),
    ("kohya-alpha-zero", with_tensor(f"{KQ}.alpha", torch.tensor(0.0), kohya=True), ["alpha", "is 0", KQ]),
    ("kohya-alpha-nan", with_tensor(f"{KQ}.alpha", torch.tensor(float("nan")), kohya=True), ["NaN", KQ]),
    ("kohya-alpha-vector", with_tensor(f"{KQ}.alpha", torch.ones(3), kohya=True), ["3 values", KQ]),
    (
        "kohya-int-up",
        with_tensor(f"{KQ}.lora_up.weight", torch.ones(8, 2, dtype=torch.int64), kohya=True),
        ["int64"],
    ),
]


@pytest.mark.parametrize("build, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_garbage_adapter_is_one_line_on_read_and_convert(tmp_path, capsys, build, words):
    tensors, header = build()
    src = tmp_path / "bad.safetensors"
    save_file(tensors, str(src), metadata=header)

    with pytest.raises(AdapterError) as e:
        read_lora(src)
    message = str(e.value)
    assert "\n" not in message and str(src) in message
    for word in words:
        assert word in message, (word, message)

    for to in ("kohya", "diffusers"):
        out = tmp_path / f"out-{to}.safetensors"
        capsys.readouterr()
        assert main(["convert", str(src), str(out), "--to", to]) == AdapterError.exit_code
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.count("\n") == 1 and message in captured.err, captured.err
        assert not out.exists() and not list(tmp_path.glob(".out-*"))  # no output, no temp file left


def test_the_valid_files_the_cases_start_from_convert(tmp_path):
    """The cases above fail because of what each breaks, not because the starting files were bad."""
    for name, (tensors, header) in {"d": diffusers_file(), "k": kohya_file()}.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=header)
        assert (
            main(
                [
                    "convert",
                    str(tmp_path / f"{name}.safetensors"),
                    str(tmp_path / f"{name}-out"),
                    "--to",
                    "kohya",
                ]
            )
            == 0
        )
        assert read_lora(tmp_path / f"{name}-out").num_modules == (2 if name == "d" else 1)
