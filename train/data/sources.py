"""Captioned image datasets in every supported layout: one reader per layout, items AND findings.

Layouts (first match wins, in this order):

1. ``metadata.jsonl`` / ``metadata.csv`` at the top of a folder (imagefolder): one row per image,
   ``file_name`` relative to the folder plus the caption column. Rows are read in file order.
   Metadata wins over ``.txt`` sidecars when both exist: it is the more explicit of the two.
2. a folder saved with ``Dataset.save_to_disk`` -> ``datasets.load_from_disk`` (its ``train`` split).
3. kohya ``N_name`` sub-folders (N = repeats), each image with a ``.txt`` (or ``.caption``) sidecar.
4. a folder of images with ``.txt`` (or ``.caption``) sidecars.
5. anything that is not a local path -> a hub dataset id (``load_dataset(id, split="train")``).

:func:`read_source` walks the layout once and returns the would-be training items *and*
everything wrong with the layout (an image without a caption, an unreadable metadata row, a
link out of the folder, ...). ``check-data`` lints those items; training trains on the same
list (minus the items with errors when ``data.on_error=skip``), so the two never disagree.
Nothing here imports torch: checking a folder does not need it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracraft.infer.errors import DataError, DataNotFound
from loracraft.train.data.findings import (  # noqa: F401 (re-exported: the readers' vocabulary)
    CAPTION_PROBLEMS,
    OUTSIDE_PROBLEMS,
    PROBLEMS,
    Finding,
    one_line,
    printable,
)
from loracraft.train.data.images import CaptionedImages, item_bytes, to_rgb  # noqa: F401 (re-exported)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Sidecar caption extensions, in the order they are looked for (kohya's default is ``.caption``).
CAPTION_EXTS = (".txt", ".caption")
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
#: Image-like files training cannot read: reported so a folder of phone photos (HEIC) is
#: not silently trained on nothing.
UNSUPPORTED_IMAGE_EXTS = {
    ".heic",
    ".heif",
    ".avif",
    ".jxl",
    ".svg",
    ".psd",
    ".raw",
    ".cr2",
    ".nef",
    ".dng",
    ".arw",
}


@dataclass(frozen=True)
class Item:
    """One would-be training example: where its image comes from, its caption and repeats.

    ``caption`` is None when the image has none (or it cannot be read); such an item carries
    an error finding and never trains unless a caption rule (DreamBooth) supplies one.
    """

    caption: str | None
    path: Path | None = None  # image file, or None when the bytes come from a datasets row
    row: int | None = None  # row index into a ``datasets`` dataset
    repeats: int = 1
    key: str = ""  # path relative to the root, or "row N": how findings name this item
    concept: int = 0  # which of the run's datasets it belongs to (data.concepts, :mod:`.concepts`)


@dataclass
class Source:
    """What :func:`read_source` found: the items in training order and the layout's findings."""

    root: str
    layout: str
    items: list[Item]
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # every non-hidden file below a folder root
    hf: Any = None  # the datasets.Dataset behind row items (images not decoded)
    image_column: str = "image"


# ----------------------------------------------------------------------------- shared rules
def with_affixes(caption: str, prefix: str = "", suffix: str = "") -> str:
    """kohya's ``caption_prefix`` / ``caption_suffix``: joined to the caption with a space."""
    return " ".join(part for part in (prefix, caption, suffix) if part)


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def files_under(root: Path) -> list[Path]:
    """Every non-hidden file below ``root`` (hidden files and folders are not dataset content)."""
    out = []
    for p in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        out.append(p)
    return out


def _case_twin(p: Path) -> Path | None:
    if not p.parent.is_dir():
        return None
    twins = [q for q in p.parent.iterdir() if q.name.lower() == p.name.lower() and q.name != p.name]
    return twins[0] if twins else None


def _link(p: Path, noun: str) -> str:
    return f"{noun} is a link" if p.is_symlink() else f"{noun} is in a linked folder"


