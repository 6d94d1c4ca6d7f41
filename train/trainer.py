"""The LoRA training recipe: ``LoraTrainer(cfg).setup(); .train(); .cleanup()``.

Shaped like torchtune's single-device recipes: ``setup()`` is a list of one-line helper
calls, ``train()`` reads top to bottom, and nothing in it knows a file format.
"""

from __future__ import annotations

import contextlib
import gc
import json
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loracraft.infer.errors import ConfigError, LoracraftError, UsageError
from loracraft.infer.formats import tensors_sha256
from loracraft.infer.io import write_text_atomic
from loracraft.train import checkpoint as ckpt
from loracraft.train import export, run_dir
from loracraft.train.cache import CachePlan, build_caches, cache_plan, default_cache_dir
from loracraft.train.components import (
    Components,
    check_base,
    check_rank,
    fingerprint_base,
    freeze_and_cast,
    inference_pipeline,
    load_components,
)
from loracraft.train.conditioning import conditioning_for
from loracraft.train.config import Config, config_diff, normalize_training
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
from loracraft.train.dreambooth import DreamBooth, PairedExamples, dreambooth_problems, paired_collate
from loracraft.train.ema import AdapterEMA
from loracraft.train.lora import init_from, inject_lora, inject_text_encoder_lora, unet_lora_state_dict
from loracraft.train.loss import (
    diffusion_loss,
    loss_options,
    loss_weights,
    noise_latents,
    sample_latents,
    training_target,
    with_zero_terminal_snr,
)
from loracraft.train.manifest import scrub
from loracraft.train.optim import build_optimizer, optimizer_problems, param_groups
from loracraft.train.preserve import (
    adapters_disabled,
    check_trigger,
    preservation_weights,
    preserved_rows,
    select_rows,
)
from loracraft.train.samples import generate_samples, sample_grid, sample_prompts
from loracraft.train.threads import thread_policy
from loracraft.train.validation import (
    encode_heldout,
    eval_mode,
    heldout_images,
    heldout_loss_of,
    write_heldout,
)

LOG_EVERY = 10  # host syncs for logging happen only this often


class RunAlreadyComplete(LoracraftError):
    exit_code = 0


class Interrupted(LoracraftError):
    """SIGINT/SIGTERM arrived; a checkpoint was written. Exit 128 + signal number."""


class NonFiniteLoss(LoracraftError):
    exit_code = 1


def validate_before_load(cfg: Config) -> None:
    """Every check that needs no weights, all problems reported together (litgpt style)."""
    problems = []
    for check in (lambda: check_base(cfg.model.base, cfg.model.config, cfg.model.allow_pickle), lambda: _check_precision(cfg)):
        try:
            check()
        except LoracraftError as e:
            problems += e.problems
    problems += optimizer_problems(cfg.train)
    problems += dreambooth_problems(cfg)
    if problems:
        raise ConfigError(problems[0], problems)


def _check_precision(cfg: Config) -> None:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU and none is available, config, use bf16 or no"
        )


