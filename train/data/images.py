"""The training view of a dataset's items: decoded RGB images, sizes, hashes, fingerprint."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from loracraft.infer.errors import DataError
from loracraft.train.data.findings import printable

if TYPE_CHECKING:
    from loracraft.train.data.sources import Item


class CaptionedImages:
    """A uniform view over items of any layout: ``len``, ``image(i)``, ``caption(i)``, ``image_bytes(i)``."""

    def __init__(
        self, items: list[Item], layout: str, root: str, hf_dataset=None, image_column: str = "image"
    ):
        self.items = items
        self.layout = layout
        self.root = root
        self._hf = hf_dataset
        self._image_column = image_column
        self._sizes: dict[int, tuple[int, int]] = {}
        self._hashes: dict[int, str] = {}
        #: the loss-mask reader (``data.masks``, :mod:`.masks`); None trains every pixel
        self.masks = None

    def __len__(self) -> int:
        return len(self.items)

    def image_bytes(self, i: int) -> bytes:
        return item_bytes(self.items[i], self._hf, self._image_column)

    def _where(self, i: int) -> str:
        item = self.items[i]
        return printable(item.path) if item.path is not None else f"{self.root} row {item.row}"

    def image(self, i: int) -> Image.Image:
        """Decoded RGB image with its EXIF orientation applied (phones store rotated pixels)."""
        item = self.items[i]
        try:
            src = item.path if item.path is not None else io.BytesIO(self.image_bytes(i))
            with Image.open(src) as im:
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
        except Exception as e:  # PIL raises many types for broken files
            raise DataError(f"cannot decode image, {self._where(i)}, remove or re-save the file ({e})") from e

    def caption(self, i: int) -> str:
        return self.items[i].caption or ""

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) as trained, i.e. after EXIF rotation, from the header only (memoised:
        SDXL's size conditioning asks for it on every sample)."""
        if i not in self._sizes:
            self._sizes[i] = self._read_size(i)
        return self._sizes[i]

    def _read_size(self, i: int) -> tuple[int, int]:
        item = self.items[i]
        src = item.path if item.path is not None else io.BytesIO(self.image_bytes(i))
        try:
            with Image.open(src) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
        except Exception as e:
            raise DataError(
                f"cannot read image header, {self._where(i)}, remove or re-save the file ({e})"
            ) from e
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)

    def item_hash(self, i: int) -> str:
        """sha256 of the image bytes (memoised: used by the fingerprint and the cache keys)."""
        if i not in self._hashes:
            self._hashes[i] = hashlib.sha256(self.image_bytes(i)).hexdigest()
        return self._hashes[i]

    def repeats(self) -> list[int]:
        return [it.repeats for it in self.items]

    def fingerprint(self) -> str:
        """sha256 over (image bytes hash, caption, repeats) in sorted order: the dataset's identity."""
        entries = sorted(f"{self.item_hash(i)}|{it.repeats}|{it.caption}" for i, it in enumerate(self.items))
        return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def item_bytes(item: Item, hf=None, image_column: str = "image") -> bytes:
    """The encoded image of one item: its file, or its ``datasets`` cell (bytes, path or PIL image)."""
    if item.path is not None:
        return item.path.read_bytes()
    cell = hf[item.row][image_column]
    if isinstance(cell, dict) and cell.get("bytes") is not None:
        return cell["bytes"]
    if isinstance(cell, dict) and cell.get("path"):
        return Path(cell["path"]).read_bytes()
    buf = io.BytesIO()
    cell.save(buf, format="PNG")
    return buf.getvalue()


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