def _outside(p: Path, real_root: Path) -> Path | None:
    """Where ``p`` really is, when that is outside the dataset folder (a link out, ``..``), else None."""
    real = p.resolve()
    return None if real.is_relative_to(real_root) else real


def caption_problems(caption: str | None, missing_fix: str) -> list[tuple[str, str, str]]:
    if caption is None:
        return [("missing-caption", "image has no caption", missing_fix)]
    if not caption.strip():
        return [
            (
                "empty-caption",
                "caption is empty: the image trains unconditionally (like caption dropout)",
                "write a caption, or delete the image if it is not meant to be there",
            )
        ]
    return []


def _not_text(value: object) -> str | None:
    """What kind of non-text a caption value is (None when it is text or missing)."""
    if value is None or isinstance(value, str):
        return None
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def read_caption_file(txt: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    """A sidecar caption as training reads it (UTF-8, BOM dropped, stripped) and its problems."""
    raw = txt.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        guess = raw.decode("cp1252", errors="replace")
        return None, [
            (
                "caption-not-utf8",
                f"caption file {txt.name} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}; "
                f"as Windows-1252 it reads {one_line(guess, 40)!r})",
                f"re-save {txt.name} as UTF-8",
            )
        ]
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's universal newlines do
    found = []
    if text.startswith("\ufeff"):
        found.append(
            (
                "caption-bom",
                f"caption file {txt.name} starts with a UTF-8 byte-order mark (training drops it; "
                "other tools may read it as part of the caption)",
                f"re-save {txt.name} as UTF-8 without BOM for other tools",
            )
        )
        text = text[1:]
    return text.strip(), found


def _outside_finding(key: str, what: str, target: Path, problem: str = "outside-link") -> Finding:
    """``what`` is "<the image|caption file X> is a link" or "<metadata line> names <a path>"."""
    return Finding(
        key,
        problem,
        f"{what} to {target}, outside the dataset folder",
        "copy the file into the dataset folder, or set data.allow_outside_links=true "
        "(check-data: --allow-outside-links) if you trust it",
    )


# ----------------------------------------------------------------------------- readers
def _read_sidecars(root: Path, files: list[Path], allow_outside: bool) -> Source:
    real_root = root.resolve()
    repeat_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and REPEAT_DIR.match(d.name)]
    folders = [(d, int(REPEAT_DIR.match(d.name).group(1))) for d in repeat_dirs] or [(root, 1)]
    src = Source(str(root), "kohya-repeats" if repeat_dirs else "txt-sidecars", [], files=files)
    used, outside = set(), 0
    for folder, repeats in folders:
        for img in sorted(p for p in folder.iterdir() if p.is_file() and is_image(p)):
            key = rel(img, root)
            sidecars = [img.with_suffix(ext) for ext in CAPTION_EXTS]
            used.update([img, *sidecars])
            txt = next((s for s in sidecars if s.is_file()), None)
            caption, problems = None, []
            if (target := _outside(img, real_root)) is not None:
                outside += 1
                if not allow_outside:
                    src.findings.append(_outside_finding(key, _link(img, "image"), target))
            if txt is not None and (target := _outside(txt, real_root)) is not None:
                outside += 1
                if not allow_outside:  # not even read: its text could end up in logs and findings
                    src.findings.append(_outside_finding(key, _link(txt, f"caption file {txt.name}"), target))
                    src.items.append(Item(None, img, repeats=repeats, key=key))
                    continue
            if txt is not None:
                caption, problems = read_caption_file(txt)  # None only when not UTF-8
                if caption is not None:
                    problems += caption_problems(caption, "")
            else:
                twin = _case_twin(sidecars[0])
                hint = f" (found {twin.name}: rename it to {sidecars[0].name})" if twin else ""
                problems = caption_problems(None, f"add {sidecars[0].name} beside it{hint}")
            src.findings += [Finding(key, *p) for p in problems]
            src.items.append(Item(caption, img, repeats=repeats, key=key))
    _outside_note(src, outside if allow_outside else 0)
    where = "outside the N_name repeat folders" if repeat_dirs else f"not directly in {root.name}/"
    ignored = (
        "ignored-file",
        f"image {where}: training does not read it",
        "move it beside the other images, or delete it",
    )
    src.findings += _unread_files(root, files, used, ignored, caption_dirs={f for f, _ in folders})
    return src


