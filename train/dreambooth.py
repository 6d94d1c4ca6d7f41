"""DreamBooth (Ruiz et al. 2022, arXiv:2208.12242) with prior preservation, as a few pieces the
trainer plugs in; nothing here changes how an ordinary run trains.

* **Instance images** are ``data.path``; their caption is ``dreambooth.instance_prompt``
  (``captions: instance_prompt``, diffusers' ``train_dreambooth_lora.py``) or
  ``"<instance_prompt>, <caption>"`` (``captions: prepend``, kohya's class-token style), so a
  folder of images without captions trains.
* **Class images** ("regularisation images" in kohya) are the user's ``class_data`` folder (read,
  never written) topped up to ``num_class_images`` by the *base* model, generated through
  ``loracraft.infer.generation`` before the LoRA is injected. Generated image k uses seed
  ``class_generation.seed + k`` in its own pipeline call and is written atomically as soon as
  it exists, into ``<cache>/class_images/<key>/`` (key = everything that determines the pixels),
  so an interrupted generation resumes where it stopped and ends with the same set as an
  uninterrupted one, and later runs with the same settings reuse it.
* **Pairing**: the sample at stream position ``p`` is trained together with the class sample at
  position :func:`class_position` ``(p) = -1 - p`` of a second stream over the class images.
  Every random draw about that class sample (its order, flip, caption dropout, VAE sample,
  noise, timestep) is therefore keyed by ``(seed, -1 - p, purpose)``: disjoint from all
  instance draws, and given by the step counter alone, so exact resume and multi-process
  equivalence hold unchanged. A batch is the instance samples followed by their class samples
  (diffusers' layout), and the loss is :func:`loracraft.train.loss.prior_preservation_loss`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loracraft.infer.errors import ConfigError, DataError
from loracraft.infer.io import write_json_atomic
from loracraft.train.config import Config, DreamBoothCfg
from loracraft.train.data import (
    IMAGE_EXTS,
    CaptionedImages,
    Item,
    Planner,
    SampleStream,
    TrainingExamples,
    collate,
)
from loracraft.train.loss import prior_preservation_loss

CLASS_IMAGE_VERSION = "1"


def class_position(position: int) -> int:
    """Stream position of the class sample paired with instance position ``position`` (see module doc)."""
    return -1 - position


def caption_rule(db: DreamBoothCfg) -> Callable[[str | None], str]:
    """The caption an instance image trains with, from its dataset caption (None = has none)."""
    if db.captions == "instance_prompt":
        return lambda _caption: db.instance_prompt
    return lambda caption: f"{db.instance_prompt}, {caption}" if caption and caption.strip() else db.instance_prompt


def dreambooth_problems(cfg: Config) -> list[str]:
    """Checks that need the file system but no weights (run with the other pre-load checks)."""
    db = cfg.dreambooth
    if db is None or db.class_data is None:
        return []
    folder = Path(db.class_data).expanduser()
    if not folder.is_dir():
        return [f"dreambooth.class_data folder not found, {folder}, point it at a folder of class images "
                "or set it to null to generate them all"]
    resolved, data = folder.resolve(), Path(cfg.data.path).expanduser().resolve()
    if resolved == data or data in resolved.parents or resolved in data.parents:
        return [f"dreambooth.class_data and data.path overlap, {folder}, keep class images and instance images "
                "in separate folders"]
    return []


def user_class_files(folder: str | None, limit: int) -> list[Path]:
    """The first ``limit`` images of the user's class folder (sub-folders included, sorted by path)."""
    if folder is None:
        return []
    root = Path(folder).expanduser()
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS),
                   key=lambda p: p.relative_to(root).as_posix())
    return files[:limit]


def check_class_files(files: list[Path], on_error: str) -> list[Path]:
    """Decode-check the user's class images like ``check-data``; fail or skip (``data.on_error``)."""
    from loracraft.train.data.check import PROBLEMS, inspect_image

    bad: list[str] = []
    good: list[Path] = []
    for f in files:
        errors = [(what, fix) for problem, what, fix in inspect_image(f.read_bytes()) if PROBLEMS[problem][0] == "error"]
        if errors:
            bad.append(f"{errors[0][0]}, {f}, {errors[0][1]} (dreambooth.class_data)")
        else:
            good.append(f)
    if bad and on_error != "skip":
        raise DataError(bad[0], bad + [f"{len(bad)} class image error(s), dreambooth.class_data, fix or remove "
                                       "the files above or set data.on_error=skip"])
    return good


def fingerprint_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- class image generation
def generation_key(cfg: Config, base_fingerprint: str, dtype: torch.dtype, scheduler) -> dict:
    """Everything that determines the generated class images' pixels (their cache folder's identity).

    ``num_class_images`` is not part of it: image k does not depend on how many are made, so a
    larger request reuses the smaller set and adds to it.
    """
    db, m = cfg.dreambooth, cfg.model
    g = db.class_generation
    return {
        "version": CLASS_IMAGE_VERSION,
        "base": base_fingerprint, "revision": m.revision, "variant": m.variant, "dtype": str(dtype),
        "prediction_type": m.prediction_type,
        "prompt": db.class_prompt, "negative_prompt": g.negative_prompt, "steps": g.steps,
        "guidance": g.guidance, "seed": g.seed, "resolution": cfg.data.resolution,
        "scheduler": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
    }


def class_image_dir(cache_root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_root) / "class_images" / digest[:24]


def generated_file(folder: Path, k: int) -> Path:
    return folder / f"{k:06d}.png"


