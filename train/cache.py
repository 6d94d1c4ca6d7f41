"""On-disk cache of VAE latent distributions and text-encoder hidden states.

Why cache: with LoRA only the UNet learns, so a frozen VAE encoding the same image and a
frozen text encoder reading the same caption on every step is pure waste (the diffusers
reference script spends ~25% of its step there on CPU).

What is cached: the latent *distribution* (mean and std of the VAE posterior), not one
sample of it, so training still draws a fresh ``mean + std * eps`` each step (with eps keyed
by sample position, exactly as the uncached path does): cached and uncached training give the
same loss. With ``data.random_flip`` both the plain and mirrored variant are cached.

Layout: one small safetensors file per entry, ``<root>/latents/ab/abcdef....safetensors``,
named by a content hash of everything that determines it — (image bytes, size, crop, flip,
VAE weights fingerprint, dtype) or (caption, tokenizer + text-encoder fingerprints; SDXL entries
also hold the pooled embedding and are keyed as a different kind). So:
changing an input invalidates exactly the affected entries; files are written atomically
(temp + rename), so a cache killed mid-way holds only complete entries and a rerun computes
the rest; entries are read on demand (memory-mapped by safetensors), so datasets larger than
RAM work.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from loracraft.infer.io import atomic_path

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    env = os.environ.get("LORACRAFT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loracraft"


def module_fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """Hash of a frozen module's weights and config: a changed VAE/text encoder changes every key."""
    h = hashlib.sha256((CACHE_VERSION + extra).encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update(repr(sorted(dict(config).items()) if isinstance(config, dict) else config).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def entry_key(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


class TensorCache:
    """A folder of small safetensors files addressed by key; complete-or-absent by construction."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))

    def fill(
        self,
        keys: list[str],
        compute: Callable[[list[int]], Iterable[dict[str, torch.Tensor]]],
        batch_size: int,
        desc: str,
        disable_bar: bool = False,
    ) -> int:
        """Compute and store the entries whose files are missing; returns how many were computed."""
        todo = [i for i, k in enumerate(keys) if k not in self]
        todo = list(dict.fromkeys(todo))
        seen: set[str] = set()
        todo = [i for i in todo if not (keys[i] in seen or seen.add(keys[i]))]
        with tqdm(total=len(todo), desc=desc, disable=disable_bar or not todo) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for i, tensors in zip(chunk, compute(chunk), strict=True):
                    self.put(keys[i], tensors)
                bar.update(len(chunk))
        return len(todo)


# ----------------------------------------------------------------------------- wiring
class CachePlan:
    """What to cache for a run, and why not the rest (messages shown to the user)."""

    def __init__(self, latents: bool, text: bool, notes: list[str], root: Path, flips: tuple[bool, ...],
                 text_variant: tuple = ()):
        self.latents, self.text, self.notes, self.root, self.flips = latents, text, notes, root, flips
        #: extra parts of every text entry's key: how the prompt was encoded (model.clip_skip)
        self.text_variant = text_variant


def needs_random_crop(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """True when resizing ``size`` to cover ``target`` leaves a margin a random crop would move in."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)) > tw or max(th, round(h * scale)) > th


def cache_plan(
    cfg, sizes: list[tuple[int, int]], targets: list[tuple[int, int]], centered: list[bool] | None = None
) -> CachePlan:
    """``centered``: per image, whether its crop is centred (data.concepts set center_crop per
    concept); default data.center_crop for all."""
    from loracraft.infer.errors import ConfigError
    from loracraft.train.data.concepts import random_caption_keys, resolve_concepts

    d, t = cfg.data, cfg.train
    notes: list[str] = []
    centered = [d.center_crop] * len(sizes) if centered is None else centered
    # With buckets crops are always centred: the margin left by the nearest bucket is a few pixels.
    random_crops = 0 if d.buckets else sum(
        needs_random_crop(s, tg) and not c for s, tg, c in zip(sizes, targets, centered, strict=True)
    )
    latents = t.cache is not False
    if random_crops and latents:
        if t.cache is True:
            raise ConfigError(
                f"train.cache=true but {random_crops} image(s) get random crops (data.center_crop=false, "
                "aspect ratio differs from the training size), config, set data.center_crop=true, "
                "data.buckets=true, or train.cache=auto"
            )
        notes.append(
            f"latent cache off: {random_crops} image(s) are randomly cropped each step "
            "(set data.center_crop=true or data.buckets=true to cache them)"
        )
        latents = False
    text = t.cache is not False
    random_captions = random_caption_keys(d)  # data.shuffle_tags / tag_dropout, or a concept's own
    if text and random_captions:
        keys = " and ".join(random_captions)
        notes.append(f"text-embedding cache off: {keys} change{'s' * (len(random_captions) == 1)} captions every step")
        text = False
    if text and cfg.lora.text_encoder is not None:
        notes.append("text-embedding cache off: the text encoder trains (lora.text_encoder)")
        text = False
    root = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
    flips = (False, True) if any(c.random_flip for c in resolve_concepts(d)) else (False,)
    variant = ("clip_skip", cfg.model.clip_skip) if cfg.model.clip_skip > 1 else ()
    if cfg.data.max_token_length != 75:
        variant += ("max_token_length", cfg.data.max_token_length)
    return CachePlan(latents, text, notes, root, flips, variant)


def build_caches(plan: CachePlan, planner, components, encode_text, device, build: bool = True,
                 show_progress: bool = True) -> dict:
    """Fill the caches (when ``build``) and return lookups for ``TrainingExamples``."""
    from loracraft.train.data import load_pixels

    images, targets = planner.images, planner.targets
    sources: dict = {}
    if plan.latents:
        vae = components.vae
        vae_fp = module_fingerprint(vae)
        entries = [(i, flip) for i in range(len(images)) for flip in plan.flips]
        keys = [
            entry_key("latent", images.item_hash(i), targets[i], flip, vae_fp, str(vae.dtype)) for i, flip in entries
        ]
        latent_store = TensorCache(plan.root / "latents")

        @torch.no_grad()
        def encode(chunk: list[int]):
            pixels = torch.stack([load_pixels(images, entries[j][0], targets[entries[j][0]], True, entries[j][1])[0]
                                  for j in chunk])
            dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
            return [{"mean": dist.mean[k].float(), "std": dist.std[k].float()} for k in range(len(chunk))]

        if build:
            _fill_grouped(latent_store, keys, encode, [targets[i] for i, _ in entries], "caching latents", show_progress)
        by_entry = dict(zip(entries, keys, strict=True))

        def latent_lookup(index: int, flip: bool) -> dict[str, torch.Tensor]:
            t = latent_store.get(by_entry[(index, flip)])
            return {"latent_mean": t["mean"], "latent_std": t["std"]}

        sources["latent_lookup"] = latent_lookup
    if plan.text:
        kind, te_fp = text_fingerprint(components)
        captions = sorted({planner.fixed_caption(i) for i in range(len(images))} | {""})
        keys = [entry_key(kind, c, te_fp, *plan.text_variant) for c in captions]
        text_store = TensorCache(plan.root / "text")

        @torch.no_grad()
        def encode_captions(chunk: list[int]):
            enc = encode_text([captions[j] for j in chunk])
            return [{_STORED[name]: t[k].float() for name, t in enc.items()} for k in range(len(chunk))]

        if build:
            text_store.fill(keys, encode_captions, 16, "caching text embeddings", not show_progress)
        by_caption = dict(zip(captions, keys, strict=True))

        def text_lookup(caption: str) -> dict[str, torch.Tensor]:
            t = text_store.get(by_caption[caption])
            return {name: t[stored] for name, stored in _STORED.items() if stored in t}

        sources["text_lookup"] = text_lookup
    return sources


#: batch key -> tensor name inside a text entry ("hidden" is what SD1 entries have always held).
_STORED = {"text_embeds": "hidden", "pooled_text_embeds": "pooled"}


def text_fingerprint(components) -> tuple[str, str]:
    """(entry kind, fingerprint) of the prompt encoder: every tokenizer and text encoder in use.

    SDXL entries hold two tensors (concatenated hidden states and the pooled projection) and
    get their own kind, ``text-sdxl``, so an SD1 entry can never be read as an SDXL one even if
    someone built both from the same first text encoder.
    """
    pairs = [(components.tokenizer, components.text_encoder)]
    if getattr(components, "text_encoder_2", None) is not None:
        pairs.append((components.tokenizer_2, components.text_encoder_2))
    fps = [
        module_fingerprint(te, extra=entry_key(sorted(tok.get_vocab().items()), tok.model_max_length))
        for tok, te in pairs
    ]
    return ("text" if len(pairs) == 1 else "text-sdxl"), "|".join(fps)


def _fill_grouped(store: TensorCache, keys: list[str], compute, groups: list, desc: str, show: bool) -> None:
    """Fill per target size (a VAE batch must share one image size: buckets)."""
    order = sorted(range(len(keys)), key=lambda i: groups[i])
    for size in sorted(set(groups)):
        idx = [i for i in order if groups[i] == size]
        sub_keys = [keys[i] for i in idx]
        store.fill(sub_keys, lambda chunk, idx=idx: compute([idx[c] for c in chunk]), 8, desc, not show)
