"""Captioned image datasets in every common layout, and the deterministic sample stream.

Layouts (first match wins, in this order — documented in the README):
1. a folder with ``metadata.jsonl``/``metadata.csv`` -> ``datasets`` ``imagefolder`` (metadata
   wins over ``.txt`` sidecars when both exist: it is the more explicit of the two);
2. a folder saved with ``Dataset.save_to_disk`` -> ``datasets.load_from_disk``;
3. kohya ``N_name`` sub-folders (N = repeats) with ``.txt`` sidecars;
4. a folder of images with ``.txt`` sidecars;
5. anything that is not a local path -> a hub dataset id (``load_dataset(id, split="train")``).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from loracraft.infer.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    """One training example before decoding: where its image comes from, and its caption."""

    caption: str
    path: Path | None = None  # image file, or None when the bytes come from a datasets row
    row: int | None = None  # row index into an HF dataset
    repeats: int = 1


class CaptionedImages:
    """A uniform view over every layout: ``len``, ``image(i)``, ``caption(i)``, ``image_bytes(i)``."""

    def __init__(self, items: list[Item], layout: str, root: str, hf_dataset=None, image_column: str = "image"):
        self.items = items
        self.layout = layout
        self.root = root
        self._hf = hf_dataset
        self._image_column = image_column

    def __len__(self) -> int:
        return len(self.items)

    def image_bytes(self, i: int) -> bytes:
        item = self.items[i]
        if item.path is not None:
            return item.path.read_bytes()
        cell = self._hf[item.row][self._image_column]
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            return Path(cell["path"]).read_bytes()
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        return buf.getvalue()

    def image(self, i: int) -> Image.Image:
        """Decoded RGB image with its EXIF orientation applied (phones store rotated pixels)."""
        item = self.items[i]
        try:
            src = item.path if item.path is not None else io.BytesIO(self.image_bytes(i))
            with Image.open(src) as im:
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
        except Exception as e:  # PIL raises many types for broken files
            where = item.path or f"{self.root} row {item.row}"
            raise DataError(f"cannot decode image, {where}, remove or re-save the file ({e})") from e

    def caption(self, i: int) -> str:
        return self.items[i].caption

    def repeats(self) -> list[int]:
        return [it.repeats for it in self.items]

    def fingerprint(self) -> str:
        """sha256 over (image bytes hash, caption, repeats) in sorted order: the dataset's identity."""
        entries = sorted(
            f"{hashlib.sha256(self.image_bytes(i)).hexdigest()}|{it.repeats}|{it.caption}"
            for i, it in enumerate(self.items)
        )
        return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparency is composited on white, not on black garbage."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- layout readers
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _sidecar_caption(img: Path) -> str | None:
    txt = img.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return txt.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption file is not UTF-8, {txt}, re-save it as UTF-8") from e


def _read_sidecars(root: Path) -> tuple[list[Item], str]:
    repeat_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and REPEAT_DIR.match(d.name)]
    folders = [(d, int(REPEAT_DIR.match(d.name).group(1))) for d in repeat_dirs] or [(root, 1)]
    layout = "kohya-repeats" if repeat_dirs else "txt-sidecars"
    items, missing = [], []
    for folder, repeats in folders:
        for img in _images_in(folder):
            cap = _sidecar_caption(img)
            if cap is None:
                missing.append(img)
                continue
            items.append(Item(caption=cap, path=img, repeats=repeats))
    if missing and items:
        raise DataError(
            f"{len(missing)} image(s) have no .txt caption, e.g. {missing[0]}, "
            f"add a caption file beside each image (run `loracraft check-data {root}`)"
        )
    if missing and not items:
        raise DataError(
            f"no captions found, {root}, add metadata.jsonl (file_name,text) or a .txt caption beside each image"
        )
    return items, layout


def _read_hf(ds, root: str, image_column: str, caption_column: str, layout: str) -> CaptionedImages:
    from datasets import Image as HFImage

    cols = list(ds.column_names)
    for col, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if col not in cols:
            raise DataError(
                f"dataset has no column '{col}', {root} (columns: {', '.join(cols)}), set {key} to one of them"
            )
    if isinstance(ds.features[image_column], HFImage):
        ds = ds.cast_column(image_column, HFImage(decode=False))
    captions = ds[caption_column]
    items = [Item(caption=str(c or "").strip(), row=i) for i, c in enumerate(captions)]
    return CaptionedImages(items, layout, root, hf_dataset=ds, image_column=image_column)