def generate_class_images(
    pipe, folder: Path, count: int, prompt: str, gen_cfg, resolution: int, show_progress: bool = True
) -> int:
    """Make sure ``folder`` holds generated class images ``0 .. count-1``; returns how many were made now.

    Image k is generated alone with seed ``gen_cfg.seed + k`` and written atomically (PNG with
    its generation record), so the folder only ever holds complete images and an interrupted
    call, run again, produces exactly the images an uninterrupted one would have.
    """
    from loracraft.infer.generation import generate, save_png

    todo = [k for k in range(count) if not generated_file(folder, k).is_file()]
    for k in tqdm(todo, desc="generating class images", disable=not (show_progress and todo)):
        (out,) = generate(
            pipe, prompt, negative_prompt=gen_cfg.negative_prompt, seed=gen_cfg.seed + k, steps=gen_cfg.steps,
            guidance=gen_cfg.guidance, width=resolution, height=resolution,
        )
        save_png(out.image, out.record, generated_file(folder, k))
    return len(todo)


def base_pipeline(components):
    """A text-to-image pipeline over the (not yet adapted) training components, the base's own
    inference scheduler included: class images are what the base model makes of the class prompt."""
    from loracraft.train.components import inference_pipeline

    c = components  # SD1 or SDXL pipeline, as the base is
    pipe = inference_pipeline(c, c.unet, type(c.inference_scheduler).from_config(c.inference_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- batches
class PairedExamples(torch.utils.data.Dataset):
    """Position ``p`` -> (instance sample at ``p``, class sample at ``class_position(p)``)."""

    def __init__(self, instance: TrainingExamples, klass: TrainingExamples):
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, position: int) -> tuple[dict, dict]:
        return self.instance[position], self.klass[class_position(position)]


def paired_collate(batch: list[tuple[dict, dict]]) -> dict:
    """Instance samples first, then their class samples (the split the loss relies on)."""
    return collate([inst for inst, _ in batch] + [cls for _, cls in batch])


class DreamBooth:
    """The DreamBooth pieces of one run: captions, class images, paired batches, loss.

    Args:
        cfg: the full config (``cfg.dreambooth`` must be set).
        print_fn: where progress lines go (the trainer's main-process printer).
    """

    def __init__(self, cfg: Config, print_fn: Callable[[str], None] = print):
        if cfg.dreambooth is None:
            raise ConfigError("DreamBooth needs a dreambooth section, config, add dreambooth: {instance_prompt: ...}")
        self.cfg, self.db, self._print = cfg, cfg.dreambooth, print_fn
        self.caption = caption_rule(self.db)
        self.user_files: list[Path] = []
        self.class_images: CaptionedImages | None = None

    @property
    def prior(self) -> bool:
        return self.db.prior_preservation

    def dataset_fingerprint(self, instance_fingerprint: str) -> str:
        """The instance set's fingerprint, extended by the user's class images (checked here, before
        any weights load); generated class images are fixed by the config and the base."""
        if not self.prior or self.db.class_data is None:
            return instance_fingerprint
        files = user_class_files(self.db.class_data, self.db.num_class_images)
        self.user_files = check_class_files(files, self.cfg.data.on_error)
        return hashlib.sha256(f"{instance_fingerprint}|class:{fingerprint_files(self.user_files)}".encode()).hexdigest()

    def prepare_class_images(
        self, components, weight_dtype: torch.dtype, base_fingerprint: str, cache_root: Path, build: bool = True,
    ) -> CaptionedImages:
        """The class image set: the user's, then generated ones up to ``num_class_images``.

        Only the process with ``build`` generates; the others list the same files afterwards.
        Must run before the LoRA is injected (the class images are the base model's).
        """
        db = self.db
        missing = db.num_class_images - len(self.user_files)
        folder = class_image_dir(
            cache_root, generation_key(self.cfg, base_fingerprint, weight_dtype, components.inference_scheduler)
        )
        made = 0
        if missing > 0 and build:
            write_json_atomic(folder / "info.json", {
                "what": "DreamBooth class images generated by loracraft with the base model; image k uses seed + k",
                **generation_key(self.cfg, base_fingerprint, weight_dtype, components.inference_scheduler),
            })
            with torch.no_grad():
                made = generate_class_images(
                    base_pipeline(components), folder, missing, db.class_prompt, db.class_generation,
                    self.cfg.data.resolution,
                )
        generated = [generated_file(folder, k) for k in range(max(missing, 0))]
        if build:
            src = f"{len(self.user_files)} from {db.class_data}, " if db.class_data else ""
            self._print(
                f"dreambooth: {len(self.user_files) + len(generated)} class images ({src}{len(generated)} generated "
                f"by the base: {made} now, {len(generated) - made} reused) in {folder}"
            )
        items = [Item(caption=db.class_prompt, path=p) for p in self.user_files + generated]
        self.class_images = CaptionedImages(items, "dreambooth-class", str(folder))
        return self.class_images

    def class_planner(self, seed: int) -> Planner:
        """Sample order and per-sample decisions for the class images (square, at data.resolution)."""
        res = self.cfg.data.resolution
        stream = SampleStream(self.class_images.repeats(), seed)
        return Planner(
            self.class_images, stream, self.cfg.data, seed, [(res, res)] * len(self.class_images), affixes=False
        )

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
             **loss_options) -> torch.Tensor:
        """Prior-preservation loss of a paired batch (first half instance, second half class);
        ``loss_options`` (``loss_type``, ``huber_c``) as :func:`loracraft.train.loss.diffusion_loss`."""
        return prior_preservation_loss(pred, target, pred.shape[0] // 2, self.db.prior_loss_weight, weights,
                                       **loss_options)


__all__ = [
    "DreamBooth", "PairedExamples", "paired_collate", "class_position", "caption_rule", "dreambooth_problems",
    "generate_class_images", "class_image_dir", "generation_key",
]
