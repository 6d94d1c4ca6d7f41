"""The training data pipeline, set up once per run: the checked dataset, the per-image target
sizes and sample order, the on-disk caches, DreamBooth's class examples, and the batch iterator.

Plain functions the recipe (:class:`loracraft.train.trainer.LoraTrainer`) calls from ``setup()``;
each takes what it needs, so the recipe reads as a list of steps.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

from loracraft.infer.errors import ConfigError, LoracraftError
from loracraft.train.cache import CachePlan, build_caches, cache_plan, default_cache_dir
from loracraft.train.components import Components
from loracraft.train.config import Config
from loracraft.train.data import (
    BucketedStream,
    Planner,
    SampleStream,
    TrainingExamples,
    assign_bucket,
    collate,
    loader_workers,
    make_batches,
    make_buckets,
)
from loracraft.train.dreambooth import PairedExamples, paired_collate
from loracraft.train.preserve import check_trigger
from loracraft.train.validation import heldout_images


def check_data(cfg: Config, acc, dreambooth, print_: Callable[[str], None]):
    """The dataset, checked like `loracraft check-data` before any weights load (data.on_error).
    Returns ``(images, held-out images or None, dataset fingerprint)``."""
    from loracraft.train.data.check import (
        check_dataset,
        checked_images,
        load_tokenizer,
        print_check_summary,
        with_captions,
    )
    from loracraft.train.data.concepts import check_concepts_for_training, concepts_fingerprint
    from loracraft.train.data.masks import attach_masks

    d, t = cfg.data, cfg.train
    try:
        tokenizer = load_tokenizer(cfg.model.base, cfg.model.revision)
    except LoracraftError:
        tokenizer = None  # the model load reports the base properly; token counts are advisory
    if d.concepts:  # several datasets: each checked alike, its problems named by its path
        images, skipped, report = check_concepts_for_training(d, tokenizer, acc.is_main_process, print_), [], None
    else:
        report = check_dataset(
            d.path, d.resolution, tokenizer, d.image_column, d.caption_column, progress=acc.is_main_process,
            allow_outside_links=d.allow_outside_links, masks=d.masks, caption_prefix=d.caption_prefix,
            caption_suffix=d.caption_suffix, max_token_length=d.max_token_length,
        )
        if dreambooth:  # captions come from dreambooth.instance_prompt
            report = with_captions(report, dreambooth.caption)
        images, skipped = checked_images(report, d.on_error)
    where = d.path or images.root
    images, heldout = heldout_images(cfg, images)  # held-out items never train
    if attach_masks(images, d.masks).masks is not None:  # data.masks: the loss masks of the training images
        how = "their alpha channel" if images.masks.alpha else d.masks
        print_(f"loss masks: {len(images)} images masked by {how}; black pixels weigh {d.unmasked_weight:g}")
    if report is not None:  # (concepts report their own, per concept)
        print_check_summary(sorted({f.shown_file for f in skipped}), report.images, [(None, d.path, report)], print_)
    samples = sum(images.repeats())
    if t.batch_size * acc.num_processes > samples:
        per = f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""
        raise ConfigError(
            f"train.batch_size={t.batch_size}{per} is larger than the dataset ({samples} samples per epoch), "
            f"{where}, lower train.batch_size to at most {samples // acc.num_processes or 1} or add images"
        )
    if (p := cfg.preserve) is not None:
        plain = check_trigger([images.caption(i) for i in range(len(images))], p.trigger, where)
        print_(f"preserve: {plain} of {len(images)} images have captions without {p.trigger!r}; they train "
               f"toward the base model's own prediction (weight {p.weight:g})")
    fingerprint = concepts_fingerprint(images) if d.concepts else images.fingerprint()
    if images.masks is not None:  # a changed mask changes what trains
        fingerprint = images.masks.fingerprint(images, fingerprint)
    if dreambooth:  # plus the user's class images
        fingerprint = dreambooth.dataset_fingerprint(fingerprint)
    return images, heldout, fingerprint


def make_planner(images, cfg: Config, num_processes: int, print_: Callable[[str], None]):
    """Target size per image (one square, or its aspect-ratio bucket) and the sample order.
    Returns ``(planner, each image's own size)``."""
    d, t = cfg.data, cfg.train
    n = len(images)
    sizes = [images.size(i) for i in range(n)]
    if d.concepts:  # per-concept settings and resolutions
        from loracraft.train.data.concepts import concept_planner

        return concept_planner(images, cfg, sizes, num_processes, print_), sizes
    if d.buckets:
        buckets = make_buckets(d.resolution, d.bucket_step)
        targets = [assign_bucket(s, buckets) for s in sizes]
        stream = BucketedStream(images.repeats(), t.seed, targets, t.batch_size * num_processes)
        print_(f"{len(set(targets))} aspect-ratio buckets in use: {sorted(set(targets))}")
    else:
        targets = [(d.resolution, d.resolution)] * n
        stream = SampleStream(images.repeats(), t.seed)
    return Planner(images, stream, d, t.seed, targets), sizes


def build_sources(
    cfg: Config, planner: Planner, sizes: list[tuple[int, int]], c: Components, encode_text, acc,
    timings: dict[str, float], print_: Callable[[str], None],
) -> tuple[dict, CachePlan]:
    """Latent / text-embedding lookups from the on-disk cache (main process builds, others wait),
    and the plan that says what is cached. The training images; DreamBooth's class images too.
    Time spent adds up in ``timings["cache_s"]`` (wall) and ``timings["cache_cpu_s"]``."""
    plan = cache_plan(cfg, sizes, planner.targets, [planner.settings(i).center_crop for i in range(len(sizes))])
    for note in plan.notes:
        print_(note)
    if not (plan.latents or plan.text):
        return {}, plan
    wall, cpu = time.perf_counter(), time.process_time()
    sources = build_caches(
        plan, planner, c, encode_text, acc.device,
        build=acc.is_main_process, show_progress=acc.is_main_process,
    )
    acc.wait_for_everyone()
    timings["cache_s"] = timings.get("cache_s", 0.0) + time.perf_counter() - wall
    timings["cache_cpu_s"] = timings.get("cache_cpu_s", 0.0) + time.process_time() - cpu
    return sources, plan


def class_examples(
    cfg: Config, dreambooth, c: Components, weight_dtype, base_fingerprint: Callable[[], str], encode_text, acc,
    timings: dict[str, float], print_: Callable[[str], None],
) -> tuple[TrainingExamples | None, CachePlan | None]:
    """DreamBooth prior preservation: the class images (generated with the base model, so before
    the LoRA exists; main process first, the others then list the same files) and their samples,
    cached like the training images; (None, None) otherwise."""
    if not (dreambooth and dreambooth.prior):
        return None, None
    t = cfg.train
    root = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
    with acc.main_process_first():
        images = dreambooth.prepare_class_images(c, weight_dtype, base_fingerprint(), root, build=acc.is_main_process)
    planner = dreambooth.class_planner(t.seed)
    sizes = [images.size(i) for i in range(len(images))]
    sources, plan = build_sources(cfg, planner, sizes, c, encode_text, acc, timings, print_)
    return TrainingExamples(planner, **sources), plan


def release_cached_encoders(c: Components, plans: list[CachePlan], validating: bool) -> None:
    """Free the weights the cache made dead: the VAE encoder once every latent is cached, and
    the VAE decoder and text encoder too when no validation images need them (kohya moves
    cached encoders off the GPU for the same reason). Moved to the meta device rather than
    deleted, so an accidental use fails loudly instead of silently computing garbage.
    Every image set's plan counts (DreamBooth's class images have their own)."""
    latents, text = all(p.latents for p in plans), all(p.text for p in plans)
    dead = []
    # StableDiffusionXLPipeline moves latents to the VAE's device, which diffusers reads from its
    # first parameter (the encoder's): while validation decodes images, the SDXL encoder stays.
    if latents and not (validating and c.family == "sdxl"):
        dead += [c.vae.encoder, getattr(c.vae, "quant_conv", None)]
    if latents and not validating:
        dead += [c.vae.decoder, getattr(c.vae, "post_quant_conv", None)]
    if text and not validating:
        dead += c.text_encoders
    for module in filter(None, dead):
        module.to("meta")
    gc.collect()


def batch_iterator(
    cfg: Config, planner: Planner, sources: dict, class_examples: TrainingExamples | None, step: int, acc,
    print_: Callable[[str], None],
):
    """The batches from optimizer step ``step`` on (a resume continues at the same sample)."""
    examples, collate_fn = TrainingExamples(planner, **sources), collate
    if class_examples is not None:  # each instance sample with its class sample
        examples, collate_fn = PairedExamples(examples, class_examples), paired_collate
    return iter(
        make_batches(
            examples,
            start_micro_step=step * cfg.train.grad_accum,
            batch_size=cfg.train.batch_size,
            num_processes=acc.num_processes,
            rank=acc.process_index,
            num_workers=loader_workers(cfg.data.num_workers, examples, print_),
            collate_fn=collate_fn,
        )
    )
