"""AUTOMATIC1111 prompt syntax: ``<lora:...>`` tags, ``(word:1.2)`` emphasis, prompts past 77 tokens.

Prompts written for A1111 (and shared with images on model sites) use three conventions that
plain diffusers pipelines ignore or truncate:

* ``<lora:NAME:W>`` / ``<lora:NAME:TE:UNET>`` extra-network tags load an adapter from the
  LoRA folder; the tag itself is removed from the text (:func:`extract_lora_tags`).
* ``(word)`` = x1.1, ``((word))`` = x1.21, ``[word]`` = /1.1, ``(word:1.5)`` = x1.5, ``\\(`` a
  literal bracket, ``BREAK`` starts a new chunk (:func:`parse_emphasis`).
* Text past CLIP's 75 usable tokens is not dropped: the prompt is cut into 75-token chunks,
  each wrapped in BOS/EOS and encoded on its own, and the embeddings are concatenated along
  the sequence axis (77, 154, 231, ... positions); the negative prompt gets as many chunks
  (:func:`build_chunks`). Emphasis multiplies each token's embedding by its weight and then
  rescales the chunk so its mean is what it was before weighting (:func:`apply_emphasis`).

For a prompt of at most 75 tokens without brackets the result equals the diffusers
pipeline's own encoding bit for bit, so adding this layer changes no existing image.
compel, the usual diffusers add-on, parses a different syntax (``word++``, ``(word)1.2``) and
weights differently, so A1111 prompts would not give A1111's images through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import UsageError

__all__ = [
    "LoraTag",
    "extract_lora_tags",
    "find_lora",
    "parse_lora_spec",
    "parse_block_weights",
    "parse_emphasis",
    "build_chunks",
    "apply_emphasis",
    "CHUNK_TOKENS",
    "parse_infotext",
    "BREAK",
]

#: Usable tokens per CLIP window (77 positions minus BOS and EOS).
CHUNK_TOKENS = 75
#: A full window moves the words after a comma this close to its end into the next one.
COMMA_BACKTRACK = 20
#: Marker in :func:`parse_emphasis` output for A1111's ``BREAK`` keyword.
BREAK = ("BREAK", -1.0)

_LORA_TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: adapter name and its UNet / text-encoder strengths."""

    name: str
    unet: float
    text_encoder: float


