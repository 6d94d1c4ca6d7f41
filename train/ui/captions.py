"""Caption editing for the Dataset tab: where an item's caption lives, and how it is rewritten.

Writes are confined: :class:`OpenedDatasets` remembers the folders the Dataset tab checked
since the UI started, and an edit must name one of them and an item that check listed, whose
image exists inside it. A request from the browser (or the API) cannot make the UI write a
``<name>.txt`` anywhere else, nor show thumbnails of a folder nobody opened.

An edit keeps the file it changes: the old version is copied to ``ROOT/.loracraft-backup/``
first, then the new text is written into the same file (same inode), so its mode, owner and
hard links stay. Only a caption file that does not exist yet is created by temp file + rename.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

from loracraft.infer.errors import DataError, UsageError
from loracraft.infer.io import fsync_dir
from loracraft.train.data.sources import CAPTION_EXTS, IMAGE_EXTS, METADATA_FILES

BACKUP_DIR = ".loracraft-backup"


def caption_source(root: str | Path, key: str) -> Path:
    """The file that holds the caption of dataset item ``key`` (a path relative to ``root``)."""
    root = Path(root).expanduser()
    for m in METADATA_FILES:
        if (root / m).is_file():
            return root / m
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file() or not root.is_dir():
        raise UsageError(
            f"captions of saved or hub datasets cannot be edited here, {root}, edit the dataset with the "
            "`datasets` library or export it as an image folder"
        )
    image = (root / key).resolve()
    if not image.is_relative_to(root.resolve()):
        raise UsageError(f"file {key!r} is outside the dataset, {root}, pick an image of this dataset")
    sidecars = [image.with_suffix(ext) for ext in CAPTION_EXTS]
    return next((p for p in sidecars if p.is_file()), sidecars[0])


def _backup(root: Path, source: Path) -> Path | None:
    """Copy ``source`` into ``ROOT/.loracraft-backup/<time>/`` (hidden: training and check-data skip it)."""
    if not source.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    dest = root / BACKUP_DIR / stamp / source.relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)
    return dest


def write_caption_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping an existing file's inode (mode, owner, hard links).

    Rewriting in place is not atomic, which is why :func:`save_caption` backs the old version
    up first: a crash mid-write leaves the previous caption in the backup. A rename would be
    atomic but would give the file a new inode: hard-linked copies would keep the old caption
    and the mode would become the temp file's.
    """
    data = text.encode("utf-8")
    if path.is_file():
        with open(path, "r+b") as fh:
            fh.write(data)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0o666 through os.open: the new file gets the mode the user's umask gives, like any other
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save_caption(
    root: str | Path, key: str, caption: str, caption_column: str = "text"
) -> tuple[Path, Path | None]:
    """Write one item's caption back where training reads it; the old file is backed up first.

    ``.txt``/``.caption`` sidecars are rewritten; in ``metadata.jsonl`` only the item's row
    changes (other lines stay byte for byte); ``metadata.csv`` is rewritten with the same
    columns. Returns ``(file written, backup or None)``.
    """
    root = Path(root).expanduser()
    caption = caption.strip()
    if "\n" in caption:
        raise UsageError("a caption must be one line, caption editor, remove the line breaks")
    source = caption_source(root, key)
    if not source.resolve().is_relative_to(root.resolve()):
        raise UsageError(
            f"{source.name} links to a file outside the dataset, {source}, replace the link with a file"
        )
    if source.name == "metadata.jsonl":
        new = _jsonl_with_caption(source, key, caption, caption_column)
    elif source.name == "metadata.csv":
        new = _csv_with_caption(source, key, caption, caption_column)
    else:
        new = caption + "\n"
    backup = _backup(root, source)
    write_caption_file(source, new)
    return source, backup


def _same_file(file_name: str, key: str) -> bool:
    return Path(str(file_name)).as_posix() == Path(key).as_posix()


def _jsonl_with_caption(meta: Path, key: str, caption: str, column: str) -> str:
    lines, hit = meta.read_text(encoding="utf-8-sig").splitlines(keepends=True), False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"line {i + 1} of {meta.name} is not JSON, {meta}, fix it before editing captions"
            ) from e
        if isinstance(row, dict) and _same_file(row.get("file_name", ""), key):
            row[column] = caption
            lines[i] = json.dumps(row, ensure_ascii=False) + "\n"
            hit = True
    if not hit:
        raise UsageError(f"{key} has no row in {meta.name}, {meta}, add a row for it first")
    return "".join(lines)


def _csv_with_caption(meta: Path, key: str, caption: str, column: str) -> str:
    reader = csv.DictReader(io.StringIO(meta.read_text(encoding="utf-8-sig")))
    fields = list(reader.fieldnames or [])
    rows, hit = list(reader), False
    if column not in fields:
        fields.append(column)
    for row in rows:
        if _same_file(row.get("file_name", ""), key):
            row[column] = caption
            hit = True
    if not hit:
        raise UsageError(f"{key} has no row in {meta.name}, {meta}, add a row for it first")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def thumbnail(path: Path, size: int = 160):
    """A display copy of a dataset image: small ones scaled up with hard pixels, big ones down."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        w, h = im.size
        scale = size / max(w, h)
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def thumbnail_placeholder(size: int = 160):
    from PIL import Image

    return Image.new("RGB", (size, size), (210, 210, 210))


def _folder(root: str | Path) -> Path:
    return Path(str(root).strip()).expanduser().resolve()


class OpenedDatasets:
    """The dataset folders checked in this UI since it started, with the items each check listed."""

    def __init__(self) -> None:
        self._items: dict[Path, frozenset[str]] = {}
        self._lock = threading.Lock()

    def open(self, root: str | Path, keys) -> None:
        """Record a checked folder (a hub or saved dataset is no folder: nothing to record)."""
        folder = _folder(root)
        if folder.is_dir():
            with self._lock:
                self._items[folder] = frozenset(keys)

    def image(self, root: str | Path, key: str) -> Path:
        """The image of item ``key`` in the opened folder ``root``; UsageError for anything else."""
        folder = _folder(root)
        with self._lock:
            keys = self._items.get(folder)
        if keys is None:
            raise UsageError(
                f"folder {root} was not opened in this UI, Dataset folder, press Check dataset on it first"
            )
        parts = str(key).split("/")
        image = folder / str(key)
        if (
            key not in keys
            or "\\" in key
            or any(p in ("", ".", "..") for p in parts)
            or image.suffix.lower() not in IMAGE_EXTS
            or not image.is_file()
            or not image.resolve().is_relative_to(folder)
        ):
            raise UsageError(
                f"{key!r} is not an image of the checked dataset, {folder}, click an image in the grid "
                "(or press Check dataset again if the folder changed)"
            )
        return image

    def thumbnail(self, root: str | Path, key: str):
        return thumbnail(self.image(root, key))

    def save_caption(self, root: str | Path, key: str, caption: str) -> tuple[Path, Path | None]:
        """:func:`save_caption` for an item of an opened folder only."""
        self.image(root, key)
        return save_caption(Path(str(root).strip()).expanduser(), key, caption)
