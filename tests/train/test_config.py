import time
from pathlib import Path

import pytest

from loracraft.infer.errors import ConfigError
from loracraft.train.cli import main
from loracraft.train.config import build_config, config_diff, load_config, parse_override

BASE = {"model": {"base": "m"}, "data": {"path": "d"}}


def test_minimal_config_fills_every_default():
    cfg = build_config(BASE)
    assert cfg.lora.rank == 4 and cfg.train.max_steps == 1000 and cfg.output.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=1e-4", ("train", "lr"), 1e-4),  # YAML 1.1 reads 1e-4 as a string
        ("train.mixed_precision=no", ("train", "mixed_precision"), "no"),  # YAML reads `no` as False
        ("train.max_steps=20", ("train", "max_steps"), 20),
        ("lora.rank=8", ("lora", "rank"), 8),
        ("data.random_flip=true", ("data", "random_flip"), True),
        ("train.snr_gamma=null", ("train", "snr_gamma"), None),
        ("train.snr_gamma=5", ("train", "snr_gamma"), 5.0),
        ("output.report_to=[wandb]", ("output", "report_to"), ["wandb"]),
        ("output.report_to=wandb", ("output", "report_to"), ["wandb"]),
        ("lora.targets=[to_q, to_v]", ("lora", "targets"), ["to_q", "to_v"]),
        ("lora.targets=transformer", ("lora", "targets"), "transformer"),
        ("validation.prompts=[a red circle]", ("validation", "prompts"), ["a red circle"]),
    ],
)
def test_override_is_converted_to_the_field_type(override, key, expected):
    cfg = build_config(BASE, [override])
    value = getattr(getattr(cfg, key[0]), key[1])
    assert value == expected and type(value) is type(expected)


def test_yaml_no_in_a_file_means_the_string(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {base: m}\ndata: {path: d}\ntrain: {mixed_precision: no}\n")
    cfg = load_config(p)
    assert cfg.train.mixed_precision == "no"
    assert cfg.output.dir.endswith("runs/c")  # default output dir from the file stem


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "lora": {"rnak": 8}})
    assert e.value.problems == [
        "unknown config key 'lora.rnak', config, remove it (did you mean 'lora.rank'?)"
    ]


def test_unknown_override_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'train.max_step'.*did you mean 'train.max_steps'"):
        parse_override("train.max_step=3")


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config({"model": {}, "data": {"path": "d"}, "lora": {"rank": 0}}, ["train.lr=abc"])
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3
    assert "model.base" in text and "lora.rank" in text and "train.lr" in text


@pytest.mark.parametrize(
    "bad",
    [
        {"lora": {"rank": -1}},
        {"train": {"lr": 0}},
        {"train": {"grad_accum": 0}},
        {"train": {"mixed_precision": "fp8"}},
        {"data": {"path": "d", "caption_dropout": 1.5}},
        {"train": {"warmup_steps": 50, "max_steps": 10}},
    ],
)
def test_bad_values_rejected(bad):
    data = {**BASE, **bad}
    with pytest.raises(ConfigError):
        build_config(data)


