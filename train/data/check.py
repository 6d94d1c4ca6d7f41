"""Dataset lint: every problem in a captioned image dataset, per file, before any training.

``check_dataset(path)`` reads a dataset in any layout through :func:`sources.read_source` (the
same reader training uses, so both see the same items in the same order), then lints each
item: image bytes, caption text and token length, duplicates, case collisions. It returns a
:class:`CheckReport`: one :class:`Finding` (file, problem class, severity, what, how to fix)
per problem. It is fast because it only hashes bytes and reads headers: PNGs are checked with
``Image.verify`` (chunk CRCs, no decompression), JPEGs are decoded at 1/8 scale
(``Image.draft``), and only other formats are fully decoded. It never writes into the
dataset folder.

Severities: ``error`` means training would fail, silently learn from a broken example, or
read a file from outside the dataset folder; ``warning`` means the file trains, converted as
the message says, but may not be what you want. ``loracraft check-data`` exits 0 when there
are no errors, 1 otherwise.

The trainer runs the same checks before it loads any weights (:func:`checked_images`):
with ``data.on_error=fail`` (the default) every error stops the run up front, all listed
together; with ``data.on_error=skip`` every image with a per-file error is left out, with
one warning line and a count. Dataset-level errors (no images, unreadable metadata,
nothing left after skipping) always stop the run.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from loracraft.infer.errors import DataError, ModelError
from loracraft.train.data.sources import (
    CAPTION_PROBLEMS,
    IMAGE_EXTS,
    METADATA_FILES,
    OUTSIDE_PROBLEMS,
    PROBLEMS,
    UNSUPPORTED_IMAGE_EXTS,
    CaptionedImages,
    Finding,
    Item,
    Source,
    item_bytes,
    one_line,
    read_source,
    rel,
    training_view,
    with_affixes,
)

__all__ = [
    "CAPTION_PROBLEMS",
    "METADATA_FILES",
    "PROBLEMS",
    "UNSUPPORTED_IMAGE_EXTS",
    "CheckReport",
    "Finding",
    "check_dataset",
    "checked_images",
    "inspect_image",
    "load_tokenizer",
    "with_captions",
]

#: Long side / short side above which the square training crop keeps less than half the image.
MAX_ASPECT = 2.0
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
_ORDER = {name: i for i, name in enumerate(PROBLEMS)}


@dataclass
class CheckReport:
    """Everything ``check_dataset`` found. ``trainable`` is False when any error exists.

    ``source`` is what the layout reader returned: its items (``entries``) are exactly the
    list training draws from.
    """

    source: Source
    resolution: int | None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: set by :func:`with_captions`: where training's captions come from instead of the dataset
    caption_fn: Callable[[str | None], str] | None = None

    @property
    def root(self) -> str:
        return self.source.root

    @property
    def layout(self) -> str:
        return self.source.layout

    @property
    def entries(self) -> list[Item]:
        return self.source.items

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
                    f"image file is cut short, even its header ({one_line(e)})",
                    "restore the original file or delete it",
                )
            ]
        why = "PIL cannot identify the format" if type(e).__name__ == "UnidentifiedImageError" else str(e)
        return [
            (
                "unreadable-image",
                f"not a readable image ({one_line(why)})",
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
                    f"PNG ends early ({one_line(error)}) but every pixel decodes",
                    "it trains as is; re-save it to repair the file",
                )
            ]
        except Exception as e:
            error = e
    if error is not None:
        kind = "truncated-image" if "truncat" in str(error).lower() else "corrupt-image"
        what = "image file is cut short" if kind == "truncated-image" else "image data is damaged"
        return [(kind, f"{what} ({one_line(error)})", "restore the original file or delete it")]

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
def _token_findings(
    entries: list[Item], tokenizer, prefix: str = "", suffix: str = "", max_token_length: int = 75
) -> list[Finding]:
    """Captions the text encoder would cut, counted as training tokenizes them: with
    ``data.caption_prefix``/``caption_suffix`` joined on, against ``data.max_token_length``."""
    with_text = [e for e in entries if e.caption and e.caption.strip()]
    if not with_text:
        return []
    limit = int(tokenizer.model_max_length)
    if limit > 100_000:  # unset in the tokenizer config: CLIP text encoders have 77 positions
        limit = 77
    if max_token_length > limit - 2:  # 75-token windows (A1111/kohya): N content tokens + BOS/EOS
        limit = max_token_length + 2
    captions = [with_affixes(e.caption, prefix, suffix) for e in with_text]
    ids = tokenizer(captions, truncation=False, verbose=False)["input_ids"]
    longer = "" if max_token_length >= 225 else " or set data.max_token_length (150, 225)"
    found = []
    for entry, toks in zip(with_text, ids, strict=True):
        if len(toks) <= limit:
            continue
        cut = len(toks) - limit
        lost = tokenizer.decode(toks[limit - 1 : -1], skip_special_tokens=True)
        affixed = " with caption_prefix/suffix" if prefix or suffix else ""
        found.append(
            Finding(
                entry.key,
                "caption-too-long",
                f"caption{affixed} is {len(toks)} tokens, over the limit of {limit}: the last {cut} "
                f"are cut in training ({one_line(lost, 40)!r})",
                f"shorten the caption (put what matters first){longer}",
            )
        )
    return found


def _case_collisions(root: Path, files: list[Path]) -> list[Finding]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        groups[rel(p, root).lower()].append(p)
    found = []
    for group in groups.values():
        first, *rest = sorted(group, key=lambda p: rel(p, root))
        found += [
            Finding(
                rel(p, root),
                "case-collision",
                f"name differs from {rel(first, root)} only in case: "
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
    allow_outside_links: bool = False,
    setting: str = "data.path",
    masks: str | None = None,
    caption_prefix: str = "",
    caption_suffix: str = "",
    max_token_length: int = 75,
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
        allow_outside_links: read images/captions that lead outside the folder instead of reporting
            them as errors (``data.allow_outside_links``).
        setting: the config key ``path`` came from, as a dataset that cannot be opened names it.
        masks: ``data.masks`` (``alpha`` or a mask folder): report images without their mask / alpha.
        caption_prefix, caption_suffix, max_token_length: the ``data.*`` settings, so captions are
            counted as training tokenizes them.

    Returns:
        The report; ``report.trainable`` is False when there is any error.

    Raises:
        DataError: the path cannot be opened as a dataset at all (missing, a file, unreachable hub id).
    """
    source = read_source(path, image_column, caption_column, allow_outside_links, setting)
    report = CheckReport(source, resolution, notes=list(source.notes))
    findings = list(source.findings)
    findings += _check_images(report, progress)
    if masks:
        findings = _mask_findings(source, masks, findings)
    if source.files:
        findings += _case_collisions(Path(source.root), source.files)
    if tokenizer is not None:
        findings += _token_findings(source.items, tokenizer, caption_prefix, caption_suffix, max_token_length)
    else:
        report.notes.append("caption token lengths not checked: give --base MODEL to count tokens")
    if resolution is None:
        report.notes.append("image sizes not compared to a training resolution: give --resolution R")
    if not source.items and not any(f.severity == "error" for f in findings):
        findings.append(
            Finding(
                ".",
                "no-images",
                f"no images found in {source.root}",
                f"add images ({', '.join(sorted(IMAGE_EXTS))}) with captions",
            )
        )
    # dict.fromkeys: a file listed twice in metadata is still one finding per problem
    report.findings = sorted(dict.fromkeys(findings), key=lambda f: (f.file, _ORDER[f.problem]))
    return report