def _outside_note(src: Source, read: int) -> None:
    if read:
        src.notes.append(f"{read} file(s) outside the dataset folder are read (data.allow_outside_links)")


def _unread_files(
    root: Path,
    files: list[Path],
    used: set[Path],
    image: tuple[str, str, str],
    caption_dirs: set[Path] = frozenset(),
) -> list[Finding]:
    """Findings for the files below ``root`` that training does not read: images (``image`` =
    problem, what, fix), unsupported image formats, and captions without an image."""
    found = []
    for p in files:
        if p in used or p.parent == root and p.name in METADATA_FILES:
            continue
        if is_image(p):
            found.append(Finding(rel(p, root), *image))
        elif p.suffix.lower() in UNSUPPORTED_IMAGE_EXTS:
            found.append(_unsupported(p, root))
        elif p.suffix.lower() in CAPTION_EXTS and p.parent in caption_dirs:
            found.append(
                Finding(
                    rel(p, root),
                    "orphan-caption",
                    "caption file with no image of the same name",
                    "add the image, fix the name, or delete the caption",
                )
            )
    return found


def _unsupported(p: Path, root: Path) -> Finding:
    return Finding(
        rel(p, root),
        "ignored-file",
        f"{p.suffix} images are not supported: training does not read it",
        "convert it to PNG or JPEG",
    )


def _bad_row(meta: Path, line: int, what: str, fix: str) -> Finding:
    return Finding(meta.name, "bad-metadata", f"line {line} of {meta.name} {what}", fix)


def _csv_rows(meta: Path, text: str) -> tuple[list[dict], list[Finding]]:
    def problem(what: str, fix: str) -> list[Finding]:
        return [Finding(meta.name, "bad-metadata", what, fix)]

    try:
        reader = csv.DictReader(io.StringIO(text))
        if "file_name" not in (reader.fieldnames or []):
            found = one_line(", ".join(reader.fieldnames or []) or "none")
            return [], problem(
                f"the header of {meta.name} has no file_name column (columns: {found})",
                "make the first line a header like file_name,text",
            )
        rows = [dict(r, _line=i + 2) for i, r in enumerate(reader)]
    except csv.Error as e:
        return [], problem(
            f"{meta.name} is not valid CSV ({e})", "fix the file (a header line, then one row per image)"
        )
    bad = [  # more cells than header names
        _bad_row(
            meta,
            r["_line"],
            "has more values than the header has columns",
            "quote values that contain commas",
        )
        for r in rows
        if None in r
    ]
    return [r for r in rows if None not in r], bad


def read_metadata(meta: Path) -> tuple[list[dict], list[Finding]]:
    """The usable rows of a metadata.jsonl/csv (each with its ``_line``) and one finding per bad line:
    every problem of the file at once, not just the first."""
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return [], [
            Finding(meta.name, "bad-metadata", f"{meta.name} is not UTF-8 text", "re-save it as UTF-8")
        ]
    rows: list[dict] = []
    bad: list[Finding] = []
    if meta.suffix == ".csv":
        rows, bad = _csv_rows(meta, text)
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(
                    _bad_row(meta, i, f"is not JSON ({e.msg})", "fix that line (one JSON object per line)")
                )
                continue
            if not isinstance(row, dict):
                bad.append(
                    _bad_row(
                        meta,
                        i,
                        "is not a JSON object",
                        'write one {"file_name": ..., "text": ...} object per line',
                    )
                )
                continue
            rows.append(dict(row, _line=i))
    good = []
    for r in rows:
        name = r.get("file_name")
        if not name:
            bad.append(
                _bad_row(
                    meta, r["_line"], "has no file_name", "give every row a file_name relative to the folder"
                )
            )
        elif not isinstance(name, str):
            bad.append(
                _bad_row(
                    meta,
                    r["_line"],
                    f"has a file_name that is not text ({one_line(name, 30)})",
                    'write it as a quoted path, e.g. "0001.png"',
                )
            )
        else:
            good.append(r)
    return good, bad