def test_override_without_equals_is_a_usage_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        build_config(BASE, ["train.max_steps"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  base: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d"):
        load_config(p)


def test_config_diff_lists_changed_keys():
    a = build_config(BASE).training_relevant()
    b = build_config(BASE, ["train.lr=0.5", "output.dir=elsewhere"]).training_relevant()
    assert config_diff(a, b) == ["train.lr: 0.001 -> 0.5"]


def test_every_shipped_recipe_validates():
    from importlib.resources import files

    recipes = sorted(p for p in files("loracraft.configs").iterdir() if p.name.endswith(".yaml"))
    assert recipes, "no recipes shipped"
    for recipe in recipes:
        import yaml

        data = yaml.safe_load(recipe.read_text())
        # Recipes may leave the two required paths to the command line.
        data.setdefault("model", {}).setdefault("base", "x")
        data["model"]["base"] = data["model"]["base"] or "x"
        data.setdefault("data", {})["path"] = data["data"].get("path") or "x"
        build_config(data, source=recipe.name)


# ----------------------------------------------------------------------------- limits, through the CLI
QUICKSTART = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
SET = ["model.base=/nonexistent-base", "data.path=/nonexistent-data"]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.seed=-1"], ["'train.seed'", "command line: train.seed=-1", "greater than or equal to 0"]),
        ([f"train.seed={2**70}"], ["'train.seed'", "less than 4294967296"]),
        ([f"validation.seed={2**63}"], ["'validation.seed'", f"less than {2**62}"]),
        (
            ["dreambooth={instance_prompt: a sks dog, class_generation: {seed: -5}}"],
            ["'dreambooth.class_generation.seed'", "greater than or equal to 0"],
        ),
        (["lora.targets=[]"], ["'lora.targets'", "is empty", "use attn, transformer"]),
        (["data.resolution=16384"], ["'data.resolution'", "less than or equal to 8192"]),
        (["lora.rank=1000000"], ["'lora.rank'", "less than or equal to 4096"]),
        (["lora.text_encoder={rank: 5000}"], ["'lora.text_encoder.rank'", "less than or equal to 4096"]),
        (["train.lr=abc"], ["command line: train.lr=abc", "valid number"]),
        (["train.max_steps=" + "9" * 5000 + "x"], ["'train.max_steps'", "..."]),
    ],
)
def test_limits_are_one_line_errors_with_exit_2(overrides, needles, capsys):
    assert main(["train", QUICKSTART, *SET, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loracraft: error: "), err
    assert len(err[0]) < 700, len(err[0])  # quoted values are cut
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_missing_required_keys_say_how_to_pass_them(capsys):
    assert main(["train", QUICKSTART]) == 2  # quickstart leaves model.base and data.path null
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "required config key 'model.base' is not set" in err[0] and "model.base=..." in err[0]
    assert "required config key 'data.path' is not set" in err[1] and "quickstart.yaml" in err[1]


def test_a_bad_yaml_value_names_the_file_not_the_command_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model: {base: m}\ndata: {path: d}\ntrain: {lr: abc}\n")
    assert main(["train", str(p), "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"{p}: input should be a valid number" in err and "command line" not in err


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "train": {"lr": "9" * 10_000 + "x"}})
    assert len(e.value.problems[0]) < 400 and "..." in e.value.problems[0]


def _alias_bomb(depth: int) -> str:
    lines = ["  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return (
        "x:\n"
        + "\n".join(lines)
        + f"\nmodel: {{base: m}}\ndata: {{path: d}}\nvalidation: {{prompts: *a{depth}}}\n"
    )


@pytest.mark.parametrize("depth", [4, 9])
def test_yaml_alias_bomb_is_refused_at_once(depth, tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb(depth))
    t0 = time.perf_counter()
    assert main(["train", str(p)]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "anchors/aliases expand to more than 100000 values" in err[0], err


def test_modest_yaml_aliases_still_work(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {base: &shared /models/x}\ndata: {path: *shared}\n")
    assert load_config(p).data.path == "/models/x"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        # tiny SD: attention layers on 32 channels, cross-attention from 32-wide text states
        (["lora.rank=33"], "lora.rank=33 exceeds 32, the smaller side of the targeted layer"),
        (["lora.text_encoder={rank: 40}"], "lora.text_encoder.rank=40 exceeds 32"),
    ],
)
def test_rank_above_the_targeted_layers_is_refused_before_injection(
    over, needle, tiny_sd, tiny_dataset, tmp_path, capsys
):
    argv = [
        "train",
        QUICKSTART,
        f"model.base={tiny_sd}",
        f"data.path={tiny_dataset}",
        f"output.dir={tmp_path / 'r'}",
    ]
    assert main([*argv, "output.report_to=[]", *over]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (no progress bars)
    assert len(err) == 1 and needle in err[0], err


def test_rank_limit_is_the_smallest_targeted_side(tiny_sd):
    from diffusers import UNet2DConditionModel

    from loracraft.train.components import rank_limit
    from loracraft.train.config import ATTN_TARGETS

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    cfg = unet.config
    attn_channels = [
        c for c, kind in zip(cfg.block_out_channels, cfg.down_block_types, strict=True) if "CrossAttn" in kind
    ]
    assert rank_limit(unet, ATTN_TARGETS)[0] == min(*attn_channels, cfg.cross_attention_dim)
    assert rank_limit(unet, ["no_such_layer"]) is None