def _tag_number(value: str, tag: str) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise UsageError(
            f"cannot read weight {value!r} in prompt tag {tag}, --prompt, write e.g. <lora:NAME:0.8>"
        )
    return x


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove ``<lora:...>`` tags from ``prompt`` and return them.

    Spellings (A1111's built-in Lora extension): ``<lora:NAME>`` (weight 1),
    ``<lora:NAME:W>`` (both parts W), ``<lora:NAME:TE:UNET>`` (text encoder first),
    and the named forms ``te=``/``unet=``. ``<lyco:...>`` is read the same way.

    >>> extract_lora_tags("a cat <lora:mystyle:0.7>, night")
    ('a cat, night', [LoraTag(name='mystyle', unet=0.7, text_encoder=0.7)])
    """
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        parts = [p.strip() for p in m.group(2).split(":")]
        name, rest = parts[0], parts[1:]
        if not name:
            raise UsageError(f"prompt tag {m.group(0)} has no name, --prompt, write <lora:NAME:WEIGHT>")
        positional = [p for p in rest if "=" not in p]
        named = dict(p.split("=", 1) for p in rest if "=" in p)
        unknown = sorted(set(named) - {"te", "unet", "dyn"})
        if unknown:
            raise UsageError(
                f"unknown option {unknown[0]!r} in prompt tag {m.group(0)}, --prompt, use te= or unet="
            )
        te = _tag_number(positional[0], m.group(0)) if positional else 1.0
        unet = _tag_number(positional[1], m.group(0)) if len(positional) > 1 else te
        te = _tag_number(named["te"], m.group(0)) if "te" in named else te
        unet = _tag_number(named["unet"], m.group(0)) if "unet" in named else unet
        tags.append(LoraTag(name=name, unet=unet, text_encoder=te))
        return ""

    text = _LORA_TAG.sub(take, prompt)
    # Removing a tag leaves its neighbouring spaces; CLIP's tokenizer ignores them anyway.
    text = re.sub(r"[ \t]+([,.;])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).strip()
    return text, tags


def find_lora(name: str, folders: Sequence[str | Path]) -> Path:
    """The adapter a ``<lora:NAME>`` tag means: ``NAME.safetensors`` or a run folder ``NAME/``
    holding ``pytorch_lora_weights.safetensors`` in one of ``folders``, else anywhere below
    them (A1111 looks in sub-folders of its LoRA folder too). The first folder wins."""
    from loracraft.infer.formats import LORA_WEIGHT_NAME

    if not folders:
        raise UsageError(
            f"the prompt names <lora:{name}> but no LoRA folder is given, --lora-dir, "
            f"pass the folder holding {name}.safetensors"
        )
    for folder in map(Path, folders):
        for candidate in (folder / f"{name}.safetensors", folder / name / LORA_WEIGHT_NAME):
            if candidate.is_file():
                return candidate
    for folder in map(Path, folders):
        found = sorted(folder.rglob(f"{name}.safetensors")) if folder.is_dir() else []
        if found:
            return found[0]
    raise UsageError(
        f"LoRA {name!r} named in the prompt is not in {', '.join(map(str, folders))}, --lora-dir, "
        f"add {name}.safetensors (or a run folder {name}/) there or pass --lora PATH"
    )


# --------------------------------------------------------------------------------------------
# Adapter weights on the command line
# --------------------------------------------------------------------------------------------
def parse_lora_spec(text: str) -> tuple[str, float, float | None]:
    """Split ``PATH[:UNET[:TE]]``: up to two trailing numbers, the UNet weight first.

    >>> parse_lora_spec("style.safetensors:0.8:0.4")
    ('style.safetensors', 0.8, 0.4)
    >>> parse_lora_spec("C:/loras/style.safetensors:0.7")
    ('C:/loras/style.safetensors', 0.7, None)
    """
    head, numbers = text, []
    for _ in range(2):
        path, sep, tail = head.rpartition(":")
        try:
            value = float(tail) if sep and path else None
        except ValueError:
            value = None
        if value is None:
            break
        if not math.isfinite(value):
            raise UsageError(f"weight {tail!r} is not a finite number, --lora {text}, use e.g. PATH:0.8")
        numbers.insert(0, value)
        head = path
    return head, (numbers[0] if numbers else 1.0), (numbers[1] if len(numbers) > 1 else None)


_BLOCK_KEY = re.compile(r"^(down|mid|up)(\.\d+)?$")


def parse_block_weights(text: str) -> tuple[str | None, dict[str, float]]:
    """Read ``[NAME:]down=W,mid=W,up=W`` (``down.1=W`` targets one block) -> (name, weights).

    >>> parse_block_weights("style:down=0,up=1.2")
    ('style', {'down': 0.0, 'up': 1.2})
    """
    name, sep, body = text.rpartition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
    weights: dict[str, float] = {}
    for item in (x.strip() for x in body.split(",") if x.strip()):
        key, eq, value = item.partition("=")
        try:
            w = float(value) if eq else math.nan
        except ValueError:
            w = math.nan
        if not _BLOCK_KEY.match(key.strip()) or not math.isfinite(w):
            raise UsageError(
                f"cannot read block weight {item!r}, --lora-blocks {text}, write e.g. NAME:down=0,mid=1,up=0.5"
            )
        weights[key.strip()] = w
    if not weights:
        raise UsageError(f"no block weights given, --lora-blocks {text}, write e.g. NAME:down=0,mid=1,up=0.5")
    return (name or None), weights


# --------------------------------------------------------------------------------------------
# Emphasis
# --------------------------------------------------------------------------------------------
_EMPHASIS_TOKEN = re.compile(
    r"\\[\\()\[\]]"  # escaped bracket or backslash: literal
    r"|:\s*([+-]?[.\d]+)\s*\)"  # ':1.3)' closes a weighted group
    r"|[()\[\]]"  # group opens and closes
    r"|[^\\()\[\]:]+|[:\\]",  # plain text (':' and a lone '\' too)
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs by A1111's emphasis rules.

    Brackets nest multiplicatively; a bracket left open applies to the end of the text; a
    closing bracket without an opener is ignored; adjacent fragments with equal weight are
    merged; ``BREAK`` (upper case, a word of its own) becomes :data:`BREAK`.

    >>> parse_emphasis("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    out: list[list] = []  # [text, weight] pairs; weights change as groups close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _EMPHASIS_TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            open_round.append(len(out))
        elif tok == "[":
            open_square.append(len(out))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif tok == ")" and open_round:
            scale_from(open_round.pop(), 1.1)
        elif tok == "]" and open_square:
            scale_from(open_square.pop(), 1 / 1.1)
        elif tok in ")]":
            continue  # a stray closer
        else:
            pieces = _BREAK_WORD.split(tok)
            for i, piece in enumerate(pieces):
                if i:
                    out.append(list(BREAK))
                out.append([piece, 1.0])
    for start in open_round:
        scale_from(start, 1.1)
    for start in open_square:
        scale_from(start, 1 / 1.1)
    merged: list[tuple[str, float]] = []
    for frag, w in out:
        if merged and merged[-1][1] == w and (frag, w) != BREAK and merged[-1] != BREAK:
            merged[-1] = (merged[-1][0] + frag, w)
        else:
            merged.append((frag, w))
    return merged or [("", 1.0)]


@dataclass
class Chunk:
    """77 token ids (BOS, 75 tokens or padding, EOS) and one weight per position."""

    ids: list[int]
    weights: list[float]


def build_chunks(
    fragments: Sequence[tuple[str, float]],
    tokenize: Callable[[str], list[int]],
    *,
    bos: int,
    eos: int,
    pad: int,
    min_chunks: int = 1,
    comma: int | None = None,
    backtrack: int = COMMA_BACKTRACK,
) -> list[Chunk]:
    """Cut weighted text into CLIP windows: each ``[BOS] + 75 tokens + [EOS]``.

    A short last window is filled after its EOS with ``pad`` (the tokenizer's pad token: EOS
    for SD1's tokenizer, ``!`` for SD2/SDXL's second one), as a ``padding="max_length"``
    tokenizer call does. ``BREAK`` closes the current window early. ``min_chunks`` appends
    empty windows (a negative prompt must have as many as its prompt). When a window fills
    up and a ``comma`` token stood within its last ``backtrack`` tokens, the words after that
    comma move to the next window, so a phrase is not cut in two (A1111's default, 20).
    """
    windows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for frag, w in fragments:
        if (frag, w) == BREAK:
            windows.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for t in tokenize(frag) if frag else []:
            if comma is not None and t == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma >= 0 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                windows.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == CHUNK_TOKENS:
                windows.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(t)
            weights.append(w)
    if ids or not windows:
        windows.append((ids, weights))
    while len(windows) < min_chunks:
        windows.append(([], []))
    chunks = []
    for ids, weights in windows:
        fill = CHUNK_TOKENS - len(ids)
        chunks.append(
            Chunk(
                ids=[bos, *ids, eos] + [pad] * fill,
                weights=[1.0, *weights, 1.0] + [1.0] * fill,
            )
        )
    return chunks


def apply_emphasis(z: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weight each position's embedding, then restore the tensor's mean (A1111's "Original").

    ``z``: ``(B, 77, D)`` text-encoder output of one window; ``weights``: 77 values (or
    ``(B, 77)``). Without the rescale, up-weighting shifts the whole conditioning and the
    images drift in colour; A1111 keeps the mean and so do we, to get its images.
    """
    w = torch.as_tensor(weights, dtype=z.dtype, device=z.device)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if bool((w == 1).all()):
        return z  # the common case: bit for bit what the encoder gave
    before = z.mean()
    z = z * w.unsqueeze(-1).expand(z.shape)
    return z * (before / z.mean())


# --------------------------------------------------------------------------------------------
# A1111 "parameters" text (infotext)
# --------------------------------------------------------------------------------------------
_INFO_FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _settings(line: str) -> dict[str, str] | None:
    """``Key: value, Key: "quoted, value", ...`` -> dict, or None if the line is not one."""
    fields, pos = {}, 0
    while pos < len(line):
        m = _INFO_FIELD.match(line, pos)
        if not m or m.end() == pos:
            return None
        key, value = m.group(1).strip(), m.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields[key] = value
        pos = m.end()
    return fields if len(fields) >= 3 else None


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split A1111's ``parameters`` PNG text into (prompt, negative prompt, settings).

    Layout: prompt line(s); optionally ``Negative prompt: ...`` (may span lines); last, one line
    of at least three ``Key: value`` pairs (``Steps: 20, Sampler: Euler a, CFG scale: 7, Seed:
    1, Size: 512x768, ...``; values holding commas are double-quoted).

    >>> parse_infotext("a cat\\nNegative prompt: dog\\nSteps: 20, Sampler: Euler a, Seed: 1")
    ('a cat', 'dog', {'Steps': '20', 'Sampler': 'Euler a', 'Seed': '1'})
    """
    lines = text.strip().split("\n")
    settings = _settings(lines[-1].strip()) if lines else None
    if settings is not None:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), settings or {}
