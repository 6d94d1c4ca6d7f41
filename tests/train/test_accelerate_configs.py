"""Every shipped accelerate config parses and passes `accelerate launch`'s own validation."""

from importlib.resources import files

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

CONFIGS = sorted(p.name for p in (files("loracraft.configs") / "accelerate").iterdir() if p.name.endswith(".yaml"))
EXPECTED = {
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu_ddp.yaml": ("MULTI_GPU", 4),
    "fsdp.yaml": ("FSDP", 4),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 4),
    "multi_node.yaml": ("MULTI_GPU", 16),
    "cpu_two_processes.yaml": ("MULTI_CPU", 2),
}


def test_all_expected_configs_ship():
    assert set(CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_validates(name):
    path = str(files("loracraft.configs") / "accelerate" / name)
    cfg = load_config_from_file(path)
    kind, procs = EXPECTED[name]
    assert cfg.distributed_type.value == kind and cfg.num_processes == procs
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "loracraft.train", "recipe.yaml"])
    _validate_launch_command(args)
    assert args.num_processes == procs
    assert bool(args.use_fsdp) == (kind == "FSDP") and bool(args.use_deepspeed) == (kind == "DEEPSPEED")
    first = (files("loracraft.configs") / "accelerate" / name).read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment saying how to launch it"
    if name == "multi_node.yaml":
        assert cfg.num_machines == 2 and "--machine_rank" in (files("loracraft.configs") / "accelerate" / name).read_text()
