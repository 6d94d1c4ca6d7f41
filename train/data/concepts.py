"""Several datasets ("concepts") in one run: ``data.concepts``, like kohya's dataset_config subsets
and OneTrainer's concepts.

Each concept is a dataset folder (any layout :func:`sources.read_source` reads) with its own
``repeats`` and its own caption / crop / resolution settings; a setting it leaves unset is the
``data.*`` value. ``data.path``, when set, is the first concept, with exactly the ``data.*``
settings, so a run with only ``data.path`` is the one-dataset run it always was.

Every concept is read and checked by the same reader and lint as a single dataset (so
``check-data`` and training see the same items); the checked items are then put in one list
in which each item carries its concept's index (``Item.concept``) and its repeats times the
concept's. The :class:`~loracraft.train.data.stream.Planner` reads caption and crop settings
through that index, and concepts of different resolutions get different target sizes, which
the bucketed sample order keeps in separate global batches. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loracraft.infer.errors import DataError
from loracraft.train.config_schema import CONCEPT_KEYS
from loracraft.train.data.images import CaptionedImages
from loracraft.train.data.sources import Finding


@dataclass(frozen=True)
class Concept:
    """One dataset of the run with every per-dataset setting resolved (its own, else ``data.*``)."""

    index: int
    name: str  # the config key that declares it: "data.path" or "data.concepts[i]"
    path: str
    repeats: int
    caption_prefix: str
    caption_suffix: str
    keep_tokens: int
    shuffle_tags: bool
    tag_dropout: float
    caption_dropout: float
    resolution: int
    center_crop: bool
    random_flip: bool
    image_column: str
    caption_column: str
    own: frozenset[str] = field(default_factory=frozenset)  # the keys it sets itself

    @property
    def path_key(self) -> str:
        return self.name if self.name == "data.path" else f"{self.name}.path"

    def key(self, setting: str) -> str:
        """The config key that decides ``setting`` for this concept (its own, or the data.* one)."""
        return f"{self.name}.{setting}" if setting in self.own else f"data.{setting}"


def resolve_concepts(d) -> list[Concept]:
    """The run's datasets in order: ``data.path`` (if set), then ``data.concepts``."""
    inherited = {k: getattr(d, k) for k in CONCEPT_KEYS}
    out = []
    if d.path is not None:
        out.append(Concept(0, "data.path", d.path, 1, **inherited))
    for i, c in enumerate(getattr(d, "concepts", None) or []):
        own = {k: v for k in CONCEPT_KEYS if (v := getattr(c, k)) is not None}
        out.append(
            Concept(
                len(out), f"data.concepts[{i}]", c.path, c.repeats, **{**inherited, **own}, own=frozenset(own)
            )
        )
    return out


def random_caption_keys(d) -> list[str]:
    """The config keys that make some concept's captions change every step (shuffled or dropped
    tags), so a text-embedding cache of fixed captions would be wrong; empty when none do."""
    keys = []
    for c in resolve_concepts(d):
        keys += [c.key("shuffle_tags")] if c.shuffle_tags else []
        keys += [c.key("tag_dropout")] if c.tag_dropout > 0 else []
    return list(dict.fromkeys(keys))


# ----------------------------------------------------------------------------- reading and checking
def check_concepts(
    concepts: list[Concept],
    tokenizer=None,
    progress: bool = True,
    allow_outside_links: bool = False,
    resolution: int | None | bool = True,
    max_token_length: int = 75,
) -> list:
    """One ``check-data`` report per concept, each read with the concept's own columns and
    compared to its own resolution (``resolution``: True = each concept's, else that value);
    captions are counted with the concept's prefix/suffix."""
    from loracraft.train.data.check import check_dataset

    return [
        check_dataset(
            c.path,
            c.resolution if resolution is True else resolution,
            tokenizer,
            c.image_column,
            c.caption_column,
            progress=progress,
            allow_outside_links=allow_outside_links,
            setting=c.path_key,
            caption_prefix=c.caption_prefix or "",
            caption_suffix=c.caption_suffix or "",
            max_token_length=max_token_length,
        )
        for c in concepts
    ]


def checked_concept_images(
    reports: list, concepts: list[Concept], on_error: str
) -> tuple[CaptionedImages, list[tuple[Concept, Finding]]]:
    """The training view of every checked concept, as one item list (``data.on_error`` applied
    per concept); raises one DataError listing the errors of every concept, not just the first's."""
    from loracraft.train.data.check import checked_images

    views, skipped, problems = [], [], []
    for report, c in zip(reports, concepts, strict=True):
        try:
            view, left_out = checked_images(report, on_error)
        except DataError as e:
            problems += [f"{c.name}: {p}" for p in e.problems]
            continue
        views.append(view)
        skipped += [(c, f) for f in left_out]
    if problems:
        raise DataError(problems[0], problems)
    return merge_views(views, concepts), skipped


