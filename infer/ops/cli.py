"""``loracraft merge``, ``loracraft resize`` and ``loracraft extract``.

Registered by the ``loracraft`` entry point (``register(subparsers)``), which turns the
:class:`~loracraft.infer.errors.LoracraftError` raised here into one-line messages and exit codes.
Each command prints one line per layer (unless ``--quiet``) and a summary line last.
"""

from __future__ import annotations

import argparse
import time

from loracraft.infer.errors import UsageError

__all__ = ["register", "cmd_merge", "cmd_resize", "cmd_extract"]

_FORMATS = ["kohya", "diffusers"]


def register(subparsers) -> None:
    """Add the ``merge``, ``resize`` and ``extract`` subcommands."""
    m = subparsers.add_parser(
        "merge",
        help="merge LoRAs into one adapter (exact), or bake them into a base model",
        description="Merge adapters with weights. Without --rank the result is exact (ranks are "
        "concatenated); --rank R keeps the best rank-R approximation of the weighted sum per layer; "
        "--into-base BASE writes a full diffusers model with the adapters fused in.",
    )
    m.add_argument("adapters", nargs="+", metavar="PATH[:WEIGHT]", help="adapter files or folders (weight 1)")
    m.add_argument(
        "--out", required=True, help="output .safetensors file or folder (with --into-base: a new folder)"
    )
    m.add_argument("--rank", type=int, help="truncate each merged layer to this rank by SVD")
    m.add_argument(
        "--into-base", metavar="BASE", help="fuse into this base model and save a diffusers folder"
    )
    m.add_argument("--single-file", action="store_true", help="with --into-base: a single checkpoint file")
    m.add_argument("--base-config", metavar="DIR", help="diffusers config folder for a single-file BASE")
    m.add_argument("--dtype", help="with --into-base: saved dtype (default: the base's)")
    m.add_argument("--to", choices=_FORMATS, help="output layout (default: the first input's)")
    m.add_argument(
        "--allow-different-bases",
        action="store_true",
        help="merge even if the adapters' headers name different base models",
    )
    m.add_argument("--quiet", action="store_true", help="print only the summary line")
    m.set_defaults(func=cmd_merge)

    r = subparsers.add_parser(
        "resize",
        help="lower a LoRA's rank by SVD, fixed or per layer (kohya's dynamic rules)",
        description="Resize a LoRA per layer by truncated SVD of its delta. The kept part is applied "
        "unchanged (alpha is rescaled); each layer reports the share of its Frobenius norm kept.",
    )
    r.add_argument("input", metavar="IN", help="adapter file or folder (diffusers or kohya)")
    r.add_argument("--rank", type=int, help="new rank (with --dynamic: the largest rank a layer may get)")
    r.add_argument("--dynamic", metavar="METHOD", help="sv_ratio, sv_fro or sv_cumulative (per-layer rank)")
    r.add_argument(
        "--param", type=float, help="the --dynamic target (sv_ratio >= 1; sv_fro/sv_cumulative in (0, 1])"
    )
    r.add_argument("--out", required=True, help="output .safetensors file or folder")
    r.add_argument("--to", choices=_FORMATS, help="output layout (default: the input's)")
    r.add_argument("--quiet", action="store_true", help="print only the summary line")
    r.set_defaults(func=cmd_resize)

    e = subparsers.add_parser(
        "extract",
        help="extract a LoRA from a full fine-tune (its difference to the base)",
        description="Approximate TUNED - BASE per layer by truncated SVD: UNet attention layers, text "
        "encoders that differ, and with --conv-rank the ResNet convolutions. Reports each layer's error.",
    )
    e.add_argument("--base", required=True, help="the base: diffusers folder or .safetensors checkpoint")
    e.add_argument("--tuned", required=True, help="the fine-tuned model (same architecture)")
    e.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 conv layers")
    e.add_argument("--conv-rank", type=int, help="also extract ResNet/sampler layers, 3x3 convs at this rank")
    e.add_argument(
        "--min-diff", type=float, default=0.0, help="skip layers whose max |change| is <= this (default 0)"
    )
    e.add_argument("--base-config", metavar="DIR", help="diffusers config folder for single-file models")
    e.add_argument("--device", default="cpu", help="torch device for the SVDs (default cpu; cuda is faster)")
    e.add_argument("--out", required=True, help="output .safetensors file or folder")
    e.add_argument("--to", choices=_FORMATS, default="diffusers", help="output layout (default diffusers)")
    e.add_argument("--quiet", action="store_true", help="print only the summary line")
    e.set_defaults(func=cmd_extract)


def _report(command: str, reports, path, start: float, quiet: bool, notes=()) -> int:
    """One line per layer (unless ``quiet``), any notes, then the summary line with the wall time."""
    from loracraft.infer.ops.delta import format_report, summary_line

    for line in [] if quiet else [format_report(r) for r in reports]:
        print(line)
    for line in notes:
        print(line)
    print(f"{command}: {summary_line(reports, path)}, {time.perf_counter() - start:.1f} s")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from loracraft.infer.ops.merge import merge_files, merge_into_base

    start = time.perf_counter()
    if args.into_base:
        if args.rank is not None or args.to:
            flag = "--rank" if args.rank is not None else "--to"
            raise UsageError(
                f"{flag} has no meaning with --into-base, {flag}, drop it (the adapters are fused exactly)"
            )
        out = merge_into_base(
            args.into_base,
            args.adapters,
            args.out,
            single_file=args.single_file,
            dtype=args.dtype,
            base_config=args.base_config,
        )
        print(
            f"wrote {out} ({len(args.adapters)} adapters fused into {args.into_base}, {time.perf_counter() - start:.1f} s)"
        )
        return 0
    for flag, value in (
        ("--single-file", args.single_file),
        ("--dtype", args.dtype),
        ("--base-config", args.base_config),
    ):
        if value:
            raise UsageError(f"{flag} only applies with --into-base, {flag}, add --into-base BASE or drop it")
    path, reports = merge_files(
        args.adapters, args.out, rank=args.rank, to=args.to, allow_different_bases=args.allow_different_bases
    )
    return _report("merge", reports, path, start, args.quiet)


def cmd_resize(args: argparse.Namespace) -> int:
    from loracraft.infer.ops.resize import resize_file

    start = time.perf_counter()
    path, reports = resize_file(
        args.input, args.out, rank=args.rank, dynamic=args.dynamic, param=args.param, to=args.to
    )
    return _report("resize", reports, path, start, args.quiet)


def cmd_extract(args: argparse.Namespace) -> int:
    from loracraft.infer.ops.extract import extract_file

    start = time.perf_counter()
    path, result = extract_file(
        args.base,
        args.tuned,
        args.out,
        rank=args.rank,
        conv_rank=args.conv_rank,
        to=args.to,
        min_diff=args.min_diff,
        base_config=args.base_config,
        device=args.device,
    )
    notes = [f"{c}: {n} layers equal to the base, not extracted" for c, n in sorted(result.unchanged.items())]
    return _report("extract", result.reports, path, start, args.quiet, notes)