def load_captioned_images(path: str, image_column: str = "image", caption_column: str = "text") -> CaptionedImages:
    """Open a dataset in any supported layout; raise DataError (one line) when it cannot be trained on."""
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset path is a file, not a folder, {root}, point data.path at the folder")
    if not root.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise DataError(f"dataset folder not found, {root}, check data.path")
        return _load_hub(path, image_column, caption_column)
    if (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        from datasets import load_dataset

        try:
            ds = load_dataset("imagefolder", data_dir=str(root), split="train")
        except Exception as e:
            raise DataError(f"cannot read imagefolder metadata, {root}, fix metadata.jsonl/csv ({e})") from e
        data = _read_hf(ds, str(root), image_column, caption_column, "imagefolder")
    elif (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
        from datasets import load_from_disk

        ds = load_from_disk(str(root))
        if hasattr(ds, "keys"):  # a DatasetDict: train on its train split
            if "train" not in ds:
                raise DataError(f"saved dataset has no 'train' split, {root}, save the split you want to train on")
            ds = ds["train"]
        data = _read_hf(ds, str(root), image_column, caption_column, "saved-dataset")
    else:
        items, layout = _read_sidecars(root)
        data = CaptionedImages(items, layout, str(root))
    if len(data) == 0:
        raise DataError(f"dataset has no images, {root}, add images ({', '.join(sorted(IMAGE_EXTS))})")
    return data


def _load_hub(name: str, image_column: str, caption_column: str) -> CaptionedImages:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split="train")
    except Exception as e:
        raise DataError(
            f"dataset '{name}' is neither a local folder nor a reachable hub dataset, data.path, "
            f"check the path or your network ({type(e).__name__})"
        ) from e
    return _read_hf(ds, name, image_column, caption_column, "hub")


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


def positions_for(micro_step: int, batch_size: int, num_processes: int, rank: int) -> list[int]:
    """Global stream positions of one process's batch at a micro-step.

    The global batch of micro-step m is positions [m*B*P, (m+1)*B*P); rank r takes its
    r-th slice, so the union over ranks is the same as a single process with batch B*P.
    """
    start = micro_step * batch_size * num_processes + rank * batch_size
    return list(range(start, start + batch_size))


# ----------------------------------------------------------------------------- transforms
def resize_and_crop(
    img: Image.Image, resolution: int, center_crop: bool, gen: torch.Generator
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to ``resolution`` and crop a square; returns (image, crop top-left)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = int(torch.randint(0, nw - resolution + 1, (1,), generator=gen))
        top = int(torch.randint(0, nh - resolution + 1, (1,), generator=gen))
    return img.crop((left, top, left + resolution, top + resolution)), (top, left)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor CHW in [-1, 1] (the range the SD VAE was trained on)."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def prepare_caption(caption: str, gen: torch.Generator, dropout: float, shuffle_tags: bool) -> str:
    """Caption dropout (enables classifier-free guidance) and kohya-style tag shuffling."""
    if dropout > 0 and float(torch.rand((), generator=gen)) < dropout:
        return ""
    if shuffle_tags and "," in caption:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        perm = torch.randperm(len(tags), generator=gen).tolist()
        caption = ", ".join(tags[i] for i in perm)
    return caption


class TrainingExamples(torch.utils.data.Dataset):
    """Map-style dataset indexed by *stream position*: decode, crop, flip, caption dropout."""

    def __init__(self, images: CaptionedImages, stream: SampleStream, cfg_data, seed: int):
        self.images, self.stream, self.cfg, self.seed = images, stream, cfg_data, seed

    def __len__(self) -> int:  # positions are unbounded; len is only advisory
        return self.stream.epoch_length

    def __getitem__(self, position: int) -> dict:
        idx = self.stream.item_at(position)
        gen = keyed_generator(self.seed, position, "augment")
        img, crop = resize_and_crop(self.images.image(idx), self.cfg.resolution, self.cfg.center_crop, gen)
        flip = self.cfg.random_flip and float(torch.rand((), generator=gen)) < 0.5
        if flip:
            img = ImageOps.mirror(img)
        caption = prepare_caption(
            self.images.caption(idx), gen, self.cfg.caption_dropout, self.cfg.shuffle_tags
        )
        return {"pixel_values": to_tensor(img), "caption": caption, "position": position, "index": idx}


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "positions": torch.tensor([b["position"] for b in batch], dtype=torch.long),
    }


class _RankBatches(torch.utils.data.Sampler):
    def __init__(self, start_micro_step: int, batch_size: int, num_processes: int, rank: int):
        self.start, self.b, self.p, self.r = start_micro_step, batch_size, num_processes, rank

    def __iter__(self):
        m = self.start
        while True:
            yield positions_for(m, self.b, self.p, self.r)
            m += 1


def make_batches(
    examples: TrainingExamples,
    start_micro_step: int,
    batch_size: int,
    num_processes: int = 1,
    rank: int = 0,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches from ``start_micro_step`` on."""
    return torch.utils.data.DataLoader(
        examples,
        batch_sampler=_RankBatches(start_micro_step, batch_size, num_processes, rank),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