class _ConceptRows:
    """The rows of every ``datasets``-backed concept under one row numbering (``Item.row``), each
    row's image under one column name, so one :class:`CaptionedImages` reads them all."""

    COLUMN = "image"

    def __init__(self):
        self.parts: list[tuple[int, int, Any, str]] = []  # (first row, rows, dataset, image column)

    def add(self, hf, image_column: str) -> int:
        start = sum(n for _, n, _, _ in self.parts)
        self.parts.append((start, len(hf), hf, image_column))
        return start

    def __getitem__(self, row: int) -> dict:
        for start, n, hf, column in self.parts:
            if start <= row < start + n:
                return {self.COLUMN: hf[row - start][column]}
        raise IndexError(row)


def merge_views(views: list[CaptionedImages], concepts: list[Concept]) -> CaptionedImages:
    """One view over every concept's items: each tagged with its concept and its repeats
    multiplied by the concept's (kohya ``N_name`` folder repeats x ``repeats``)."""
    rows, items = _ConceptRows(), []
    for view, c in zip(views, concepts, strict=True):
        offset = rows.add(view._hf, view._image_column) if view._hf is not None else 0
        for it in view.items:
            row = None if it.row is None else it.row + offset
            items.append(replace(it, concept=c.index, repeats=it.repeats * c.repeats, row=row))
    roots = [v.root for v in views]
    root = roots[0] if len(roots) == 1 else f"{roots[0]} and {len(roots) - 1} more concept(s)"
    return CaptionedImages(
        items, "concepts", root, hf_dataset=rows if rows.parts else None, image_column=_ConceptRows.COLUMN
    )


def concepts_fingerprint(images: CaptionedImages) -> str:
    """sha256 over (concept, image bytes hash, repeats, caption) in sorted order: like the one-dataset
    fingerprint, plus which concept (so which settings) each image trains under."""
    entries = sorted(
        f"{it.concept}|{images.item_hash(i)}|{it.repeats}|{it.caption}" for i, it in enumerate(images.items)
    )
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def check_concepts_for_training(
    d, tokenizer, progress: bool, print_: Callable[[str], None]
) -> CaptionedImages:
    """``data.concepts`` checked like ``loracraft check-data`` before any weights load: every
    concept's errors together (``data.on_error``), its skipped images and warnings reported by path."""
    from loracraft.train.data.check import print_check_summary

    concepts = resolve_concepts(d)
    reports = check_concepts(concepts, tokenizer, progress, d.allow_outside_links, max_token_length=d.max_token_length)
    images, skipped = checked_concept_images(reports, concepts, d.on_error)
    files = sorted({str(Path(c.path) / f.shown_file) for c, f in skipped})
    sources = [(c.name, c.path, r) for c, r in zip(concepts, reports, strict=True)]
    print_check_summary(files, sum(r.images for r in reports), sources, print_)
    return images


# ----------------------------------------------------------------------------- sizes and order
def concept_targets(
    images: CaptionedImages, concepts: list[Concept], sizes: list[tuple[int, int]], buckets: bool, step: int
) -> list[tuple[int, int]]:
    """Each item's training size (w, h): its concept's resolution square, or with ``data.buckets``
    the aspect-ratio bucket around that resolution nearest to the image's shape."""
    from loracraft.train.data.stream import assign_bucket, make_buckets

    grids: dict[int, list[tuple[int, int]]] = {}
    targets = []
    for it, size in zip(images.items, sizes, strict=True):
        res = concepts[it.concept].resolution
        if not buckets:
            targets.append((res, res))
            continue
        grid = grids.setdefault(res, make_buckets(res, step))
        targets.append(assign_bucket(size, grid))
    return targets


def concept_planner(
    images: CaptionedImages,
    cfg,
    sizes: list[tuple[int, int]],
    num_processes: int,
    print_: Callable[[str], None],
):
    """The planner of a ``data.concepts`` run: per-concept captions and crops, and a sample order
    in which every global batch has one target size (buckets, also for concepts whose resolutions
    differ), deterministic under ``train.seed`` like the one-dataset order."""
    from loracraft.train.data.stream import BucketedStream, Planner, SampleStream

    d, t = cfg.data, cfg.train
    concepts = resolve_concepts(d)
    targets = concept_targets(images, concepts, sizes, d.buckets, d.bucket_step)
    counts = [0] * len(concepts)
    for it in images.items:
        counts[it.concept] += it.repeats
    print_(
        "concepts: "
        + ", ".join(
            f"{Path(c.path).name or c.path} {n} samples/epoch at {c.resolution}px"
            for c, n in zip(concepts, counts, strict=True)
        )
    )
    if d.buckets or len(set(targets)) > 1:
        stream = BucketedStream(images.repeats(), t.seed, targets, t.batch_size * num_processes)
        print_(f"{len(set(targets))} training sizes in use, one per batch: {sorted(set(targets))}")
    else:
        stream = SampleStream(images.repeats(), t.seed)
    return Planner(images, stream, d, t.seed, targets, concepts=concepts)
