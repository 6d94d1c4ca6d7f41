"""The deterministic sample stream: keyed randomness, sample order, buckets, transforms, batches.

Every random decision about one sample (which item, crop, flip, caption dropout and tag
shuffling, latent sample, noise, timestep) is drawn from a generator keyed by (run seed,
global stream position, purpose). Results therefore depend neither on batch layout, number
of DataLoader workers, nor number of processes, and resuming at any position is exact.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from loracraft.train.data.sources import CaptionedImages, with_affixes


# ----------------------------------------------------------------------------- sampling
def keyed_seed(seed: int, position: int, stream: str) -> int:
    """A 63-bit seed unique to (run seed, global sample position, purpose).

    Every random draw about one sample (crop, flip, caption dropout, latent sample, noise,
    timestep) comes from a generator seeded by its own key, so results depend neither on
    batch layout, worker count nor process count, and resuming at any position is exact.
    """
    digest = hashlib.blake2b(f"{seed}:{position}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(seed: int, position: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(keyed_seed(seed, position, stream))


class SampleStream:
    """The infinite, seeded order in which dataset items are visited.

    Epoch e is a permutation (seeded by (seed, e)) of every item repeated ``repeats`` times;
    the stream is those epochs back to back. Position p therefore fully determines the
    item, so a resumed run needs only its step counter to continue exactly.
    """

    def __init__(self, repeats: list[int], seed: int):
        self.seed = seed
        self.base = [i for i, r in enumerate(repeats) for _ in range(r)]
        self._cache: dict[int, list[int]] = {}

    @property
    def epoch_length(self) -> int:
        return len(self.base)

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            rng = random.Random(keyed_seed(self.seed, epoch, "epoch-order"))
            perm = list(self.base)
            rng.shuffle(perm)
            self._cache = {epoch: perm}  # keep one epoch: bounded memory on long runs
        return self._cache[epoch]

    def item_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        return self.order(epoch)[offset]


class BucketedStream(SampleStream):
    """Like SampleStream, but every global batch is drawn from one bucket.

    Epoch e: each bucket's items (with repeats) are shuffled and cut into global batches
    (the last one topped up from the start of the same bucket, as kohya does), then the
    batches are shuffled. Positions still index single samples, so noise keying, rank
    slicing and resume work unchanged.
    """

    def __init__(self, repeats: list[int], seed: int, buckets: list[tuple[int, int]], global_batch: int):
        super().__init__(repeats, seed)
        self.buckets, self.global_batch = buckets, global_batch
        groups: dict[tuple[int, int], list[int]] = {}
        for i in self.base:
            groups.setdefault(buckets[i], []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        self._length = sum(-(-len(g) // global_batch) * global_batch for g in self.groups)

    @property
    def epoch_length(self) -> int:
        return self._length

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            rng = random.Random(keyed_seed(self.seed, epoch, "bucket-order"))
            batches = []
            for group in self.groups:
                items = list(group)
                rng.shuffle(items)
                short = -len(items) % self.global_batch
                items += [items[k % len(items)] for k in range(short)]
                batches += [items[k : k + self.global_batch] for k in range(0, len(items), self.global_batch)]
            rng.shuffle(batches)
            self._cache = {epoch: [i for b in batches for i in b]}
        return self._cache[epoch]


def positions_for(micro_step: int, batch_size: int, num_processes: int, rank: int) -> list[int]:
    """Global stream positions of one process's batch at a micro-step.

    The global batch of micro-step m is positions [m*B*P, (m+1)*B*P); rank r takes its
    r-th slice, so the union over ranks is the same as a single process with batch B*P.
    """
    start = micro_step * batch_size * num_processes + rank * batch_size
    return list(range(start, start + batch_size))


# ----------------------------------------------------------------------------- buckets
def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """kohya-style bucket sizes: sides in multiples of ``step``, area <= resolution**2, ratio <= max_ratio."""
    area = resolution * resolution
    buckets = set()
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to the image's; ties -> larger area."""
    w, h = size
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