#: Findings after which the reader did not open the image.
_NOT_READ = (*OUTSIDE_PROBLEMS, "missing-file")


def _mask_findings(source: Source, masks: str, findings: list[Finding]) -> list[Finding]:
    """``findings`` plus one per image without its mask (``data.masks``); with ``alpha`` the
    transparency warnings go: transparency is what the masks are read from."""
    from loracraft.train.data.masks import ALPHA_WARNINGS, Masks

    reader = Masks(masks)
    reader.check_folder(source)
    unread = {f.file for f in source.findings if f.problem in _NOT_READ}
    if reader.alpha:
        findings = [f for f in findings if f.problem not in ALPHA_WARNINGS]
    return findings + reader.findings(source, unread)


def _check_images(report: CheckReport, progress: bool) -> list[Finding]:
    from tqdm.auto import tqdm

    findings, first_with_hash = [], {}
    bar = tqdm(report.entries, desc="check-data", unit="img", disable=None if progress else True, leave=False)
    src, unread = report.source, {f.file for f in report.source.findings if f.problem in _NOT_READ}
    for entry in bar:
        if entry.key in unread or entry.path is not None and not entry.path.is_file():
            continue  # reported by the reader (missing file, or a link out of the folder)
        try:
            data = item_bytes(entry, src.hf, src.image_column)
        except Exception as e:
            findings.append(
                Finding(
                    entry.key,
                    "unreadable-image",
                    f"cannot read the image ({one_line(e)})",
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
            f"cannot load the tokenizer of {base}, --base, {fix} ({one_line(first, 120)})"
        ) from e
    if len(tok) <= 2:
        raise ModelError(f"the tokenizer of {base} is empty, --base, {fix}")
    return tok


def with_captions(report: CheckReport, caption_fn: Callable[[str | None], str]) -> CheckReport:
    """The report as training sees it when ``caption_fn`` decides every caption (DreamBooth's
    instance prompt): each image's caption (None when it has none) is mapped through it and
    caption findings stop counting, so a folder of images without captions trains."""
    items = [replace(e, caption=caption_fn(e.caption)) for e in report.entries]
    return replace(
        report,
        source=replace(report.source, items=items),
        findings=[f for f in report.findings if f.problem not in CAPTION_PROBLEMS],
        caption_fn=caption_fn,
    )


def checked_images(report: CheckReport, on_error: str) -> tuple[CaptionedImages, list[Finding]]:
    """The training view of a checked dataset: raise on errors, or leave out the bad images.

    Returns ``(images, skipped)`` where ``images`` holds the report's own items (minus the
    skipped ones, in the same order) and ``skipped`` are the error findings of the images
    left out (``on_error="skip"``). Raises DataError listing every error (one line each) when
    ``on_error="fail"`` and there are errors, or when an error cannot be skipped.
    """
    fatal = report.fatal()
    skip = report.skippable()
    if fatal or (skip and on_error != "skip"):
        problems = [
            f"{f.what}, {Path(report.root) / f.shown_file}, {f.fix} [{f.problem}]" for f in report.errors
        ]
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
    skipped = [f for f in report.errors if f.file in skip]
    return training_view(report.source, kept), skipped


def print_check_summary(skipped_files: list[str], total: int,
                        sources: list[tuple[str | None, str, CheckReport]], print_: Callable[[str], None]) -> None:
    """What training prints about its checked dataset: the images ``data.on_error=skip`` left out,
    then per source ``(name or None, path, report)`` how many warnings ``loracraft check-data`` details."""
    if skipped_files:
        print_(f"warning: skipped {len(skipped_files)} of {total} images with errors (data.on_error=skip): "
               + ", ".join(skipped_files))
    for name, path, report in sources:
        if report.warnings:
            counts = ", ".join(f"{n} {p}" for p, n in report.counts("warning").items())
            label = f" ({name})" if name else ""
            print_(f"data check{label}: {len(report.warnings)} warnings ({counts}); details: loracraft check-data {path}")
