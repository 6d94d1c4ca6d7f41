"""A deliberately messy captioned dataset: one file per problem class ``check-data`` knows.

Used by the tests (exact findings per file, training under ``data.on_error``), and handy
for trying ``loracraft check-data`` by hand::

    python -c "from loracraft.train.messy import write_messy_dataset; write_messy_dataset('messy')"
    loracraft check-data messy --resolution 32

Every file is built from a fixed seed, so the same call always writes the same bytes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from loracraft.infer.scenes import COLOURS, SHAPES, Scene, render

#: A caption well over CLIP's 77-token limit (with any CLIP vocabulary).
LONG_CAPTION = ", ".join(
    f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in ("red", "blue")
)


def _scene(i: int, px: int = 32, size: tuple[int, int] | None = None) -> Image.Image:
    colours = list(COLOURS)
    scene = Scene(SHAPES[i % 3], colours[i % 6], colours[(i + 1 + i // 6) % 6])
    img = render(scene, px)
    return img.resize(size, Image.BICUBIC) if size else img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _messy_images() -> dict[str, bytes]:
    """file name -> bytes, for every image-level problem class (and four clean images)."""
    files = {f"good_{i}.png": _encode(_scene(i), "PNG") for i in range(4)}
    png = _encode(_scene(10), "PNG")
    corrupt = bytearray(png)
    idat = corrupt.find(b"IDAT")
    corrupt[idat + 20] ^= 0xFF  # one flipped byte in the pixel data: CRC mismatch
    jpeg = _encode(_scene(11, px=128), "JPEG", quality=95)  # big enough that the cut misses the header
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° CW, as phones store portrait photos
    rgba = _scene(16).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((32, 32)))
    palette = _scene(15).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    sixteen = (np.asarray(_scene(14).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    floats = np.asarray(_scene(22).convert("L"), dtype=np.float32)
    files.update(
        {
            "empty.png": b"",
            "not_an_image.png": b"this is a text file with an image extension\n",
            "corrupt.png": bytes(corrupt),
            "truncated.jpg": jpeg[: len(jpeg) // 2],
            "no_iend.png": _encode(_scene(12), "PNG")[:-12],  # IEND chunk missing, pixels complete
            "cmyk.jpg": _encode(_scene(13).convert("CMYK"), "JPEG", quality=95),
            "sixteen.png": _encode(Image.fromarray(sixteen), "PNG"),
            "palette.png": _encode(palette, "PNG", transparency=0),
            "rgba.png": _encode(rgba, "PNG"),
            "float.tif": _encode(Image.fromarray(floats), "TIFF"),
            "small.png": _encode(_scene(17, px=16), "PNG"),
            "wide.png": _encode(_scene(18, size=(96, 32)), "PNG"),
            "rotated.jpg": _encode(_scene(19, size=(48, 32)), "JPEG", quality=95, exif=exif.tobytes()),
            "uncaptioned.png": _encode(_scene(20), "PNG"),
            "blank.png": _encode(_scene(21), "PNG"),
            "long.png": _encode(_scene(23), "PNG"),
            "latin1.png": _encode(_scene(24), "PNG"),
            "bom.png": _encode(_scene(25), "PNG"),
            "good_0_copy.png": files["good_0.png"],
            "Case.png": _encode(_scene(26), "PNG"),
            "case.png": _encode(_scene(27), "PNG"),
        }
    )
    return files


def write_messy_dataset(out_dir: str | Path, layout: str = "txt") -> Path:
    """Write the messy dataset and return its folder.

    layout ``txt``: images with ``.txt`` sidecars — every image, caption and file-name
    problem class (22 of them; see tests/train/test_checkdata.py for the expected findings).
    layout ``jsonl``: an imagefolder with metadata.jsonl — the metadata classes (a row whose
    file is missing, an image with no row, a null caption, an empty caption) plus a corrupt
    image, beside four clean images.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _messy_images()
    if layout == "jsonl":
        keep = [
            "good_0.png",
            "good_1.png",
            "good_2.png",
            "good_3.png",
            "corrupt.png",
            "blank.png",
            "uncaptioned.png",
        ]
        for name in keep + ["long.png"]:
            (out / name).write_bytes(images[name])
        (out / "long.png").rename(out / "norow.png")
        rows = [{"file_name": n, "text": f"caption of {n}"} for n in keep[:5]]
        rows += [
            {"file_name": "blank.png", "text": ""},
            {"file_name": "uncaptioned.png", "text": None},
            {"file_name": "gone.png", "text": "a file that was deleted"},
        ]
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return out
    if layout != "txt":
        raise ValueError(f"unknown layout {layout!r} (txt or jsonl)")
    for name, data in images.items():
        (out / name).write_bytes(data)
        stem = Path(name).stem
        if name == "uncaptioned.png":
            continue
        caption = {
            "blank": "   \n",
            "long": LONG_CAPTION,
            "latin1": None,
            "bom": "\ufeffa caption saved by Notepad",
        }.get(stem, f"a picture called {stem}")
        if caption is None:
            (out / f"{stem}.txt").write_bytes("a café on a red background".encode("cp1252"))
        else:
            (out / f"{stem}.txt").write_text(caption, encoding="utf-8")
    (out / "orphan.txt").write_text("a caption whose image is gone", encoding="utf-8")
    (out / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    (out / "sub").mkdir(exist_ok=True)
    (out / "sub" / "nested.png").write_bytes(_encode(_scene(28), "PNG"))
    return out
