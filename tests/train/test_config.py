import pytest

from loracraft.infer.errors import ConfigError
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
    assert config_diff(a, b) == ["train.lr: 0.0001 -> 0.5"]


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
