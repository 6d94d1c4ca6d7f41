"""Dataset lint: every problem in a captioned image dataset, per file, before any training.

``check_dataset(path)`` scans a dataset in every layout :mod:`loracraft.train.data` reads
(imagefolder + metadata.jsonl/csv, saved ``datasets`` folders, kohya ``N_name`` repeat
folders, ``.txt`` sidecars, hub ids) and returns a :class:`CheckReport`: one
:class:`Finding` (file, problem class, severity, what, how to fix) per problem. It is fast
because it only hashes bytes and reads headers: PNGs are checked with ``Image.verify``
(chunk CRCs, no decompression), JPEGs are decoded at 1/8 scale (``Image.draft``), and only
other formats are fully decoded. It never writes into the dataset folder.

Severities: ``error`` means training would fail or silently learn from a broken example;
``warning`` means the file trains, converted as the message says, but may not be what you
want. ``loracraft check-data`` exits 0 when there are no errors, 1 otherwise.

The trainer runs the same checks before it loads any weights (:func:`checked_images`):
with ``data.on_error=fail`` (the default) every error stops the run up front, all listed
together; with ``data.on_error=skip`` every image with a per-file error is left out, with
one warning line and a count. Dataset-level errors (no images, unreadable metadata,
nothing left after skipping) always stop the run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from loracraft.infer.errors import DataError, ModelError, UsageError

if TYPE_CHECKING:
    from loracraft.train.data import CaptionedImages, Item


def _data():
    """``loracraft.train.data``, imported on first use: it pulls in torch, which checking a
    folder never needs, and every ``loracraft`` command imports this module to register it."""
    from loracraft.train import data

    return data


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
#: Long side / short side above which the square training crop keeps less than half the image.
MAX_ASPECT = 2.0
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
ORIENTATIONS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped vertically",
    5: "mirrored and rotated 90° CCW",
    6: "rotated 90° CW",
    7: "mirrored and rotated 90° CW",
    8: "rotated 90° CCW",
}

#: Every problem class: id -> (severity, one-line description). The order is the report order.
PROBLEMS: dict[str, tuple[str, str]] = {
    "no-images": ("error", "the dataset holds no trainable images"),
    "bad-metadata": ("error", "metadata.jsonl/csv cannot be read"),
    "missing-column": ("error", "the caption column does not exist"),
    "empty-file": ("error", "zero-byte image file"),
    "unreadable-image": ("error", "not an image PIL can open"),
    "corrupt-image": ("error", "image data is damaged"),
    "truncated-image": ("error", "image file is cut short"),
    "missing-file": ("error", "metadata row names a file that does not exist"),
    "missing-caption": ("error", "image has no caption"),
    "caption-not-utf8": ("error", "caption file is not UTF-8"),
    "incomplete-file": ("warning", "file ends early but every pixel decodes"),
    "cmyk-image": ("warning", "CMYK image, converted to RGB"),
    "16-bit-image": ("warning", "16/32-bit image, scaled to 8 bits"),
    "palette-transparency": ("warning", "palette image with transparency, composited on white"),
    "alpha-channel": ("warning", "image with alpha, composited on white"),
    "unusual-mode": ("warning", "uncommon image mode, converted to RGB"),
    "too-small": ("warning", "smaller than the training resolution, upscaled"),
    "extreme-aspect": ("warning", "extreme aspect ratio, most of it cropped away"),
    "exif-orientation": ("warning", "EXIF orientation tag, applied when training"),
    "empty-caption": ("warning", "caption is empty (trains unconditionally)"),
    "caption-too-long": ("warning", "caption exceeds the text encoder's token limit"),
    "caption-bom": ("warning", "caption starts with a byte-order mark"),
    "duplicate-image": ("warning", "same bytes as another image"),
    "case-collision": ("warning", "file name differs from another only in case"),
    "no-metadata-row": ("warning", "image has no metadata row, not trained on"),
    "orphan-caption": ("warning", "caption file with no image"),
    "ignored-file": ("warning", "image training does not read"),
}
_ORDER = {name: i for i, name in enumerate(PROBLEMS)}


@dataclass(frozen=True)
class Finding:
    """One problem with one file. ``file`` is relative to the dataset root (``row N`` for
    datasets without files; the metadata file's name for dataset-level problems)."""

    file: str
    problem: str
    what: str
    fix: str

    @property
    def severity(self) -> str:
        return PROBLEMS[self.problem][0]

    @property
    def message(self) -> str:
        return f"{self.what}; {self.fix}"

    def line(self) -> str:
        return f"{self.severity:<7}  {self.file}: {self.message} [{self.problem}]"

    def as_dict(self) -> dict:
        return {**asdict(self), "severity": self.severity, "message": self.message}


@dataclass
class _Entry:
    """One would-be training example, as the scan found it."""

    key: str  # relative path, or "row N"
    path: Path | None = None
    row: int | None = None
    caption: str | None = None  # None = missing or unreadable
    repeats: int = 1


@dataclass
class CheckReport:
    """Everything ``check_dataset`` found. ``trainable`` is False when any error exists."""

    root: str
    layout: str
    resolution: int | None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    #: set by :func:`with_captions`: where training's captions come from instead of the dataset
    caption_fn: Callable[[str | None], str] | None = None

    @property
    def images(self) -> int:
        return len(self.entries)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def trainable(self) -> bool:
        return not self.errors

    def by_file(self) -> dict[str, list[tuple[str, str]]]:
        """``{file: [(problem, severity), ...]}`` — the shape tests and UIs compare against."""
        out: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for f in self.findings:
            out[f.file].append((f.problem, f.severity))
        return dict(out)

    def counts(self, severity: str | None = None) -> dict[str, int]:
        """Findings per problem class (of one severity, if given), in report order."""
        c = Counter(f.problem for f in self.findings if severity in (None, f.severity))
        return {p: c[p] for p in PROBLEMS if c[p]}

    def skippable(self) -> set[str]:
        """Keys of the examples that carry an error and can be left out one by one."""
        keys = {e.key for e in self.entries}
        return {f.file for f in self.errors if f.file in keys}

    def fatal(self) -> list[Finding]:
        """Errors no skipping can cure (they concern the dataset, not one image)."""
        keys = {e.key for e in self.entries}
        return [f for f in self.errors if f.file not in keys]

    def summary_lines(self) -> list[str]:
        rows = [(p, PROBLEMS[p][0], n) for p, n in self.counts().items()]
        width = max([len("problem")] + [len(p) for p, _, _ in rows])
        lines = [f"{'problem':<{width}}  severity  files"]
        lines += [f"{p:<{width}}  {s:<8}  {n:>5}" for p, s, n in rows]
        bad = len({f.file for f in self.errors})
        lines.append(
            f"{self.images} images ({self.layout}): {len(self.errors)} errors in {bad} files, "
            f"{len(self.warnings)} warnings"
        )
        return lines

    def to_json(self) -> dict:
        return {
            "dataset": self.root,
            "layout": self.layout,
            "resolution": self.resolution,
            "images": self.images,
            "trainable": self.trainable,
            "summary": {p: {"severity": PROBLEMS[p][0], "files": n} for p, n in self.counts().items()},
            "notes": list(self.notes),
            "findings": [f.as_dict() for f in self.findings],
        }


# ----------------------------------------------------------------------------- images
def _one_line(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _decode_check(im: Image.Image) -> Exception | None:
    """Cheapest check that would catch a file training cannot decode; None when it is fine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if im.format == "PNG":
                im.verify()  # chunk lengths and CRCs, no zlib decompression
            elif im.format == "JPEG":
                w, h = im.size
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # DCT-domain 1/8 decode
                im.load()
            else:
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        return e
    return None


def inspect_image(data: bytes, resolution: int | None = None) -> list[tuple[str, str, str]]:
    """Problems of one image's bytes as ``(problem, what, fix)``; nothing means clean."""
    if not data:
        return [("empty-file", "file is empty (0 bytes)", "restore the original image or delete the file")]
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (w, h), info = im.format, im.mode, im.size, dict(im.info)
    except Exception as e:
        if "truncat" in str(e).lower():
            return [
                (
                    "truncated-image",
                    f"image file is cut short, even its header ({_one_line(e)})",
                    "restore the original file or delete it",
                )
            ]
        why = "PIL cannot identify the format" if type(e).__name__ == "UnidentifiedImageError" else str(e)
        return [
            (
                "unreadable-image",
                f"not a readable image ({_one_line(why)})",
                "re-save it as PNG or JPEG, or delete it",
            )
        ]
    orientation = None
    # PngImagePlugin.getexif() decodes the whole image to look for a late eXIf chunk: skip it
    # when the bytes hold no such chunk at all (JPEG EXIF sits in the header and is cheap).
    if fmt != "PNG" or b"eXIf" in data:
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # a broken EXIF block is not worth failing the file for
            orientation = None
    error = _decode_check(Image.open(io.BytesIO(data)))  # verify() must come right after open
    if error is not None and fmt == "PNG":
        # verify() also rejects a missing end marker that decoding tolerates: ask the decoder.
        try:
            Image.open(io.BytesIO(data)).load()
            return [
                (
                    "incomplete-file",
                    f"PNG ends early ({_one_line(error)}) but every pixel decodes",
                    "it trains as is; re-save it to repair the file",
                )
            ]
        except Exception as e:
            error = e
    if error is not None:
        kind = "truncated-image" if "truncat" in str(error).lower() else "corrupt-image"
        what = "image file is cut short" if kind == "truncated-image" else "image data is damaged"
        return [(kind, f"{what} ({_one_line(error)})", "restore the original file or delete it")]

    found = []
    found += _mode_problem(mode, info)
    if orientation in (5, 6, 7, 8):
        w, h = h, w  # sizes as training sees them, after exif_transpose
    short, long_ = min(w, h), max(w, h)
    if resolution and short < resolution:
        found.append(
            (
                "too-small",
                f"{w}x{h} is smaller than the training resolution {resolution}: upscaled "
                f"{resolution / short:.2f}x (short side {short} -> {resolution}), which blurs it",
                "use a larger original, or train at a lower resolution",
            )
        )
    if long_ / short > MAX_ASPECT:
        found.append(
            (
                "extreme-aspect",
                f"aspect ratio {long_ / short:.2f}:1 ({w}x{h}): a square training crop keeps only "
                f"{100 * short / long_:.0f}% of it",
                "crop it around the subject first, or train with data.buckets=true",
            )
        )
    if orientation in ORIENTATIONS:
        found.append(
            (
                "exif-orientation",
                f"EXIF orientation {orientation} ({ORIENTATIONS[orientation]}): training applies it "
                "(ImageOps.exif_transpose), as photo viewers do",
                "nothing to do if it looks upright in a viewer; otherwise re-save it upright without the tag",
            )
        )
    return found


def _mode_problem(mode: str, info: dict) -> list[tuple[str, str, str]]:
    """Modes that ``data.to_rgb`` converts in a way worth knowing about."""
    if mode == "CMYK":
        return [
            (
                "cmyk-image",
                "CMYK image: converted to RGB without colour management, colours may shift",
                "convert it to sRGB in an image editor for faithful colours",
            )
        ]
    if mode in SIXTEEN_BIT_MODES:
        return [
            (
                "16-bit-image",
                f"{'16' if mode.startswith('I;16') else '32'}-bit image (mode {mode}): scaled "
                "to 8 bits by dividing by its brightest pixel",
                "save it as 8-bit RGB to control the conversion",
            )
        ]
    if mode == "P" and "transparency" in info:
        return [
            (
                "palette-transparency",
                "palette image with transparency: transparent pixels are composited on white",
                "save it as RGB over the background you want",
            )
        ]
    if mode in ("RGBA", "LA"):
        return [
            (
                "alpha-channel",
                f"image has an alpha channel ({mode}): transparent areas are composited on white",
                "save it as RGB over the background you want",
            )
        ]
    if mode not in ("RGB", "L", "1", "P", "YCbCr"):
        return [
            (
                "unusual-mode",
                f"uncommon image mode {mode}: converted with PIL's convert('RGB')",
                "check it looks right, or save it as 8-bit RGB",
            )
        ]
    return []


# ----------------------------------------------------------------------------- captions
def _read_caption(txt: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    raw = txt.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        guess = raw.decode("cp1252", errors="replace")
        return None, [
            (
                "caption-not-utf8",
                f"caption file {txt.name} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}; "
                f"as Windows-1252 it reads {_one_line(guess, 40)!r})",
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
    return text.strip(), found


def _caption_problems(caption: str | None, missing_fix: str) -> list[tuple[str, str, str]]:
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


def _token_findings(entries: list[_Entry], tokenizer) -> list[Finding]:
    with_text = [e for e in entries if e.caption and e.caption.strip()]
    if not with_text:
        return []
    limit = int(tokenizer.model_max_length)
    if limit > 100_000:  # unset in the tokenizer config: CLIP text encoders have 77 positions
        limit = 77
    ids = tokenizer([e.caption for e in with_text], truncation=False, verbose=False)["input_ids"]
    found = []
    for entry, toks in zip(with_text, ids, strict=True):
        if len(toks) <= limit:
            continue
        cut = len(toks) - limit
        lost = tokenizer.decode(toks[limit - 1 : -1], skip_special_tokens=True)
        found.append(
            Finding(
                entry.key,
                "caption-too-long",
                f"caption is {len(toks)} tokens, over the text encoder's limit of {limit}: the last {cut} "
                f"are cut in training ({_one_line(lost, 40)!r})",
                "shorten the caption (put what matters first)",
            )
        )
    return found


# ----------------------------------------------------------------------------- scanning
def _files_under(root: Path) -> list[Path]:
    """Every non-hidden file below ``root`` (hidden files and folders are not dataset content)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return out


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in _data().IMAGE_EXTS


def _case_twin(p: Path) -> Path | None:
    if not p.parent.is_dir():
        return None
    twins = [q for q in p.parent.iterdir() if q.name.lower() == p.name.lower() and q.name != p.name]
    return twins[0] if twins else None


def _scan_sidecars(root: Path, files: list[Path]) -> tuple[str, list[_Entry], list[Finding]]:
    """Mirror of ``data._read_sidecars``: same folders, same order, same caption rule."""
    repeat = _data().REPEAT_DIR
    repeat_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and repeat.match(d.name)]
    folders = [(d, int(repeat.match(d.name).group(1))) for d in repeat_dirs] or [(root, 1)]
    layout = "kohya-repeats" if repeat_dirs else "txt-sidecars"
    entries, findings, used = [], [], set()
    for folder, repeats in folders:
        for img in sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p)):
            txt = img.with_suffix(".txt")
            used.update({img, txt})
            entry = _Entry(_rel(img, root), path=img, repeats=repeats)
            if txt.is_file():
                entry.caption, problems = _read_caption(txt)  # None only when not UTF-8
                if entry.caption is not None:
                    problems += _caption_problems(entry.caption, "")
            else:
                twin = _case_twin(txt)
                hint = f" (found {twin.name}: rename it to {txt.name})" if twin else ""
                problems = _caption_problems(None, f"add {txt.name} beside it{hint}")
            findings += [Finding(entry.key, *p) for p in problems]
            entries.append(entry)
    where = "outside the N_name repeat folders" if repeat_dirs else f"not directly in {root.name}/"
    for p in files:
        if p in used or p.parent == root and p.name in METADATA_FILES:
            continue
        if _is_image(p):
            findings.append(
                Finding(
                    _rel(p, root),
                    "ignored-file",
                    f"image {where}: training does not read it",
                    "move it beside the other images, or delete it",
                )
            )
        elif p.suffix.lower() in UNSUPPORTED_IMAGE_EXTS:
            findings.append(
                Finding(
                    _rel(p, root),
                    "ignored-file",
                    f"{p.suffix} images are not supported: training does not read it",
                    "convert it to PNG or JPEG",
                )
            )
        elif p.suffix.lower() == ".txt" and any(p.parent == f for f, _ in folders):
            findings.append(
                Finding(
                    _rel(p, root),
                    "orphan-caption",
                    "caption file with no image of the same name",
                    "add the image, fix the name, or delete the caption",
                )
            )
    return layout, entries, findings


def _read_metadata(meta: Path) -> tuple[list[dict], list[Finding]]:
    rows: list[dict] = []
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return [], [
            Finding(meta.name, "bad-metadata", f"{meta.name} is not UTF-8 text", "re-save it as UTF-8")
        ]
    if meta.suffix == ".csv":
        rows = [dict(r, _line=i + 2) for i, r in enumerate(csv.DictReader(io.StringIO(text)))]
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return [], [
                    Finding(
                        meta.name,
                        "bad-metadata",
                        f"line {i} of {meta.name} is not JSON ({e.msg})",
                        "fix that line (one JSON object per line)",
                    )
                ]
            if not isinstance(row, dict):
                return [], [
                    Finding(
                        meta.name,
                        "bad-metadata",
                        f"line {i} of {meta.name} is not a JSON object",
                        'write one {"file_name": ..., "text": ...} object per line',
                    )
                ]
            rows.append(dict(row, _line=i))
    bad = [r["_line"] for r in rows if not r.get("file_name")]
    if bad:
        return [], [
            Finding(
                meta.name,
                "bad-metadata",
                f"row at line {bad[0]} of {meta.name} has no file_name ({len(bad)} rows in all)",
                "give every row a file_name relative to the folder",
            )
        ]
    return rows, []


def _scan_imagefolder(
    root: Path, files: list[Path], caption_column: str
) -> tuple[list[_Entry], list[Finding]]:
    meta = next(root / m for m in METADATA_FILES if (root / m).is_file())
    rows, findings = _read_metadata(meta)
    if findings:
        return [], findings
    if rows and not any(caption_column in r for r in rows):
        cols = sorted({k for r in rows for k in r if k not in ("_line", "file_name")})
        return [], [
            Finding(
                meta.name,
                "missing-column",
                f"dataset has no column '{caption_column}' "
                f"(fields in {meta.name}: {', '.join(cols) or 'none'})",
                "set data.caption_column (check-data: --caption-column) to one of them",
            )
        ]
    entries, referenced = [], set()
    for r in rows:
        path = root / r["file_name"]
        referenced.add(path)
        cap = r.get(caption_column)
        entry = _Entry(
            Path(r["file_name"]).as_posix(), path=path, caption=None if cap is None else str(cap).strip()
        )
        entries.append(entry)
        if not path.is_file():
            twin = _case_twin(path)
            hint = f" ({twin.name} exists: fix the case)" if twin else ""
            findings.append(
                Finding(
                    entry.key,
                    "missing-file",
                    f"{meta.name} line {r['_line']} names a file that does not exist{hint}",
                    "fix its file_name, or remove the row",
                )
            )
            continue
        problems = _caption_problems(
            entry.caption, f"add a '{caption_column}' value to its row (line {r['_line']} of {meta.name})"
        )
        findings += [Finding(entry.key, *p) for p in problems]
    for p in files:
        if p in referenced or p.parent == root and p.name in METADATA_FILES:
            continue
        if _is_image(p):
            findings.append(
                Finding(
                    _rel(p, root),
                    "no-metadata-row",
                    f"image has no row in {meta.name}: training does not read it",
                    f"add a row for it to {meta.name}, or delete it",
                )
            )
        elif p.suffix.lower() in UNSUPPORTED_IMAGE_EXTS:
            findings.append(
                Finding(
                    _rel(p, root),
                    "ignored-file",
                    f"{p.suffix} images are not supported: training does not read it",
                    "convert it to PNG or JPEG",
                )
            )
    return entries, findings


def _scan_hf(images: CaptionedImages, caption_column: str) -> list[_Entry]:
    # Raw captions distinguish a missing value (None) from an empty one; CaptionedImages
    # keeps its datasets.Dataset in ``_hf`` (same package: read-only use).
    raw = images._hf[caption_column] if images._hf is not None else [it.caption for it in images.items]
    return [
        _Entry(f"row {it.row}", row=it.row, caption=None if c is None else str(c).strip())
        for it, c in zip(images.items, raw, strict=True)
    ]


def _case_collisions(root: Path, files: list[Path]) -> list[Finding]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        groups[_rel(p, root).lower()].append(p)
    found = []
    for group in groups.values():
        first, *rest = sorted(group, key=lambda p: _rel(p, root))
        found += [
            Finding(
                _rel(p, root),
                "case-collision",
                f"name differs from {_rel(first, root)} only in case: "
                "on Windows and macOS one file overwrites the other",
                "rename one of them",
            )
            for p in rest
        ]
    return found


def check_dataset(
    path: str | Path,
    resolution: int | None = None,
    tokenizer=None,
    image_column: str = "image",
    caption_column: str = "text",
    progress: bool = True,
) -> CheckReport:
    """Check a dataset in any layout training reads; never modifies it.

    Args:
        path: dataset folder (imagefolder, saved dataset, kohya repeats, ``.txt`` sidecars) or hub id.
        resolution: training side length; images with a shorter side are reported. None skips the check.
        tokenizer: a tokenizer with ``model_max_length`` (e.g. the base's ``CLIPTokenizer``); None skips
            the token-length check.
        image_column: image column of datasets-backed layouts (saved datasets, hub).
        caption_column: caption column / metadata field.
        progress: show a tqdm bar (only on a terminal).

    Returns:
        The report; ``report.trainable`` is False when there is any error.

    Raises:
        DataError: the path cannot be opened as a dataset at all (missing, a file, unreachable hub id).
    """
    root = Path(path).expanduser()
    images = None
    if root.is_dir() and any((root / m).is_file() for m in METADATA_FILES):
        files = _files_under(root)
        layout = "imagefolder"
        entries, findings = _scan_imagefolder(root, files, caption_column)
        ignored_txt = sum(1 for p in files if p.suffix.lower() == ".txt")
        notes = (
            [f"{ignored_txt} .txt caption files are ignored: the metadata file wins"] if ignored_txt else []
        )
    elif root.is_dir() and not ((root / "dataset_info.json").is_file() or (root / "state.json").is_file()):
        files = _files_under(root)
        layout, entries, findings = _scan_sidecars(root, files)
        notes = []
    else:  # saved datasets and hub ids: rows, not files (load_captioned_images reports bad paths/columns)
        files = []
        images = _data().load_captioned_images(str(path), image_column, caption_column)
        layout, entries, findings, notes = images.layout, _scan_hf(images, caption_column), [], []
        findings += [
            Finding(e.key, *p)
            for e in entries
            for p in _caption_problems(e.caption, f"fill its '{caption_column}' value")
        ]
    report = CheckReport(str(path), layout, resolution, notes=notes, entries=entries)
    findings += _check_images(report, images, progress)
    findings += _case_collisions(root, files)
    if tokenizer is not None:
        findings += _token_findings(entries, tokenizer)
    else:
        report.notes.append("caption token lengths not checked: give --base MODEL to count tokens")
    if resolution is None:
        report.notes.append("image sizes not compared to a training resolution: give --resolution R")
    if not entries and not any(f.severity == "error" for f in findings):
        findings.append(
            Finding(
                ".",
                "no-images",
                f"no images found in {root}",
                f"add images ({', '.join(sorted(_data().IMAGE_EXTS))}) with captions",
            )
        )
    # dict.fromkeys: a file listed twice in metadata is still one finding per problem
    report.findings = sorted(dict.fromkeys(findings), key=lambda f: (f.file, _ORDER[f.problem]))
    return report


def _check_images(report: CheckReport, images: CaptionedImages | None, progress: bool) -> list[Finding]:
    from tqdm.auto import tqdm

    findings, first_with_hash = [], {}
    bar = tqdm(report.entries, desc="check-data", unit="img", disable=None if progress else True, leave=False)
    for i, entry in enumerate(bar):
        if entry.path is not None and not entry.path.is_file():
            continue  # already reported as missing-file
        try:
            data = entry.path.read_bytes() if entry.path is not None else images.image_bytes(i)
        except Exception as e:
            findings.append(
                Finding(
                    entry.key,
                    "unreadable-image",
                    f"cannot read the image ({_one_line(e)})",
                    "fix the file's permissions or the dataset's image column",
                )
            )
            continue
        findings += [Finding(entry.key, *p) for p in inspect_image(data, report.resolution)]
        if data:
            digest = hashlib.sha256(data).hexdigest()
            first = first_with_hash.setdefault(digest, entry.key)
            if first != entry.key:
                findings.append(
                    Finding(
                        entry.key,
                        "duplicate-image",
                        f"same bytes as {first} (sha256 {digest[:12]}): it trains twice as often",
                        "delete one copy (or use repeats on purpose)",
                    )
                )
    bar.close()
    return findings


# ----------------------------------------------------------------------------- training
def load_tokenizer(base: str, revision: str | None = None):
    """Only the base model's tokenizer (no weights): what the token-length check needs."""
    from transformers import CLIPTokenizer

    fix = "point it at a diffusers model folder (with tokenizer/) or a hub id"
    local = Path(base).expanduser()
    if local.exists() and not any(
        (local / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")
    ):
        # transformers 5 would silently build an empty tokenizer from a folder without its files.
        raise ModelError(f"cannot load the tokenizer of {base} (no tokenizer/vocab.json), --base, {fix}")
    try:
        tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"cannot load the tokenizer of {base}, --base, {fix} ({_one_line(first, 120)})"
        ) from e
    if len(tok) <= 2:
        raise ModelError(f"the tokenizer of {base} is empty, --base, {fix}")
    return tok


#: Findings about captions; irrelevant when the caption comes from elsewhere (DreamBooth's instance prompt).
CAPTION_PROBLEMS = ("missing-caption", "caption-not-utf8", "empty-caption", "caption-too-long", "caption-bom")


def with_captions(report: CheckReport, caption_fn: Callable[[str | None], str]) -> CheckReport:
    """The report as training sees it when ``caption_fn`` decides every caption (DreamBooth's
    instance prompt): each image's caption (None when it has none) is mapped through it and
    caption findings stop counting, so a folder of images without captions trains."""
    return replace(
        report,
        findings=[f for f in report.findings if f.problem not in CAPTION_PROBLEMS],
        entries=[replace(e, caption=caption_fn(e.caption)) for e in report.entries],
        caption_fn=caption_fn,
    )


def checked_images(
    report: CheckReport, on_error: str, image_column: str = "image", caption_column: str = "text"
) -> tuple[CaptionedImages, list[Finding]]:
    """The training view of a checked dataset: raise on errors, or leave out the bad images.

    Returns ``(images, skipped)`` where ``skipped`` are the error findings of the images left
    out (``on_error="skip"``). Raises DataError listing every error (one line each) when
    ``on_error="fail"`` and there are errors, or when an error cannot be skipped.
    """
    fatal = report.fatal()
    skip = report.skippable()
    if fatal or (skip and on_error != "skip"):
        problems = [f"{f.what}, {Path(report.root) / f.file}, {f.fix} [{f.problem}]" for f in report.errors]
        hint = "" if fatal else " or set data.on_error=skip to train without them"
        problems.append(
            f"{len(report.errors)} dataset error(s), {report.root}, fix the files above{hint} "
            f"(details: loracraft check-data {report.root})"
        )
        raise DataError(problems[0], problems)
    kept = [e for e in report.entries if e.key not in skip]
    if not kept:
        raise DataError(
            f"every image has an error, {report.root}, fix them (see loracraft check-data {report.root})"
        )
    if (skip or report.caption_fn is not None) and report.layout in ("txt-sidecars", "kohya-repeats"):
        # load_captioned_images refuses missing/non-UTF-8 captions; the scan has the same items in the same order.
        data = _data()
        images = data.CaptionedImages(
            [data.Item(e.caption, e.path, repeats=e.repeats) for e in kept], report.layout, report.root
        )
    else:
        images = _data().load_captioned_images(report.root, image_column, caption_column)
        if skip:
            images.items = [it for it in images.items if _item_key(images, it, report) not in skip]
        if report.caption_fn is not None:
            images.items = [replace(it, caption=report.caption_fn(it.caption or None)) for it in images.items]
    skipped = [f for f in report.errors if f.file in skip]
    return images, skipped


def _item_key(images: CaptionedImages, item: Item, report: CheckReport) -> str:
    if report.layout != "imagefolder":
        return f"row {item.row}" if item.row is not None else _rel(item.path, Path(report.root))
    cell = images._hf[item.row][images._image_column]  # {"path": ..., "bytes": None} (decode=False)
    try:
        return Path(cell["path"]).resolve().relative_to(Path(report.root).resolve()).as_posix()
    except (TypeError, KeyError, ValueError):
        return f"row {item.row}"


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    """Add ``loracraft check-data``."""
    p = subparsers.add_parser(
        "check-data",
        help="check a dataset for problems before training",
        description="Report every problem in a captioned image dataset, per file. "
        "Exit 0 when it is trainable (warnings only), 1 when there are errors.",
    )
    p.add_argument("data_dir", metavar="DIR", help="dataset folder (any layout `train` reads) or hub id")
    p.add_argument("--resolution", type=int, metavar="R", help="training resolution: report smaller images")
    p.add_argument("--base", metavar="MODEL", help="base model whose tokenizer counts caption tokens")
    p.add_argument("--fix-report", metavar="FILE", help="also write every finding to FILE as JSON")
    p.add_argument("--image-column", default="image", help="image column (saved/hub datasets)")
    p.add_argument("--caption-column", default="text", help="caption column / metadata field")
    p.add_argument("--instance-prompt", metavar="PROMPT",
                   help="check as DreamBooth instance images trained with PROMPT (dreambooth.instance_prompt): "
                   "images need no captions")
    p.add_argument("--captions", choices=("instance_prompt", "prepend"), default="instance_prompt",
                   help="with --instance-prompt: dreambooth.captions (prepend = 'PROMPT, <caption>')")
    p.set_defaults(func=cmd_check_data)


def _instance_caption_rule(prompt: str, captions: str) -> Callable[[str | None], str]:
    from loracraft.train.config import DreamBoothCfg
    from loracraft.train.dreambooth import caption_rule

    if not prompt.strip():
        raise UsageError("--instance-prompt is empty, command line, pass e.g. --instance-prompt \"a photo of sks dog\"")
    return caption_rule(DreamBoothCfg(instance_prompt=prompt, captions=captions, prior_preservation=False))


def cmd_check_data(args: argparse.Namespace) -> int:
    if args.resolution is not None and args.resolution <= 0:
        raise UsageError(
            f"--resolution must be positive (got {args.resolution}), command line, e.g. --resolution 512"
        )
    root = Path(args.data_dir).expanduser()
    if not root.exists() and (args.data_dir.startswith((".", "/", "~")) or args.data_dir.count("/") != 1):
        raise DataError(f"dataset folder not found, {root}, check the path")
    tokenizer = load_tokenizer(args.base) if args.base else None
    report = check_dataset(args.data_dir, args.resolution, tokenizer, args.image_column, args.caption_column)
    if args.instance_prompt is not None:
        report = with_captions(report, _instance_caption_rule(args.instance_prompt, args.captions))
    print(f"loracraft check-data: {report.root} ({report.layout}, {report.images} images)")
    for f in report.findings:
        print(f.line())
    for note in report.notes:
        print(f"note: {note}")
    print()
    print("\n".join(report.summary_lines()))
    if args.fix_report:
        from loracraft.infer.io import write_json_atomic

        write_json_atomic(args.fix_report, report.to_json())
        print(f"findings written to {args.fix_report}")
    if not report.trainable:
        files = len({f.file for f in report.errors})
        raise DataError(
            f"{len(report.errors)} error(s) in {files} file(s) make the dataset untrainable, {report.root}, "
            "fix the files listed above (or train with data.on_error=skip to leave them out)"
        )
    print("dataset is trainable" + (f" ({len(report.warnings)} warnings)" if report.warnings else ""))
    return 0
