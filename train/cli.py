"""The ``loracraft`` command: one entry point, subcommands, one-line errors, the exit codes of the README."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings

from loracraft.infer.errors import LoracraftError, UsageError


def _short_spin_waits() -> None:
    """OpenMP threads that spin only briefly before they sleep while waiting for each other.

    PyTorch's CPU threads (libgomp) spin ~300 000 rounds, a few milliseconds, at every wait; on
    a machine whose cores are busy with other work the spinning threads steal the time slices the
    working ones need, and a 2-thread step got 5-30x slower. Not spinning at all
    (``OMP_WAIT_POLICY=PASSIVE``) cost 12-35 % on an idle machine. 30 000 rounds still made a step
    10x slower beside one busy process; 1 000 rounds cost nothing idle and stayed within 2x beside
    one (``scripts/bench_threads.py``; figures in the README). The thread count stays, so results
    stay bit for bit what they were. It must be set before torch loads its OpenMP runtime, which is
    why the entry point does it; a value the user set (or ``OMP_WAIT_POLICY``) is kept."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def _quiet_libraries() -> None:
    """Library chatter (torchvision fallbacks, progress bars of tiny loads) hides our own messages."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split" per load
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


#: Each subcommand -> the module whose ``register(subparsers)`` adds it. Only the module of the
#: command being run is imported (``--help`` imports them all), so a command never pays for the
#: imports of the others (numpy, the toy world, ...).
COMMAND_MODULES = {
    "generate": "loracraft.infer.cli",
    "convert": "loracraft.infer.cli",
    "merge": "loracraft.infer.ops.cli",
    "resize": "loracraft.infer.ops.cli",
    "extract": "loracraft.infer.ops.cli",
    "check-data": "loracraft.train.commands.check_data",
    "reproduce": "loracraft.train.commands.reproduce",
    "demo": "loracraft.train.commands.demo",
    "eval": "loracraft.train.commands.evaluate",
    "report": "loracraft.train.commands.report",
    "ui": "loracraft.train.commands.ui",
}


def cmd_train(args: argparse.Namespace) -> int:
    from loracraft.train.config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    if not args.config:
        raise UsageError("no config given, command line, run `loracraft train CONFIG.yaml`")
    cfg = load_config(args.config, args.overrides)
    # Only now torch, diffusers and the rest (~10 s): a config typo is reported in a second.
    from loracraft.train.trainer import run_training

    run_training(cfg)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``loracraft`` parser; with ``command``, only the modules that command needs are imported."""
    parser = argparse.ArgumentParser(
        prog="loracraft",
        description="LoRA fine-tuning of Stable Diffusion: train, generate, convert, check data.",
        epilog="Exit codes: 0 ok, 1 data/runtime error, 2 usage/config error, 3 reproduce mismatch, "
        "130/143 stopped by SIGINT/SIGTERM after a checkpoint.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a LoRA from a YAML config", description="Train a LoRA adapter.")
    p.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 lora.rank=8")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.set_defaults(func=cmd_train)

    if command == "train":
        return parser
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for module in dict.fromkeys(wanted):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand word (the first argument that is not a flag; ``--debug`` takes no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    _short_spin_waits()
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LoracraftError as e:
        if args.debug:
            raise
        stream = sys.stdout if e.exit_code == 0 else sys.stderr
        prefix = "loracraft: " if e.exit_code == 0 else "loracraft: error: "
        for problem in e.problems:
            print(prefix + problem, file=stream)
        return e.exit_code
    except KeyboardInterrupt:
        print("loracraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