def _read_imagefolder(root: Path, files: list[Path], caption_column: str, allow_outside: bool) -> Source:
    meta = next(root / m for m in METADATA_FILES if (root / m).is_file())
    src = Source(str(root), "imagefolder", [], files=files)
    captions = sum(1 for p in files if p.suffix.lower() in CAPTION_EXTS)
    if captions:
        src.notes.append(f"{captions} .txt/.caption files are ignored: {meta.name} wins")
    rows, src.findings = read_metadata(meta)
    if rows and not any(caption_column in r for r in rows):
        cols = sorted({k for r in rows for k in r if k not in ("_line", "file_name")})
        src.findings.append(
            Finding(
                meta.name,
                "missing-column",
                f"dataset has no column '{caption_column}' (columns in {meta.name}: {', '.join(cols) or 'none'})",
                "set data.caption_column (check-data: --caption-column) to one of them",
            )
        )
        return src
    real_root, referenced, outside = root.resolve(), set(), 0
    for r in rows:
        name, line = r["file_name"], r["_line"]
        path, key = root / name, Path(name).as_posix()
        referenced.add(path)
        value = r.get(caption_column)
        kind = _not_text(value)
        caption = value.strip() if isinstance(value, str) else None
        src.items.append(Item(caption, path, key=key))
        if (target := _outside(path, real_root)) is not None:
            outside += 1
            if not allow_outside:
                how = "an absolute path" if Path(name).is_absolute() else "a relative path"
                src.findings.append(
                    _outside_finding(key, "image is a link", target)
                    if path.is_symlink()
                    else _outside_finding(key, f"{meta.name} line {line} names {how}", target, "outside-path")
                )
                continue
        if not path.is_file():
            twin = _case_twin(path)
            hint = f" ({twin.name} exists: fix the case)" if twin else ""
            src.findings.append(
                Finding(
                    key,
                    "missing-file",
                    f"{meta.name} line {line} names a file that does not exist{hint}",
                    "fix its file_name, or remove the row",
                )
            )
            continue
        if kind is not None:
            src.findings.append(
                Finding(
                    key,
                    "caption-not-text",
                    f"its '{caption_column}' in {meta.name} line {line} is {kind} ({one_line(json.dumps(value), 30)}), "
                    "not text",
                    'write it as a quoted string, e.g. "12345"',
                )
            )
            continue
        missing_fix = f"add a '{caption_column}' value to its row (line {line} of {meta.name})"
        src.findings += [Finding(key, *p) for p in caption_problems(caption, missing_fix)]
    _outside_note(src, outside if allow_outside else 0)
    no_row = (
        "no-metadata-row",
        f"image has no row in {meta.name}: training does not read it",
        f"add a row for it to {meta.name}, or delete it",
    )
    src.findings += _unread_files(root, files, referenced, no_row)
    return src


