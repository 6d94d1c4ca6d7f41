"""The LoRA training recipe: ``LoraTrainer(cfg).setup(); .train(); .cleanup()``.

Shaped like torchtune's single-device recipes: ``setup()`` is a list of one-line helper
calls, ``train()`` reads top to bottom, and nothing in it knows a file format.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loracraft.infer.errors import ConfigError, LoracraftError
from loracraft.infer.formats import tensors_sha256
from loracraft.train import checkpoint as ckpt
from loracraft.train import export, metrics, pipeline, resume, run_dir
from loracraft.train.cache import default_cache_dir
from loracraft.train.components import (
    Components,
    check_base,
    check_rank,
    fingerprint_base,
    inference_pipeline,
    load_for_training,
    reused_pipeline,
)
from loracraft.train.conditioning import conditioning_for
from loracraft.train.config import Config
from loracraft.train.data import Planner, TrainingExamples
from loracraft.train.dreambooth import DreamBooth, dreambooth_problems
from loracraft.train.ema import AdapterEMA
from loracraft.train.lora import init_from, inject_lora, inject_text_encoder_lora, unet_lora_state_dict
from loracraft.train.loss import (
    diffusion_loss,
    loss_options,
    loss_weights,
    mask_options,
    noise_latents,
    sample_latents,
    training_target,
)
from loracraft.train.manifest import scrub
from loracraft.train.optim import build_optimizer, optimizer_problems, param_groups
from loracraft.train.preserve import (
    adapters_disabled,
    per_row_switch_possible,
    predict_with_base,
    preservation_weights,
    preserved_rows,
    select_rows,
)
from loracraft.train.resume import RunAlreadyComplete
from loracraft.train.samples import generate_samples, sample_grid, sample_prompts
from loracraft.train.threads import thread_policy
from loracraft.train.validation import encode_heldout, eval_mode, heldout_loss_of, write_heldout


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
        self.resume_from = resume.start_point(
            self.cfg, self.run_dir, self.accelerator, self.dataset_fingerprint, self._adapter_file(), self._print
        )
        self.c = self._setup_models()
        check_rank(self.c, self.cfg.lora, self.cfg.model.base)  # before the adapter allocates
        self.planner, self.sizes = pipeline.make_planner(self.images, self.cfg, self.accelerator.num_processes, self._print)
        self.sources, plan = pipeline.build_sources(
            self.cfg, self.planner, self.sizes, self.c, self._encode_text, self.accelerator, self.timings, self._print
        )
        self.class_examples, class_plan = pipeline.class_examples(  # DreamBooth prior preservation
            self.cfg, self.dreambooth, self.c, self.weight_dtype, self._fingerprint_base, self._encode_text,
            self.accelerator, self.timings, self._print,
        )
        self.loss_fn = self.dreambooth.loss if self.class_examples is not None else diffusion_loss
        self.heldout = self._setup_heldout()  # while the VAE encoder and text encoders are still loaded
        pipeline.release_cached_encoders(self.c, [plan] if class_plan is None else [plan, class_plan],
                                         validating=bool(self.sample_prompts))
        self.lora_config = inject_lora(self.c.unet, self.cfg.lora)
        self.te_lora_config = inject_text_encoder_lora(self.c.text_encoder, self.cfg.lora)
        self.te2_lora_config = inject_text_encoder_lora(self.c.text_encoder_2, self.cfg.lora)  # SDXL only
        self._init_from()  # lora.init_from: an existing adapter's weights (a resume overrides them)
        self.trainables = self._setup_trainables()
        self.optimizer = self._setup_optimizer()
        self.lr_scheduler = self._setup_lr_scheduler()
        self.ema = self._setup_ema()
        self.unet, self.text_encoder, self.text_encoder_2, self.optimizer = self._prepare()
        self.step = resume.resume(self.cfg, self.resume_from, self.trainables, self.optimizer, self.lr_scheduler,
                                  self.accelerator, self.ema, self._print)
        self.batches = pipeline.batch_iterator(
            self.cfg, self.planner, self.sources, self.class_examples, self.step, self.accelerator, self._print
        )
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
        images, self.heldout_images, self.dataset_fingerprint = pipeline.check_data(
            self.cfg, self.accelerator, self.dreambooth, self._print
        )
        return images

    def _setup_models(self) -> Components:
        c, self.weight_dtype = load_for_training(self.cfg, self.accelerator.device)
        # prompt encoding + UNet inputs (SD1 or SDXL)
        self.conditioning = conditioning_for(c.family, self.cfg.model.clip_skip, self.cfg.data.max_token_length)
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

    def _setup_logging(self) -> None:
        acc = self.accelerator
        self._start_time = time.time()
        if acc.is_main_process:
            metrics.prepare_logs(self.run_dir, self.step)
            self._write_manifest(status="running")
        metrics.init_trackers(acc, self.cfg, self.run_dir)
        self._print(metrics.run_summary(self.trainables, len(self.images), self.cfg, acc.num_processes))

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
        kwargs = self.conditioning.unet_kwargs(text, batch.get("size_cond"))
        prediction_type = c.noise_scheduler.config.prediction_type
        target = training_target(c.noise_scheduler, latents, noise, timesteps, prediction_type)
        weights = loss_weights(c.noise_scheduler, timesteps, t, prediction_type)  # min-SNR, debiased estimation
        rows = self._preserved_rows(batch)  # preserve: these rows learn the base's own prediction
        if rows is None:
            pred = self.unet(noisy, timesteps, **kwargs).sample
        else:
            pred, base = self._with_base_prediction(batch, rows, noisy, timesteps, kwargs)
            target = target.clone()
            target[rows.to(target.device)] = base.to(target.dtype)
            weights = preservation_weights(rows, self.cfg.preserve.weight, weights)
        return self.loss_fn(pred, target, weights, **loss_options(c.noise_scheduler, timesteps, t),
                            **mask_options(batch, pred.shape[-2:], self.cfg.data.unmasked_weight))  # data.masks

    def _preserved_rows(self, batch: dict) -> torch.Tensor | None:
        if (p := self.cfg.preserve) is None:
            return None
        rows = preserved_rows(batch["captions"], p.trigger, p.empty_captions)
        return rows if rows.any() else None

    def _with_base_prediction(self, batch: dict, rows: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                              kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's prediction for every row and the base's (adapters off) for ``rows``."""
        sub, lo = select_rows(batch, rows), self.cfg.lora
        with torch.no_grad(), adapters_disabled(self._text_encoders_with_lora()):
            base_kwargs = self.conditioning.unet_kwargs(self._text(sub), sub.get("size_cond"))
        per_row = per_row_switch_possible(lo.type, lo.use_dora, self.cfg.train.gradient_checkpointing)
        return predict_with_base(self.unet, self.accelerator.unwrap_model(self.unet), noisy, timesteps,
                                 kwargs, base_kwargs, rows, per_row)

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
                self._pending.append((self.step, loss, self.lr_scheduler.get_last_lr()[0]))
                if self.step % metrics.LOG_EVERY == 0:
                    self._flush_logs(bar)
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
    def _flush_logs(self, bar=None) -> None:
        rows, self._pending = self._pending, []
        metrics.log_rows(rows, self.accelerator, self.run_dir, bar)

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
        ckpt.on_every_rank(lambda: acc.is_main_process and ckpt.begin_checkpoint(root, self.step))
        ckpt.on_every_rank(lambda: ckpt.save_rank_state(tmp, acc.process_index))
        ckpt.on_every_rank(lambda: acc.is_main_process and self._commit_checkpoint(tmp, heldout))

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
        metrics.log_heldout(self.accelerator, self.run_dir, self.step, loss)
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
                self._write_report()
        acc.wait_for_everyone()  # no rank still in a collective when the group goes away
        self._release_ddp_wrappers()
        acc.end_training()
        return self._adapter_file()

    def _write_report(self) -> None:
        from loracraft.train.commands.report import write_report

        with reused_pipeline(self.c, self.accelerator.unwrap_model(self.unet)) as pipe:
            self._print(f"report written to {write_report(self.run_dir, pipe=pipe)}")

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


def run_training(cfg: Config) -> Path:
    """The four-line entry point (torchtune style)."""
    trainer = LoraTrainer(cfg)
    trainer.setup()
    trainer.train()
    return trainer.cleanup()


__all__ = ["LoraTrainer", "run_training", "RunAlreadyComplete", "Interrupted", "NonFiniteLoss"]
