"""The vocabulary of dataset problems: every problem class with its severity, and one finding.

A finding names one file (or ``row N``) and says what is wrong and how to fix it; every text
that reaches the user is escaped, so a file name with a newline still makes one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Every problem class: id -> (severity, one-line description). The order is the report order.
PROBLEMS: dict[str, tuple[str, str]] = {
    "no-images": ("error", "the dataset holds no trainable images"),
    "bad-metadata": ("error", "metadata.jsonl/csv cannot be read"),
    "missing-column": ("error", "the caption column does not exist"),
    "outside-link": ("error", "image or caption is a link to a file outside the dataset folder"),
    "outside-path": ("error", "metadata file_name points outside the dataset folder"),
    "empty-file": ("error", "zero-byte image file"),
    "unreadable-image": ("error", "not an image PIL can open"),
    "corrupt-image": ("error", "image data is damaged"),
    "truncated-image": ("error", "image file is cut short"),
    "missing-file": ("error", "metadata row names a file that does not exist"),
    "missing-caption": ("error", "image has no caption"),
    "caption-not-text": ("error", "caption is a number, list or object, not text"),
    "caption-not-utf8": ("error", "caption file is not UTF-8"),
    "missing-mask": ("error", "data.masks has no mask for the image"),
    "bad-mask": ("error", "mask cannot be read or differs in size from its image"),
    "no-alpha": ("error", "data.masks=alpha but the image has no alpha channel"),
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
#: Findings about captions; irrelevant when the caption comes from elsewhere (DreamBooth's instance prompt).
CAPTION_PROBLEMS = (
    "missing-caption",
    "caption-not-text",
    "caption-not-utf8",
    "empty-caption",
    "caption-too-long",
    "caption-bom",
)
#: What ``data.allow_outside_links`` allows.
OUTSIDE_PROBLEMS = ("outside-link", "outside-path")


def printable(text: object) -> str:
    """``text`` with newlines and other control characters escaped the way ``repr`` writes them,
    so a file called ``a\\nb.png`` still makes one line of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


@dataclass(frozen=True)
class Finding:
    """One problem with one file. ``file`` is relative to the dataset root (``row N`` for
    datasets without files; the metadata file's name or ``.`` for dataset-level problems);
    it is kept as is (the key training skips by), and escaped wherever it is shown."""

    file: str
    problem: str
    what: str
    fix: str

    def __post_init__(self):
        object.__setattr__(self, "what", printable(self.what))
        object.__setattr__(self, "fix", printable(self.fix))

    @property
    def severity(self) -> str:
        return PROBLEMS[self.problem][0]

    @property
    def shown_file(self) -> str:
        return printable(self.file)

    @property
    def message(self) -> str:
        return f"{self.what}; {self.fix}"

    def line(self) -> str:
        return f"{self.severity:<7}  {self.shown_file}: {self.message} [{self.problem}]"

    def as_dict(self) -> dict:
        return {**asdict(self), "severity": self.severity, "message": self.message}


def one_line(text: object, limit: int = 60) -> str:
    text = " ".join(printable(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