def _read_hf(ds, root: str, image_column: str, caption_column: str, layout: str) -> Source:
    from datasets import Image as HFImage

    cols = list(ds.column_names)
    src = Source(root, layout, [], image_column=image_column)
    for col, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if col not in cols:
            src.findings.append(
                Finding(
                    ".",
                    "missing-column",
                    f"dataset has no column '{col}' (columns: {', '.join(cols)})",
                    f"set {key} (check-data: --{key.split('.')[1].replace('_', '-')}) to one of them",
                )
            )
    if src.findings:
        return src
    if isinstance(ds.features[image_column], HFImage):
        ds = ds.cast_column(image_column, HFImage(decode=False))
    src.hf = ds
    for i, value in enumerate(ds[caption_column]):
        key, kind = f"row {i}", _not_text(value)
        caption = value.strip() if isinstance(value, str) else None
        src.items.append(Item(caption, row=i, key=key))
        if kind is not None:
            src.findings.append(
                Finding(
                    key,
                    "caption-not-text",
                    f"its '{caption_column}' is {kind} ({one_line(value, 30)}), not text",
                    f"store the '{caption_column}' column as strings",
                )
            )
        else:
            src.findings += [
                Finding(key, *p) for p in caption_problems(caption, f"fill its '{caption_column}' value")
            ]
    return src


def _load_hub(name: str, setting: str = "data.path"):
    from datasets import load_dataset

    try:
        return load_dataset(name, split="train")
    except Exception as e:
        raise DataError(
            f"dataset '{name}' is neither a local folder nor a reachable hub dataset, {setting}, "
            f"check the path or your network ({type(e).__name__})"
        ) from e


def is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_info.json").is_file() or (root / "state.json").is_file()


def read_source(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    allow_outside_links: bool = False,
    setting: str = "data.path",
) -> Source:
    """Read a dataset in any supported layout: its items in training order and its layout findings.

    Raises DataError (one line) only when the path cannot be opened as a dataset at all
    (missing folder, a file, an unreachable hub id, a saved dataset without a train split);
    every other problem is a finding. ``setting`` is the config key the path came from, as
    those errors name it (``data.concepts[1].path``).
    """
    text = str(path)
    root = Path(text).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset path is a file, not a folder, {root}, point {setting} at the folder")
    if not root.exists():
        if text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise DataNotFound(f"dataset folder not found, {root}, check {setting}")
        return _read_hf(_load_hub(text, setting), text, image_column, caption_column, "hub")
    if any((root / m).is_file() for m in METADATA_FILES):
        return _read_imagefolder(root, files_under(root), caption_column, allow_outside_links)
    if is_saved_dataset(root):
        from datasets import load_from_disk

        ds = load_from_disk(str(root))
        if hasattr(ds, "keys"):  # a DatasetDict: train on its train split
            if "train" not in ds:
                raise DataError(
                    f"saved dataset has no 'train' split, {root}, save the split you want to train on"
                )
            ds = ds["train"]
        return _read_hf(ds, text, image_column, caption_column, "saved-dataset")
    return _read_sidecars(root, files_under(root), allow_outside_links)


def training_view(src: Source, items: list[Item] | None = None) -> CaptionedImages:
    """The items (default: all of ``src``'s) as training reads them."""
    items = src.items if items is None else items
    return CaptionedImages(items, src.layout, src.root, hf_dataset=src.hf, image_column=src.image_column)


def load_captioned_images(
    path: str, image_column: str = "image", caption_column: str = "text", allow_outside_links: bool = False
) -> CaptionedImages:
    """Open a dataset for reading captions and images without the image checks of check-data;
    raise DataError (every layout error, one line each) when it cannot be trained on as is."""
    src = read_source(path, image_column, caption_column, allow_outside_links)
    errors = [f for f in src.findings if f.severity == "error"]
    if errors:
        lines = [f"{f.what}, {Path(src.root) / f.shown_file}, {f.fix}" for f in errors]
        if len(errors) > 1:
            lines.append(f"{len(errors)} dataset error(s), {src.root}, run `loracraft check-data {src.root}`")
        raise DataError(lines[0], lines)
    if not src.items:
        raise DataError(
            f"dataset has no images, {src.root}, add images ({', '.join(sorted(IMAGE_EXTS))}) with captions"
        )
    return training_view(src)