class LoraTrainer:
    def __init__(self, cfg: Config):
        validate_before_load(cfg)
        self.cfg = cfg
        self.sample_prompts = sample_prompts(cfg.validation)  # validation.prompts + prompt_file, checked now
        self.run_dir = Path(cfg.output.dir)
        self.dreambooth = DreamBooth(cfg, self._print) if cfg.dreambooth else None
        self.step = 0  # optimizer steps done; optimizer_step() advances it
        #: Seconds spent in one-time setup work, by name (``cache_s``, ``cache_cpu_s``: the cache fill).
        self.timings: dict[str, float] = {}
        # Filled by setup(), in its order.
        self.accelerator = None
        self.images = None
        self.heldout_images = None  # validation.heldout: a folder, or a fraction of the data set aside
        self.heldout = None  # those images encoded once (main process)
        self.dataset_fingerprint: str | None = None
        self.resume_from: Path | None = None
        self.c: Components | None = None
        self.weight_dtype: torch.dtype | None = None
        self.conditioning = None
        self.sizes: list[tuple[int, int]] | None = None
        self.planner: Planner | None = None
        self.sources: dict | None = None
        self.class_examples: TrainingExamples | None = None
        self.loss_fn = None
        self.lora_config = self.te_lora_config = self.te2_lora_config = None
        self.trainables: dict[str, torch.nn.Parameter] | None = None
        self.optimizer = None
        self.lr_scheduler = None
        self.ema: AdapterEMA | None = None
        self.unet = self.text_encoder = self.text_encoder_2 = None  # accelerate-prepared once set up
        self.batches = None
        self._pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss, lr) not yet logged
        self._start_time = time.time()
        self._base_fp: str | None = None
        self._signal: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        # output.dir is checked before the dataset is read or anything is written.
        run_dir.preflight(self.cfg.output.dir, run_dir.guarded_paths(self.cfg, default_cache_dir()))
        self.accelerator = self._setup_accelerator()
        self.images = self._setup_data()
        self.resume_from = self._setup_run_dir()
        self.c = self._setup_models()
        check_rank(self.c, self.cfg.lora, self.cfg.model.base)  # before the adapter allocates
        self.planner = self._setup_planner()
        self.sources, plan = self._setup_cache(self.planner, self.sizes)
        self.class_examples, class_plan = self._setup_class_examples()  # DreamBooth prior preservation
        self.loss_fn = self.dreambooth.loss if self.class_examples is not None else diffusion_loss
        self.heldout = self._setup_heldout()  # while the VAE encoder and text encoders are still loaded
        self._release_cached_encoders([plan] if class_plan is None else [plan, class_plan])
        self.lora_config = inject_lora(self.c.unet, self.cfg.lora)
        self.te_lora_config = inject_text_encoder_lora(self.c.text_encoder, self.cfg.lora)
        self.te2_lora_config = inject_text_encoder_lora(self.c.text_encoder_2, self.cfg.lora)  # SDXL only
        self._init_from()  # lora.init_from: an existing adapter's weights (a resume overrides them)
        self.trainables = self._setup_trainables()
        self.optimizer = self._setup_optimizer()
        self.lr_scheduler = self._setup_lr_scheduler()
        self.ema = self._setup_ema()
        self.unet, self.text_encoder, self.text_encoder_2, self.optimizer = self._prepare()
        self.step = self._setup_resume()
        self.batches = self._setup_batches()
        self._setup_logging()
        self._validate_at_start()
        self._install_signal_handlers()

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        report_to = list(self.cfg.output.report_to) or None
        acc = Accelerator(
            # Without an accelerator device, accelerate only forms a multi-process (gloo) group
            # under torchrun when told it is on CPU; otherwise every rank trains alone.
            cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
            gradient_accumulation_steps=self.cfg.train.grad_accum,
            mixed_precision=self.cfg.train.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
        )
        set_seed(self.cfg.train.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        return acc

    def _setup_data(self):
        """The dataset, checked like `loracraft check-data` before any weights load (data.on_error)."""
        from loracraft.train.data.check import check_dataset, checked_images, load_tokenizer, with_captions

        d, t, acc = self.cfg.data, self.cfg.train, self.accelerator
        try:
            tokenizer = load_tokenizer(self.cfg.model.base, self.cfg.model.revision)
        except LoracraftError:
            tokenizer = None  # the model load reports the base properly; token counts are advisory
        report = check_dataset(
            d.path, d.resolution, tokenizer, d.image_column, d.caption_column, progress=acc.is_main_process,
            allow_outside_links=d.allow_outside_links,
        )
        if self.dreambooth:  # captions come from dreambooth.instance_prompt
            report = with_captions(report, self.dreambooth.caption)
        images, skipped = checked_images(report, d.on_error)
        images, self.heldout_images = heldout_images(self.cfg, images)  # held-out items never train
        if skipped:
            files = sorted({f.shown_file for f in skipped})
            self._print(
                f"warning: skipped {len(files)} of {report.images} images with errors (data.on_error=skip): "
                + ", ".join(files)
            )
        if report.warnings:
            counts = ", ".join(f"{n} {p}" for p, n in report.counts("warning").items())
            self._print(f"data check: {len(report.warnings)} warnings ({counts}); details: loracraft check-data {d.path}")
        samples = sum(images.repeats())
        if t.batch_size * acc.num_processes > samples:
            per = f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""
            raise ConfigError(
                f"train.batch_size={t.batch_size}{per} is larger than the dataset ({samples} samples per epoch), "
                f"{d.path}, lower train.batch_size to at most {samples // acc.num_processes or 1} or add images"
            )
        if (p := self.cfg.preserve) is not None:
            plain = check_trigger([images.caption(i) for i in range(len(images))], p.trigger, d.path)
            self._print(f"preserve: {plain} of {len(images)} images have captions without {p.trigger!r}; they train "
                        f"toward the base model's own prediction (weight {p.weight:g})")
        self.dataset_fingerprint = images.fingerprint()
        if self.dreambooth:  # plus the user's class images
            self.dataset_fingerprint = self.dreambooth.dataset_fingerprint(self.dataset_fingerprint)
        return images

    def _setup_run_dir(self) -> Path | None:
        """Decide: fresh start, resume (which checkpoint), already complete, or refuse (run_dir.decide)."""
        state = run_dir.inspect(self.run_dir)
        differences = []
        if state.manifest is not None:
            old = state.manifest
            differences = config_diff(normalize_training(old["config_training"]), self.cfg.training_relevant())
            differences = self._check_process_change(
                old["config_training"], old.get("num_processes", 1), differences, warn=False
            )
            if old.get("dataset_fingerprint") != self.dataset_fingerprint:
                differences.append("dataset contents changed (fingerprint differs)")
        decision = run_dir.decide(
            state, differences, overwrite=self.cfg.output.overwrite,
            allow_config_change=self.cfg.checkpoint.allow_config_change, resume=self.cfg.checkpoint.resume,
            checkpoints=self._find_resume_checkpoint(),
        )
        # Every rank has looked at the folder before the main process clears or claims it: a rank that
        # looked later would see a different folder and take another branch (and another collective).
        self.accelerator.wait_for_everyone()
        if isinstance(decision, run_dir.Refuse):
            raise UsageError(decision.reason)
        if isinstance(decision, run_dir.Complete):
            raise RunAlreadyComplete(f"run already complete, {self.run_dir}, adapter at {self._adapter_file()}")
        if isinstance(decision, run_dir.Fresh) and decision.clear:
            self._clear_run_dir()
        if self.accelerator.is_main_process:
            run_dir.claim(self.run_dir)  # the marker goes first: only then is the folder loracraft's
        self.accelerator.wait_for_everyone()
        return decision.checkpoint if isinstance(decision, run_dir.Resume) else None

    def _clear_run_dir(self) -> None:
        """Only the files loracraft wrote go; the folder and anything else in it stay."""
        if self.accelerator.is_main_process:
            removed = run_dir.clear(self.run_dir)
            self._print(f"output.overwrite: removed the previous run's {len(removed)} entries from {self.run_dir}")
        self.accelerator.wait_for_everyone()

    def _find_resume_checkpoint(self) -> list[Path]:
        """The run folder's complete checkpoints, oldest first."""
        return [path for _, path in ckpt.list_checkpoints(self.run_dir / "checkpoints")]

    def _setup_models(self) -> Components:
        m = self.cfg.model
        c = load_components(m.base, m.revision, m.variant, m.config, m.allow_pickle)
        if m.prediction_type:
            c.noise_scheduler.register_to_config(prediction_type=m.prediction_type)
        if self.cfg.train.zero_terminal_snr:
            c.noise_scheduler = with_zero_terminal_snr(c.noise_scheduler)
        multiple = c.size_multiple
        if self.cfg.data.resolution % multiple:
            raise ConfigError(
                f"data.resolution={self.cfg.data.resolution} is not a multiple of {multiple} "
                f"(VAE factor x UNet downsampling of {m.base}), config, use e.g. "
                f"{max(multiple, self.cfg.data.resolution // multiple * multiple)}"
            )
        weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.cfg.train.mixed_precision
        ]
        freeze_and_cast(c, weight_dtype)
        # Stored once: diffusers' `unet.dtype` walks every module (~10 ms per call on SD1.5).
        self.weight_dtype = weight_dtype
        # prompt encoding + UNet inputs (SD1 or SDXL)
        self.conditioning = conditioning_for(c.family, m.clip_skip, self.cfg.data.max_token_length)
        device = self.accelerator.device
        for module in (c.unet, c.vae, *c.text_encoders):
            module.to(device)
        if self.cfg.train.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        return c

    def _init_from(self) -> None:
        path = self.cfg.lora.init_from
        if path is None or self.resume_from is not None:
            return
        c = self.c
        n = init_from(path, {"unet": c.unet, "text_encoder": c.text_encoder if self.te_lora_config else None,
                             "text_encoder_2": c.text_encoder_2 if self.te2_lora_config else None}, self.cfg.lora)
        self._print(f"lora.init_from: {n} layers from {path}; the optimizer starts fresh")

    def _setup_trainables(self) -> dict[str, torch.nn.Parameter]:
        """Name -> LoRA parameter; text-encoder ones are prefixed ``text_encoder.`` (``text_encoder_2.``)."""
        trainables = {n: p for n, p in self.c.unet.named_parameters() if p.requires_grad}
        for prefix, te in (("text_encoder", self.c.text_encoder), ("text_encoder_2", self.c.text_encoder_2)):
            if te is not None:
                trainables.update({f"{prefix}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        for p in trainables.values():
            p.data = p.data.float()  # LoRA weights in fp32 even under mixed precision
        return trainables

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        t, acc = self.cfg.train, self.accelerator
        lr = t.lr * (t.batch_size * acc.num_processes * t.grad_accum if t.scale_lr else 1)
        if t.scale_lr:
            self._print(f"train.scale_lr: learning rate {t.lr:g} x effective batch = {lr:g}")
        te_lr = t.text_encoder_lr * lr / t.lr if t.text_encoder_lr else None  # scale_lr applies to both
        return build_optimizer(t, param_groups(self.trainables, lr, t.loraplus_lr_ratio, te_lr), lr)

    def _prepare(self):
        """accelerate-wrap the trained models (DDP refuses a model with nothing to train)."""
        acc, c = self.accelerator, self.c
        if self.te_lora_config is None:
            unet, optimizer = acc.prepare(c.unet, self.optimizer)
            return unet, c.text_encoder, c.text_encoder_2, optimizer
        if c.text_encoder_2 is None:
            unet, te, optimizer = acc.prepare(c.unet, c.text_encoder, self.optimizer)
            return unet, te, None, optimizer
        return acc.prepare(c.unet, c.text_encoder, c.text_encoder_2, self.optimizer)

    def _setup_lr_scheduler(self):
        from diffusers.optimization import get_scheduler

        t = self.cfg.train
        return get_scheduler(
            t.lr_scheduler, self.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
        )

    def _setup_ema(self) -> AdapterEMA | None:
        t = self.cfg.train
        return AdapterEMA(self.trainables, t.ema_decay, t.ema_every) if t.ema_decay is not None else None

    def _setup_resume(self) -> int:
        if self.resume_from is None:
            return 0
        state = ckpt.read_state(self.resume_from)
        diff = config_diff(normalize_training(state["config_training"]), self.cfg.training_relevant())
        diff = self._check_process_change(state["config_training"], state.get("num_processes", 1), diff)
        if diff and not self.cfg.checkpoint.allow_config_change:
            raise UsageError(
                f"config differs from the checkpoint's, {self.resume_from}: {'; '.join(diff)}; "
                "restore those values or set checkpoint.allow_config_change=true"
            )
        state = ckpt.load_checkpoint(
            self.resume_from,
            self.trainables,
            self.optimizer.optimizer,
            self.lr_scheduler,
            rank=self.accelerator.process_index,
            scaler=self.accelerator.scaler,
            ema=self.ema.shadow if self.ema is not None else None,
        )
        if self.ema is not None and not state["ema_restored"]:
            self._print("EMA not in the checkpoint (train.ema_decay was just enabled): starting it at the resumed weights")
            self.ema.reset(self.trainables)
        self._print(f"resuming from {self.resume_from} (step {state['step']})")
        return int(state["step"])

    def _setup_planner(self) -> Planner:
        """Target size per image (one square, or its aspect-ratio bucket) and the sample order."""
        d, t, acc = self.cfg.data, self.cfg.train, self.accelerator
        n = len(self.images)
        self.sizes = [self.images.size(i) for i in range(n)]
        if d.buckets:
            buckets = make_buckets(d.resolution, d.bucket_step)
            targets = [assign_bucket(s, buckets) for s in self.sizes]
            stream = BucketedStream(self.images.repeats(), t.seed, targets, t.batch_size * acc.num_processes)
            self._print(f"{len(set(targets))} aspect-ratio buckets in use: {sorted(set(targets))}")
        else:
            targets = [(d.resolution, d.resolution)] * n
            stream = SampleStream(self.images.repeats(), t.seed)
        return Planner(self.images, stream, d, t.seed, targets)

    def _setup_cache(self, planner: Planner, sizes: list[tuple[int, int]]) -> tuple[dict, CachePlan]:
        """Latent / text-embedding lookups from the on-disk cache (main process builds, others wait),
        and the plan that says what is cached. The training images; DreamBooth's class images too.
        Time spent adds up in ``timings["cache_s"]`` (wall) and ``timings["cache_cpu_s"]``."""
        plan = cache_plan(self.cfg, sizes, planner.targets)
        for note in plan.notes:
            self._print(note)
        if not (plan.latents or plan.text):
            return {}, plan
        acc = self.accelerator
        wall, cpu = time.perf_counter(), time.process_time()
        sources = build_caches(
            plan, planner, self.c, self._encode_text, acc.device,
            build=acc.is_main_process, show_progress=acc.is_main_process,
        )
        acc.wait_for_everyone()
        self.timings["cache_s"] = self.timings.get("cache_s", 0.0) + time.perf_counter() - wall
        self.timings["cache_cpu_s"] = self.timings.get("cache_cpu_s", 0.0) + time.process_time() - cpu
        return sources, plan

    def _setup_class_examples(self) -> tuple[TrainingExamples | None, CachePlan | None]:
        """DreamBooth prior preservation: the class images (generated with the base model, so before
        the LoRA exists; main process first, the others then list the same files) and their samples,
        cached like the training images; (None, None) otherwise."""
        if not (self.dreambooth and self.dreambooth.prior):
            return None, None
        acc, t = self.accelerator, self.cfg.train
        root = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
        with acc.main_process_first():
            images = self.dreambooth.prepare_class_images(
                self.c, self.weight_dtype, self._fingerprint_base(), root, build=acc.is_main_process
            )
        planner = self.dreambooth.class_planner(t.seed)
        sources, plan = self._setup_cache(planner, [images.size(i) for i in range(len(images))])
        return TrainingExamples(planner, **sources), plan

    def _release_cached_encoders(self, plans: list[CachePlan]) -> None:
        """Free the weights the cache made dead: the VAE encoder once every latent is cached, and
        the VAE decoder and text encoder too when no validation images need them (kohya moves
        cached encoders off the GPU for the same reason). Moved to the meta device rather than
        deleted, so an accidental use fails loudly instead of silently computing garbage.
        Every image set's plan counts (DreamBooth's class images have their own)."""
        c, validating = self.c, bool(self.sample_prompts)
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

    def _check_process_change(self, old_training: dict, old_p: int, diff: list[str], warn: bool = True) -> list[str]:
        """A different process count is fine when the effective batch is unchanged: samples are
        keyed by global position, so every step sees the same samples with the same noise; only
        the order of the gradient all-reduce differs (not bit-identical, ~1e-7 relative)."""
        t, acc = self.cfg.train, self.accelerator
        old_p = int(old_p)
        old_t = old_training.get("train", {})
        old_eff = int(old_t.get("batch_size", t.batch_size)) * old_p * int(old_t.get("grad_accum", t.grad_accum))
        new_eff = t.batch_size * acc.num_processes * t.grad_accum
        if old_p == acc.num_processes:
            return diff
        if old_eff == new_eff:
            if warn:
                self._print(
                    f"warning: resuming a {old_p}-process run on {acc.num_processes} processes; same samples "
                    "and noise per step, but gradients are summed in a different order, so the result is "
                    "close to, not bit-identical with, an uninterrupted run"
                )
            return [d for d in diff if not d.startswith("train.batch_size:")]
        return diff + [
            f"effective batch: {old_eff} ({old_p} processes) -> {new_eff} ({acc.num_processes} processes); "
            f"keep batch_size x processes x grad_accum = {old_eff}"
        ]

    def _setup_batches(self):
        examples, collate_fn = TrainingExamples(self.planner, **self.sources), collate
        if self.class_examples is not None:  # each instance sample with its class sample
            examples, collate_fn = PairedExamples(examples, self.class_examples), paired_collate
        acc = self.accelerator
        return iter(
            make_batches(
                examples,
                start_micro_step=self.step * self.cfg.train.grad_accum,
                batch_size=self.cfg.train.batch_size,
                num_processes=acc.num_processes,
                rank=acc.process_index,
                num_workers=loader_workers(self.cfg.data.num_workers, examples, self._print),
                collate_fn=collate_fn,
            )
        )

    def _setup_logging(self) -> None:
        acc = self.accelerator
        self._start_time = time.time()
        if acc.is_main_process:
            (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.run_dir / "logs" / "metrics.jsonl", after_step=self.step)
            self._write_manifest(status="running")
        flat = _flatten(scrub(self.cfg.dump()))
        init_kwargs = {"wandb": {"dir": str(self.run_dir / "logs"), "name": self.run_dir.name}}
        acc.init_trackers("loracraft", config=flat, init_kwargs=init_kwargs)
        t = self.cfg.train
        self._print(
            f"training {len(self.trainables)} LoRA tensors "
            f"({sum(p.numel() for p in self.trainables.values()):,} params) on {len(self.images)} images; "
            f"effective batch {t.batch_size} x {acc.num_processes} processes x {t.grad_accum} accumulation "
            f"= {t.batch_size * acc.num_processes * t.grad_accum}"
        )

    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    # ------------------------------------------------------------------ step
    def train_step(self, batch: dict) -> torch.Tensor:
        """One micro-batch: loss, then backward (scaled by accelerate for accumulation)."""
        loss = self.compute_loss(batch)
        self.accelerator.backward(loss)
        return loss.detach()

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """encode -> keyed noise and timesteps -> noisy latents -> UNet -> weighted MSE."""
        c, t = self.c, self.cfg.train
        positions = batch["positions"].tolist()
        with torch.no_grad():
            latents = self._latents(batch, positions)
        text = self._text(batch)  # with grad: the text encoder may carry a LoRA (lora.text_encoder)
        noise, timesteps, noisy = noise_latents(c.noise_scheduler, latents, positions, t)  # train.* noise controls
        pred = self.unet(noisy, timesteps, **self.conditioning.unet_kwargs(text, batch.get("size_cond"))).sample
        prediction_type = c.noise_scheduler.config.prediction_type
        target = training_target(c.noise_scheduler, latents, noise, timesteps, prediction_type)
        weights = loss_weights(c.noise_scheduler, timesteps, t, prediction_type)  # min-SNR, debiased estimation
        if self.cfg.preserve is not None:
            target, weights = self._preserve_base(batch, noisy, timesteps, target, weights)
        return self.loss_fn(pred, target, weights, **loss_options(c.noise_scheduler, timesteps, t))

    def _preserve_base(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor,
                       target: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows without the trigger learn the base's own prediction (adapters off), weighted (``preserve``)."""
        p = self.cfg.preserve
        rows = preserved_rows(batch["captions"], p.trigger, p.empty_captions)
        if not rows.any():
            return target, weights
        sub, on = select_rows(batch, rows), rows.to(noisy.device)
        unwrap = self.accelerator.unwrap_model
        with torch.no_grad(), adapters_disabled([unwrap(self.unet), *self._text_encoders_with_lora()]):
            kwargs = self.conditioning.unet_kwargs(self._text(sub), sub.get("size_cond"))
            base = unwrap(self.unet)(noisy[on], timesteps[on], **kwargs).sample
        target = target.clone()
        target[on] = base.to(target.dtype)
        return target, preservation_weights(rows, p.weight, weights)

    def _text_encoders_with_lora(self) -> list[torch.nn.Module]:
        unwrap = self.accelerator.unwrap_model
        pairs = ((self.te_lora_config, self.text_encoder), (self.te2_lora_config, self.text_encoder_2))
        return [unwrap(te) for config, te in pairs if config is not None]

    def _latents(self, batch: dict, positions: list[int]) -> torch.Tensor:
        """Scaled latents: a keyed sample of the cached posterior, or of a fresh VAE encode."""
        vae, device = self.c.vae, self.accelerator.device
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            dist = vae.encode(batch["pixel_values"].to(device).float()).latent_dist
            mean, std = dist.mean, dist.std
        latents = sample_latents(mean, std, positions, self.cfg.train.seed)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.weight_dtype)

    def _text(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"text_embeds": ..., ["pooled_text_embeds": ...]}`` from the cache or the encoder(s)."""
        if "text_embeds" in batch:
            return {k: batch[k].to(self.accelerator.device, self.weight_dtype) for k in self.conditioning.text_keys}
        return self._encode_text(batch["captions"])

    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        c = self.c
        # While the cache is built (before _prepare) the plain modules; afterwards the prepared ones.
        prepared = self.unet is not None
        encoders = [self.text_encoder, self.text_encoder_2] if prepared else [c.text_encoder, c.text_encoder_2]
        return self.conditioning.encode_prompt(
            [c.tokenizer, c.tokenizer_2], encoders[: len(c.text_encoders)], captions, self.accelerator.device
        )

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        t = self.cfg.train
        bar = tqdm(
            total=t.max_steps, initial=self.step, disable=not self.accelerator.is_main_process, desc="train"
        )
        pace = thread_policy(t.threads, self.accelerator.device, self._print)
        try:  # the bar is closed before any error is printed, so the error starts its own line
            while self.step < t.max_steps:
                loss = pace.timed(self.optimizer_step)  # train.threads=auto times each step
                bar.update(1)
                self._record(loss, bar)
                if self.step % self.cfg.checkpoint.every == 0 or self._signal is not None:
                    self._checkpoint()
                if self.sample_prompts and self.step % self.cfg.validation.every == 0:
                    self.validate()
                if self._signal is not None:
                    self._stop_on_signal()
        finally:
            bar.close()
        self._flush_logs()

    def optimizer_step(self) -> torch.Tensor:
        """One training step: ``grad_accum`` micro-batches, then clip + optimizer + LR scheduler (+ EMA).

        Returns the loss averaged over micro-batches and processes. Whether it is finite is decided
        from that reduced value, so every rank takes the same branch: all update, or (train.on_nan)
        all skip the update or all stop. The step counter advances either way: a skipped batch is
        consumed, and the data position is keyed by the step.
        """
        acc, t = self.accelerator, self.cfg.train
        total = torch.zeros((), device=acc.device)
        for _ in range(t.grad_accum):
            with acc.accumulate(*self._trained_models()):
                total += self.train_step(next(self.batches))
        loss = acc.reduce(total / t.grad_accum, reduction="mean")
        self.step += 1
        if bool(torch.isfinite(loss)):
            if t.max_grad_norm:
                acc.clip_grad_norm_(list(self.trainables.values()), t.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.trainables, self.step)
        else:
            # No optimizer.step(): with fp16 the GradScaler would find no inf checks recorded.
            self._non_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _trained_models(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    def _non_finite(self, loss: torch.Tensor) -> None:
        """train.on_nan: skip (warn; the caller drops the gradients) or stop with the same error on every rank."""
        if self.cfg.train.on_nan == "skip":
            self._print(f"warning: non-finite loss at step {self.step}; batch skipped (train.on_nan=skip)")
            return
        last = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        keep = f"last good checkpoint kept at {last[-1][1]}" if last else "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"loss became {float(loss)} at step {self.step}, {self.run_dir}, lower train.lr, set "
            f"train.max_grad_norm, or set train.on_nan=skip; {keep}"
        )

    # ------------------------------------------------------------------ side effects
    def _record(self, loss: torch.Tensor, bar) -> None:
        self._pending.append((self.step, loss, self.lr_scheduler.get_last_lr()[0]))
        if self.step % LOG_EVERY == 0:
            self._flush_logs(bar)

    def _flush_logs(self, bar=None) -> None:
        if not self._pending:
            return
        rows = [{"step": s, "loss": float(loss), "lr": lr} for s, loss, lr in self._pending]
        self._pending = []
        for row in rows:
            self.accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=row["step"])
        if bar is not None:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}")
        if self.accelerator.is_main_process:
            with open(self.run_dir / "logs" / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    def _checkpoint(self) -> None:
        """Every rank writes its RNG into the main process's temp dir; main adds the shared state and
        this step's adapter files and renames it into place. A failed write anywhere stops every rank
        with the same error (no rank left waiting in a collective)."""
        self._flush_logs()
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        heldout = self._log_heldout()  # main process; None without validation.heldout
        acc.wait_for_everyone()
        tmp = ckpt.temp_dir(root, self.step)
        self._on_every_rank(lambda: acc.is_main_process and ckpt.begin_checkpoint(root, self.step))
        self._on_every_rank(lambda: ckpt.save_rank_state(tmp, acc.process_index))
        self._on_every_rank(lambda: acc.is_main_process and self._commit_checkpoint(tmp, heldout))

    def _commit_checkpoint(self, tmp: Path, heldout: float | None = None) -> None:
        acc, t = self.accelerator, self.cfg.train
        state = {
            "config": scrub(self.cfg.dump()),
            "config_training": self.cfg.training_relevant(),
            "num_processes": acc.num_processes,
            "effective_batch": t.batch_size * acc.num_processes * t.grad_accum,
            "samples_seen": self.step * t.grad_accum * t.batch_size * acc.num_processes,
        }
        ckpt.commit_checkpoint(
            tmp, self.step, self.trainables, self.optimizer.optimizer, self.lr_scheduler, state, acc.scaler,
            ema=self.ema.shadow if self.ema is not None else None,
            export=lambda folder: (
                self._export(folder, self._final_states(), step=self.step),
                heldout is not None and write_heldout(folder, self.step, heldout),
            ),
        )
        ckpt.prune_checkpoints(tmp.parent, self.cfg.checkpoint.keep)

    def _on_every_rank(self, write) -> None:
        """Run a checkpoint write; if it failed on any rank, every rank raises that rank's error."""
        from accelerate.utils import gather_object

        try:
            write()
            message = None
        except ckpt.CheckpointError as e:
            message = str(e)
        failed = [m for m in gather_object([message]) if m]
        if failed:
            raise ckpt.CheckpointError(failed[0])

    def _stop_on_signal(self) -> None:
        name = signal.Signals(self._signal).name
        err = Interrupted(
            f"stopped by {name} at step {self.step}, checkpoint written to {self.run_dir / 'checkpoints'}, "
            f"run the same command again to resume"
        )
        err.exit_code = 128 + self._signal
        raise err

    def validate(self) -> Path | None:
        """Generate the validation prompts with a fixed seed; main process only, others wait."""
        acc, v = self.accelerator, self.cfg.validation
        path = None
        if acc.is_main_process:
            with self._ema_weights(v.use_ema):
                rows = self._generate(self.sample_prompts)
            path = self.run_dir / "samples" / f"step-{self.step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            sample_grid(rows).save(path)
        acc.wait_for_everyone()
        return path

    def _setup_heldout(self):
        """The held-out set encoded once, on the main process only (no collective: nothing to deadlock)."""
        if self.heldout_images is None or not self.accelerator.is_main_process:
            return None
        self._print(f"validation.heldout: {len(self.heldout_images)} held-out images, loss at step 0 and every checkpoint")
        return encode_heldout(self.heldout_images, self.cfg.data.resolution, self.c.vae, self._encode_text, self.weight_dtype)

    def _log_heldout(self) -> float | None:
        """The held-out loss of the adapter this step's checkpoint exports; logged like the training loss."""
        if self.heldout is None:
            return None
        c, device = self.c, self.accelerator.device
        encode = None
        if self.te_lora_config is not None:  # a trained text encoder changes the embeddings; plain modules, no DDP
            def encode(captions):
                return self.conditioning.encode_prompt([c.tokenizer, c.tokenizer_2], c.text_encoders, captions, device)
        with self._ema_weights(self.cfg.output.export_ema == "replace"), eval_mode(*c.text_encoders):
            loss = heldout_loss_of(self.accelerator.unwrap_model(self.unet), c.noise_scheduler, self.heldout,
                                   self.conditioning.unet_kwargs, encode_text=encode)
        self.accelerator.log({"heldout_loss": loss}, step=self.step)
        with open(self.run_dir / "logs" / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": self.step, "heldout_loss": loss}) + "\n")
        self._print(f"held-out loss at step {self.step}: {loss:.5f}")
        return loss

    def _validate_at_start(self) -> None:
        """Step 0 of a fresh run: the held-out loss of the untrained adapter (and samples with validation.at_start)."""
        if self.step == 0:
            self._log_heldout()
            if self.cfg.validation.at_start and self.sample_prompts:
                self.validate()

    def _generate(self, prompts) -> list[list]:
        """Validation images through ``loracraft.infer.generation`` (the code users generate with),
        with the base's own inference scheduler and fixed seeds (``samples.generate_samples``)."""
        pipe = inference_pipeline(self.c, self.accelerator.unwrap_model(self.unet))
        pipe.set_progress_bar_config(disable=True)
        return generate_samples(pipe, prompts, self.cfg.validation, self.cfg.data.resolution)

    # ------------------------------------------------------------------ finish
    def cleanup(self) -> Path:
        """Final adapter files + manifest (main process), trackers closed."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        variants = self._final_states()
        # Every rank's hash goes into the manifest: DDP replicas must hold identical weights.
        rank_hashes = gather_object([tensors_sha256(variants[False].flat())])
        if acc.is_main_process:
            written = self._export(self.run_dir, variants)
            self._write_manifest("complete", weights_sha256=rank_hashes[0], rank_weights_sha256=rank_hashes)
            self._print(f"adapter written to {self.run_dir}: {', '.join(p.name for p in written)}")
            if self.cfg.output.report:
                from loracraft.train.commands.report import write_report

                self._print(f"report written to {write_report(self.run_dir)}")
        acc.wait_for_everyone()  # no rank still in a collective when the group goes away
        self._release_ddp_wrappers()
        acc.end_training()
        return self._adapter_file()

    def _export(self, folder: Path, variants: dict[bool, export.AdapterStates], step: int | None = None) -> list[Path]:
        """The shared adapter files (diffusers + kohya, or LyCORIS) of the final run or of a checkpoint."""
        lo = self.cfg.lora
        configs = [c.to_dict() if c is not None else None for c in (self.lora_config, self.te_lora_config,
                                                                     self.te2_lora_config)]
        shape = export.AdapterShape(lo.type, lo.rank, lo.alpha, *configs, unet_config=dict(self.c.unet.config))
        metadata = export.adapter_metadata(
            self.cfg, family=self.c.family, step=self.step, num_images=len(self.images),
            num_reg_images=len(self.dreambooth.class_images) if self.class_examples is not None else 0,
            dataset_fingerprint=self.dataset_fingerprint,
        )
        return export.export(folder, export.run_name(self.run_dir), variants, shape, metadata, step=step)

    def _release_ddp_wrappers(self) -> None:
        """DDP's reducer keeps the process group alive; left to interpreter teardown, gloo's
        worker threads can abort a rank (SIGABRT, "terminate called without an active
        exception") after a successful run. Unwrap and free them while Python is still whole."""
        unwrap = self.accelerator.unwrap_model
        self.unet = unwrap(self.unet)
        self.text_encoder = unwrap(self.text_encoder) if self.text_encoder is not None else None
        self.text_encoder_2 = unwrap(self.text_encoder_2) if self.text_encoder_2 is not None else None
        self.accelerator.free_memory()

    def _adapter_file(self) -> Path:
        return export.main_file(self.run_dir, self.cfg.lora.type)

    def _ema_weights(self, use: bool = True):
        """Context: the model holds the EMA weights inside (if EMA is on and ``use``), its own after."""
        return self.ema.applied(self.trainables) if (self.ema is not None and use) else contextlib.nullcontext()

    def _final_states(self) -> dict[bool, export.AdapterStates]:
        """``{is_ema: states}`` to export: the trained weights, and the EMA's (output.export_ema)."""
        trained = self._adapter_states()
        if self.ema is None:
            return {False: trained}
        with self._ema_weights():
            averaged = self._adapter_states(copy=True)  # copies: the weights are restored on exit
        return {False: averaged} if self.cfg.output.export_ema == "replace" else {False: trained, True: averaged}

    def _adapter_states(self, copy: bool = False) -> export.AdapterStates:
        unwrap = self.accelerator.unwrap_model

        def state(model, trained) -> dict | None:
            if not trained:
                return None
            return {k: v.clone() if copy else v for k, v in unet_lora_state_dict(unwrap(model)).items()}

        return export.AdapterStates(
            state(self.unet, True),
            state(self.text_encoder, self.te_lora_config),
            state(self.text_encoder_2, self.te2_lora_config),
        )

    def _write_manifest(self, status: str, weights_sha256: str | None = None,
                        rank_weights_sha256: list[str] | None = None) -> None:
        export.write_manifest(
            self.run_dir, self.cfg, status=status, step=self.step, num_processes=self.accelerator.num_processes,
            dataset_fingerprint=self.dataset_fingerprint, base_fingerprint=self._fingerprint_base(),
            started=self._start_time, weights_sha256=weights_sha256, rank_weights_sha256=rank_weights_sha256,
            adapter=self._adapter_file().name if weights_sha256 else None,
        )

    def _fingerprint_base(self) -> str:
        if self._base_fp is None:
            self._base_fp = fingerprint_base(self.cfg.model.base)
        return self._base_fp

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(f"loracraft: {msg}", file=sys.stderr)


def _truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: they will be logged again."""
    if not path.is_file():
        return
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    kept = [r for r in rows if json.loads(r)["step"] <= after_step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(r + "\n" for r in kept))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def run_training(cfg: Config) -> Path:
    """The four-line entry point (torchtune style)."""
    trainer = LoraTrainer(cfg)
    trainer.setup()
    trainer.train()
    return trainer.cleanup()


__all__ = ["LoraTrainer", "run_training", "RunAlreadyComplete", "Interrupted", "NonFiniteLoss"]