# ----------------------------------------------------------------------------- transforms
def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) an image of ``size`` is resized to so that it covers ``target`` (aspect kept)."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def size_conditioning(
    size: tuple[int, int], target: tuple[int, int], crop: tuple[int, int] | None, flip: bool
) -> torch.Tensor:
    """``(original h, original w, crop top, crop left, target h, target w)`` of one sample.

    These are SDXL's micro-conditioning numbers (``add_time_ids``, Podell et al. 2023, sec. 2.2),
    in the (height, width) / (top, left) order of diffusers' ``train_text_to_image_lora_sdxl.py``
    and kohya's ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw``. ``crop`` is the
    (top, left) offset in the resized image (``None``: the centred crop the cached path uses);
    with ``flip`` the left offset is measured in the mirrored image the model actually sees, as
    both reference trainers do.
    """
    (w, h), (tw, th) = size, target
    nw, nh = cover_size(size, target)
    top, left = crop if crop is not None else ((nh - th) // 2, (nw - tw) // 2)
    if flip:
        left = nw - tw - left
    return torch.tensor([h, w, top, left, th, tw], dtype=torch.long)


def resize_and_crop(
    img: Image.Image,
    target: tuple[int, int] | int,
    center_crop: bool,
    gen: torch.Generator | None,
    at: tuple[int, int] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``target`` (w, h) and crop it; returns (image, crop top-left as (top, left)).

    The crop is centred when ``center_crop`` or when the image already has the target's
    aspect ratio; otherwise its offset is drawn from ``gen``. ``at`` (top, left) reuses an
    offset drawn before: a loss mask is cropped where its image was.
    """
    tw, th = (target, target) if isinstance(target, int) else target
    w, h = img.size
    nw, nh = cover_size((w, h), (tw, th))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if at is not None:
        top, left = at
    elif center_crop or gen is None:
        left, top = (nw - tw) // 2, (nh - th) // 2
    else:
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=gen))
        top = int(torch.randint(0, nh - th + 1, (1,), generator=gen))
    return img.crop((left, top, left + tw, top + th)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor CHW in [-1, 1] (the range the SD VAE was trained on)."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def prepare_caption(
    caption: str,
    gen: torch.Generator,
    dropout: float,
    shuffle_tags: bool,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    prefix: str = "",
    suffix: str = "",
) -> str:
    """One sample's caption, in the order of kohya's ``process_caption``.

    1. ``prefix`` / ``suffix`` are joined on with a space (they are part of the first / last tag);
    2. caption dropout: with probability ``dropout`` the whole caption is "" (what classifier-free
       guidance learns the unconditional prediction from);
    3. the caption is split into comma-separated tags; the first ``keep_tokens`` stay in place;
    4. with ``shuffle_tags`` the other tags are shuffled (when the caption has a comma);
    5. each of the other tags is dropped with probability ``tag_dropout``; the rest are joined by ", ".

    Every draw comes from ``gen`` (keyed by run seed and stream position), in this order.
    """
    caption = with_affixes(caption, prefix, suffix)
    if dropout > 0 and float(torch.rand((), generator=gen)) < dropout:
        return ""
    shuffle = shuffle_tags and "," in caption
    if not (shuffle or tag_dropout > 0):
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=gen).tolist()]
    if tag_dropout > 0:
        survive = (torch.rand(len(rest), generator=gen) >= tag_dropout).tolist()
        rest = [t for t, keep in zip(rest, survive, strict=True) if keep]
    return ", ".join(kept + rest)


@dataclass(frozen=True)
class Plan:
    """Every random decision about the sample at one stream position."""

    position: int
    index: int
    flip: bool
    caption: str
    target: tuple[int, int]  # (w, h) the image is cropped to


class Planner:
    """Decides (item, flip, caption, target size) per position; shared by the pixel and cached paths.

    Each decision has its own keyed generator, so the cached path (which needs no crop draw)
    makes exactly the same flip and caption choices as the pixel path.
    """

    def __init__(
        self,
        images: CaptionedImages,
        stream,
        cfg_data,
        seed: int,
        targets: list[tuple[int, int]],
        affixes: bool = True,
        concepts: list | None = None,
    ):
        self.images, self.stream, self.cfg, self.seed, self.targets = images, stream, cfg_data, seed, targets
        # data.caption_prefix/suffix belong to the dataset's captions (not e.g. DreamBooth's class prompt).
        self.prefix = getattr(cfg_data, "caption_prefix", "") if affixes else ""
        self.suffix = getattr(cfg_data, "caption_suffix", "") if affixes else ""
        #: data.concepts: each item's caption and crop settings are its concept's (``Item.concept``)
        self.concepts = concepts

    def settings(self, index: int):
        """The caption / crop settings item ``index`` trains with: its concept's, else ``data.*``."""
        return self.cfg if self.concepts is None else self.concepts[self.images.items[index].concept]

    def _affixes(self, index: int) -> tuple[str, str]:
        if self.concepts is None:
            return self.prefix, self.suffix
        s = self.settings(index)
        return s.caption_prefix, s.caption_suffix

    def fixed_caption(self, index: int) -> str:
        """Item ``index``'s caption before any random change: what the text cache encodes."""
        return with_affixes(self.images.caption(index), *self._affixes(index))

    def plan(self, position: int) -> Plan:
        idx = self.stream.item_at(position)
        s = self.settings(idx)
        flip = (
            s.random_flip
            and float(torch.rand((), generator=keyed_generator(self.seed, position, "flip"))) < 0.5
        )
        caption = prepare_caption(
            self.images.caption(idx),
            keyed_generator(self.seed, position, "caption"),
            s.caption_dropout,
            s.shuffle_tags,
            getattr(s, "keep_tokens", 0),
            getattr(s, "tag_dropout", 0.0),
            *self._affixes(idx),
        )
        return Plan(position, idx, flip, caption, self.targets[idx])


def load_pixels(
    images: CaptionedImages,
    idx: int,
    target: tuple[int, int],
    center_crop: bool,
    flip: bool,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    img, crop = resize_and_crop(images.image(idx), target, center_crop, gen)
    if flip:
        img = ImageOps.mirror(img)
    return to_tensor(img), crop


class TrainingExamples(torch.utils.data.Dataset):
    """Map-style dataset indexed by *stream position*.

    Without lookups it decodes, crops and flips the image; with ``latent_lookup`` /
    ``text_lookup`` (the cache) it returns the stored latent distribution / text embedding
    for the same planned (item, flip, caption) instead.
    """

    def __init__(self, planner: Planner, latent_lookup=None, text_lookup=None):
        self.planner, self.latent_lookup, self.text_lookup = planner, latent_lookup, text_lookup

    def __len__(self) -> int:  # positions are unbounded; len is only advisory
        return self.planner.stream.epoch_length

    def __getitem__(self, position: int) -> dict:
        p = self.planner.plan(position)
        out = {"caption": p.caption, "position": position, "index": p.index}
        if self.latent_lookup is not None:
            out.update(self.latent_lookup(p.index, p.flip))
        else:
            crop_gen = keyed_generator(self.planner.seed, position, "crop")
            center = self.planner.settings(p.index).center_crop or self.planner.cfg.buckets
            out["pixel_values"], out["crop"] = load_pixels(
                self.planner.images, p.index, p.target, center, p.flip, crop_gen
            )
        if (masks := getattr(self.planner.images, "masks", None)) is not None:  # data.masks
            out["mask"] = masks.tensor(self.planner.images, p.index, p.target, out.get("crop"), p.flip)
        if self.text_lookup is not None:
            out.update(self.text_lookup(p.caption))
        out["size_cond"] = size_conditioning(
            self.planner.images.size(p.index), p.target, out.get("crop"), p.flip
        )
        return out


def collate(batch: list[dict]) -> dict:
    out = {
        "captions": [b["caption"] for b in batch],
        "positions": torch.tensor([b["position"] for b in batch], dtype=torch.long),
    }
    for key in (
        "pixel_values",
        "latent_mean",
        "latent_std",
        "text_embeds",
        "pooled_text_embeds",
        "size_cond",
    ):
        if key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    if masked := [b["mask"] for b in batch if "mask" in b]:  # rows without a mask (class images) train whole
        out["mask"] = torch.stack([b.get("mask", torch.ones_like(masked[0])) for b in batch])
    return out


class _RankBatches(torch.utils.data.Sampler):
    def __init__(self, start_micro_step: int, batch_size: int, num_processes: int, rank: int):
        self.start, self.b, self.p, self.r = start_micro_step, batch_size, num_processes, rank

    def __iter__(self):
        m = self.start
        while True:
            yield positions_for(m, self.b, self.p, self.r)
            m += 1


def loader_workers(requested: int, examples: torch.utils.data.Dataset, print_fn=print) -> int:
    """The DataLoader worker count for ``data.num_workers``.

    Workers started by fork share the dataset as is; any other start method (spawn on macOS and
    Windows) pickles it, which the cache lookups (closures) do not survive. Then the samples are
    made in the training process, with a note, rather than failing at the first batch.
    """
    import multiprocessing
    import pickle

    if requested == 0 or multiprocessing.get_start_method() == "fork":
        return requested
    try:
        pickle.dumps(examples)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        print_fn(
            f"data.num_workers={requested} unused: this platform starts workers without fork and the "
            f"samples cannot be sent to them ({type(e).__name__}); decoding in the training process"
        )
        return 0
    return requested


def make_batches(
    examples: torch.utils.data.Dataset,
    start_micro_step: int,
    batch_size: int,
    num_processes: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    collate_fn=collate,
) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches from ``start_micro_step`` on."""
    return torch.utils.data.DataLoader(
        examples,
        batch_sampler=_RankBatches(start_micro_step, batch_size, num_processes, rank),
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Creating the iterator draws a worker base seed; from the global RNG that draw would land
        # after a resume restored it (and before the first step in an uninterrupted run), shifting
        # every LoRA-dropout mask. Samples are keyed by position, so a private generator costs nothing.
        generator=torch.Generator().manual_seed(0),
    )
