"""Loss masks (``data.masks``): which pixels of each image train, as kohya's ``--masked_loss``.

A mask is a grey image the size of its training image: white trains, black does not, grey is
in between. It comes from the image's own alpha channel (``data.masks: alpha``) or from a
folder of mask files with the image's relative path and any image suffix (``masks/cat/001.png``
for ``cat/001.jpg``). A sample's mask is resized, cropped and mirrored exactly as its image
was (same size, same crop offset, same flip), so it draws nothing random of its own and
determinism and exact resume are untouched. The loss side is
:func:`loracraft.train.loss.mask_weights`.

Masks are never cached: a cached latent was encoded from the centred crop of the image (random
crops turn the latent cache off), so the mask read per sample is cropped the same way.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from loracraft.infer.errors import ConfigError, DataError
from loracraft.train.data.findings import Finding, one_line, printable
from loracraft.train.data.images import item_bytes, to_rgb

if TYPE_CHECKING:
    import torch

    from loracraft.train.data.images import CaptionedImages
    from loracraft.train.data.sources import Item, Source

ALPHA = "alpha"
#: Mask file suffixes, in the order they are looked for.
MASK_EXTS = (".png", ".webp", ".jpg", ".jpeg", ".PNG", ".WEBP", ".JPG", ".JPEG")
#: Findings that describe what ``data.masks: alpha`` relies on, not a problem.
ALPHA_WARNINGS = ("alpha-channel", "palette-transparency")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


@dataclass(frozen=True)
class Masks:
    """Where the masks of one dataset come from: ``source`` is ``"alpha"`` or a folder."""

    source: str

    @property
    def alpha(self) -> bool:
        return self.source == ALPHA

    def check_folder(self, source: Source) -> None:
        """Refuse a mask folder training cannot use at all (one line: what, where, fix)."""
        if self.alpha:
            return
        folder = Path(self.source).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"mask folder not found, data.masks={printable(self.source)}, point it at a folder with one mask "
                "per image (same relative path) or use data.masks=alpha"
            )
        if source.hf is not None:
            raise ConfigError(
                f"a mask folder needs a dataset of image files, but {printable(source.root)} is a datasets table, "
                "use data.masks=alpha (the images' own transparency)"
            )
        root = Path(source.root).expanduser().resolve()
        if folder.resolve() == root or root in folder.resolve().parents:
            raise ConfigError(
                f"the mask folder is inside the dataset folder, data.masks={printable(self.source)}, move the "
                "masks to a folder beside it (inside, they would be read as training images)"
            )

    def relative(self, item: Item) -> PurePosixPath | None:
        """The item's path relative to the dataset folder, or None when it lies outside it."""
        key = PurePosixPath(item.key)
        if key.is_absolute() or ".." in key.parts:
            return None
        return key

    def expected(self, item: Item) -> Path:
        """The first mask file looked for (named in a missing-mask finding)."""
        key = self.relative(item) or PurePosixPath(item.key).name
        return Path(self.source).expanduser() / PurePosixPath(key).with_suffix(MASK_EXTS[0])

    def find(self, item: Item) -> Path | None:
        key = self.relative(item)
        if key is None:
            return None
        base = Path(self.source).expanduser() / key
        return next((p for ext in MASK_EXTS if (p := base.with_suffix(ext)).is_file()), None)

    # ------------------------------------------------------------------ check
    def findings(self, source: Source, unread: set[str]) -> list[Finding]:
        """One error finding per image whose mask is missing, unreadable, of another size, or
        (``alpha``) that has no alpha channel; ``unread`` are keys the reader already reported."""
        found = []
        for item in source.items:
            if item.key in unread or item.path is not None and not item.path.is_file():
                continue
            try:
                header = _header(item_bytes(item, source.hf, source.image_column))
            except Exception:  # a broken image: the image check reports it
                continue
            if (problem := self._problem(item, *header)) is not None:
                found.append(Finding(item.key, *problem))
        return found

    def _problem(
        self, item: Item, image_size: tuple[int, int], image: Image.Image
    ) -> tuple[str, str, str] | None:
        if self.alpha:
            if has_alpha(image):
                return None
            return (
                "no-alpha",
                f"data.masks=alpha but the image has no alpha channel (mode {image.mode})",
                "save it with a transparent background (PNG/WebP with alpha), or set data.masks to a mask folder",
            )
        path = self.find(item)
        if path is None:
            expected = self.expected(item)
            why = "" if self.relative(item) else " (the image lies outside the dataset folder)"
            return (
                "missing-mask",
                f"no mask for this image{why} (expected {printable(expected)})",
                "add the mask (white = train, black = ignore) or remove the image",
            )
        try:
            mask_size, _ = _header(path.read_bytes())
        except Exception as e:
            return (
                "bad-mask",
                f"cannot read its mask {printable(path)} ({one_line(e)})",
                "re-save the mask as PNG",
            )
        if mask_size != image_size:
            return (
                "bad-mask",
                f"its mask {printable(path)} is {mask_size[0]}x{mask_size[1]}, the image "
                f"{image_size[0]}x{image_size[1]}",
                "save the mask at the image's size",
            )
        return None

    # ------------------------------------------------------------------ training
    def image(self, images: CaptionedImages, i: int) -> Image.Image:
        """Item ``i``'s mask as an 8-bit grey image of the image's size as trained (EXIF applied)."""
        item = images.items[i]
        if self.alpha:
            with Image.open(_source(images, i)) as im:
                im = ImageOps.exif_transpose(im)
                if not has_alpha(im):
                    raise DataError(
                        f"data.masks=alpha but the image has no alpha channel, {images._where(i)}, "
                        "save it with a transparent background or set data.masks to a mask folder"
                    )
                return im.convert("RGBA").getchannel("A")
        path = self.find(item)
        if path is None:
            raise DataError(
                f"no mask for this image, {images._where(i)}, add {printable(self.expected(item))}"
            )
        with Image.open(path) as im:
            mask = to_rgb(ImageOps.exif_transpose(im)).convert("L")
        if mask.size != images.size(i):
            raise DataError(
                f"mask size {mask.size} differs from its image's {images.size(i)}, {printable(path)}, "
                "save the mask at the image's size"
            )
        return mask

    def tensor(
        self,
        images: CaptionedImages,
        i: int,
        target: tuple[int, int],
        crop: tuple[int, int] | None,
        flip: bool,
    ) -> torch.Tensor:
        """``[1, h, w]`` float mask in [0, 1], cropped at ``crop`` (None: centred, as the latent cache
        encodes) to ``target`` and mirrored with ``flip``, like the sample's image."""
        import torch

        from loracraft.train.data.stream import resize_and_crop

        mask, _ = resize_and_crop(self.image(images, i), target, True, None, at=crop)
        if flip:
            mask = ImageOps.mirror(mask)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0)

    def fingerprint(self, images: CaptionedImages, dataset_fingerprint: str) -> str:
        """The dataset fingerprint extended by every mask file (alpha masks are in the image bytes)."""
        if self.alpha:
            return hashlib.sha256(f"{dataset_fingerprint}|masks:alpha".encode()).hexdigest()
        h = hashlib.sha256(f"{dataset_fingerprint}|masks:".encode())
        for key, path in sorted((it.key, self.find(it)) for it in images.items):
            h.update(f"{key}:{hashlib.sha256(path.read_bytes()).hexdigest() if path else '-'}\n".encode())
        return h.hexdigest()


def _source(images: CaptionedImages, i: int):
    item = images.items[i]
    return item.path if item.path is not None else io.BytesIO(images.image_bytes(i))


def _header(data: bytes) -> tuple[tuple[int, int], Image.Image]:
    """(size as trained, i.e. after EXIF rotation; the opened image) from the header only."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    return ((h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)), im


def attach_masks(images: CaptionedImages, source: str | None) -> CaptionedImages:
    """``images`` with their mask reader set (``data.masks``); None leaves them unmasked."""
    images.masks = Masks(source) if source else None
    return images


__all__ = ["ALPHA", "ALPHA_WARNINGS", "MASK_EXTS", "Masks", "attach_masks", "has_alpha"]
