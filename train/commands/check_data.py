"""``loracraft check-data DIR``: every problem of a dataset, one line each, before any training.

Exit 0 when the dataset is trainable (warnings only), 1 when there are errors. The lint
itself lives in :mod:`loracraft.train.data.check`; this module only parses arguments and
prints, and imports the lint on use so that every other ``loracraft`` command starts fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from loracraft.infer.errors import DataError, DataNotFound, UsageError


def register(subparsers) -> None:
    """Add ``loracraft check-data``."""
    p = subparsers.add_parser(
        "check-data",
        help="check a dataset for problems before training",
        description="Report every problem in a captioned image dataset, per file. "
        "Exit 0 when it is trainable (warnings only), 1 when there are errors.",
    )
    p.add_argument(
        "data_dir", metavar="DIR", nargs="?", help="dataset folder (any layout `train` reads) or hub id"
    )
    p.add_argument(
        "--config",
        metavar="RECIPE",
        help="instead of DIR: check every dataset a training recipe reads (data.path and each of data.concepts, "
        "each at its own resolution and columns)",
    )
    p.add_argument("--resolution", type=int, metavar="R", help="training resolution: report smaller images")
    p.add_argument("--base", metavar="MODEL", help="base model whose tokenizer counts caption tokens")
    p.add_argument("--fix-report", metavar="FILE", help="also write every finding to FILE as JSON")
    p.add_argument("--image-column", default="image", help="image column (saved/hub datasets)")
    p.add_argument("--caption-column", default="text", help="caption column / metadata field")
    p.add_argument(
        "--allow-outside-links",
        action="store_true",
        help="read images/captions that lead outside DIR (links, ../ or absolute metadata paths) instead of "
        "reporting them as errors (data.allow_outside_links)",
    )
    p.add_argument(
        "--masks",
        metavar="alpha|FOLDER",
        help="check the loss masks too (data.masks): alpha = every image needs an alpha channel; a folder = "
        "every image needs a mask there at its relative path",
    )
    p.add_argument(
        "--instance-prompt",
        metavar="PROMPT",
        help="check as DreamBooth instance images trained with PROMPT (dreambooth.instance_prompt): "
        "images need no captions",
    )
    p.add_argument(
        "--captions",
        choices=("instance_prompt", "prepend"),
        default="instance_prompt",
        help="with --instance-prompt: dreambooth.captions (prepend = 'PROMPT, <caption>')",
    )
    p.set_defaults(func=cmd_check_data)


def _instance_caption_rule(prompt: str, captions: str) -> Callable[[str | None], str]:
    from loracraft.train.config import DreamBoothCfg
    from loracraft.train.dreambooth import caption_rule

    if not prompt.strip():
        raise UsageError(
            '--instance-prompt is empty, command line, pass e.g. --instance-prompt "a photo of sks dog"'
        )
    return caption_rule(DreamBoothCfg(instance_prompt=prompt, captions=captions, prior_preservation=False))


def cmd_check_data(args: argparse.Namespace) -> int:
    from loracraft.train.data.check import check_dataset, load_tokenizer, with_captions
    from loracraft.train.data.sources import printable

    if args.resolution is not None and args.resolution <= 0:
        raise UsageError(
            f"--resolution must be positive (got {args.resolution}), command line, e.g. --resolution 512"
        )
    if (args.data_dir is None) == (args.config is None):
        raise UsageError(
            "give a dataset folder or --config RECIPE (one of them), command line, e.g. "
            "loracraft check-data photos/ or loracraft check-data --config my.yaml"
        )
    if args.config is not None:
        return _check_recipe(args)
    root = Path(args.data_dir).expanduser()
    if not root.exists() and (args.data_dir.startswith((".", "/", "~")) or args.data_dir.count("/") != 1):
        raise DataNotFound(f"dataset folder not found, {root}, check the path")
    tokenizer = load_tokenizer(args.base) if args.base else None
    report = check_dataset(
        args.data_dir,
        args.resolution,
        tokenizer,
        args.image_column,
        args.caption_column,
        allow_outside_links=args.allow_outside_links,
        masks=args.masks,
    )
    if args.instance_prompt is not None:
        report = with_captions(report, _instance_caption_rule(args.instance_prompt, args.captions))
    _show(report)
    if args.fix_report:
        _write_fix_report(args.fix_report, report.to_json())
    if not report.trainable:
        files = len({f.file for f in report.errors})
        raise DataError(
            f"{len(report.errors)} error(s) in {files} file(s) make the dataset untrainable, {printable(report.root)}, "
            "fix the files listed above (or train with data.on_error=skip to leave them out)"
        )
    print("dataset is trainable" + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
    return 0


def _show(report, name: str = "") -> None:
    from loracraft.train.data.sources import printable

    label = f" [{name}]" if name else ""
    print(f"loracraft check-data: {printable(report.root)} ({report.layout}, {report.images} images){label}")
    for f in report.findings:
        print(f.line())
    for note in report.notes:
        print(f"note: {note}")
    print()
    print("\n".join(report.summary_lines()))


def _write_fix_report(path: str, data: dict) -> None:
    from loracraft.infer.io import write_json_atomic

    write_json_atomic(path, data)
    print(f"findings written to {path}")


def _check_recipe(args: argparse.Namespace) -> int:
    """Every dataset of a recipe (``data.path`` and ``data.concepts``), each at its own settings,
    one report per dataset under a heading naming its path and config key."""
    from loracraft.train.config import build_config, read_yaml
    from loracraft.train.data.check import load_tokenizer, with_captions
    from loracraft.train.data.concepts import check_concepts, resolve_concepts
    from loracraft.train.data.sources import printable
    from loracraft.train.dreambooth import caption_rule

    tree = read_yaml(args.config)
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    # Only data.* matters here: a recipe that leaves model.base to the command line still checks.
    cfg = build_config({**tree, "model": {**model, "base": model.get("base") or "-"}}, source=args.config)
    concepts = resolve_concepts(cfg.data)
    tokenizer = load_tokenizer(args.base) if args.base else None
    reports = check_concepts(
        concepts,
        tokenizer,
        allow_outside_links=args.allow_outside_links or cfg.data.allow_outside_links,
        resolution=args.resolution or True,
        max_token_length=cfg.data.max_token_length,
    )
    if cfg.dreambooth is not None:  # captions come from dreambooth.instance_prompt
        reports = [with_captions(r, caption_rule(cfg.dreambooth)) for r in reports]
    for i, (c, report) in enumerate(zip(concepts, reports, strict=True)):
        print("\n" * (i > 0), end="")
        _show(report, c.name)
    if args.fix_report:
        _write_fix_report(
            args.fix_report,
            {
                "trainable": all(r.trainable for r in reports),
                "concepts": [
                    {"concept": c.name, **r.to_json()} for c, r in zip(concepts, reports, strict=True)
                ],
            },
        )
    bad = [(c, r) for c, r in zip(concepts, reports, strict=True) if not r.trainable]
    if bad:
        problems = [
            f"{len(r.errors)} error(s) make {c.name} untrainable, {printable(r.root)}, fix the files listed above "
            "(or train with data.on_error=skip to leave them out)"
            for c, r in bad
        ]
        raise DataError(problems[0], problems)
    warnings = sum(len(r.warnings) for r in reports)
    print(f"{len(reports)} dataset(s) trainable" + (f" ({warnings} warnings)" if warnings else ""))
    return 0
