"""The training config's schema: one pydantic model per YAML section, each key with its type,
bounds and help text (``loracraft train --help-config`` prints the ``description``s).

``extra="forbid"`` gives unknown-key detection; :mod:`loracraft.train.config` turns the
validation errors into one line per problem and applies command-line overrides.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

#: Bounds that keep a typo from reaching numpy or allocating gigabytes. accelerate's set_seed
#: seeds numpy, whose seeds stop at 2**32; generation seeds feed torch generators (2**63) with
#: +k per image, hence the lower cap.
TRAIN_SEED_LIMIT = 2**32
GENERATION_SEED_LIMIT = 2**62
MAX_RESOLUTION = 8192  # pixels per side; SDXL trains at 1024, 8192 is 64x its latents
MAX_RANK = 4096  # the model check (rank <= the targeted layers' smaller side) is stricter
TRANSFORMER_TARGETS = ATTN_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Section):
    base: str = Field(
        description="diffusers model folder, hub id, or single-file .safetensors checkpoint (SD1/SD2/SDXL, "
        "with model.config) (required)"
    )
    config: str | None = Field(
        None, description="for a single-file model.base: a diffusers folder of the same architecture "
        "(model_index.json + component configs; weights not needed); nothing is fetched from the hub",
    )
    allow_pickle: bool = Field(
        False, description="allow a pickle single-file model.base (.ckpt): loading one can run arbitrary code"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="override the scheduler's prediction type"
    )
    clip_skip: int = Field(
        1, ge=1, description="CLIP layer the prompts are read from, counted as A1111, kohya and loracraft generate "
        "--clip-skip count it: 1 = the last (SDXL: its usual penultimate), 2 = the one before it; generate with "
        "the same value",
    )


class ConceptCfg(_Section):
    """One dataset of a multi-dataset run (kohya's ``[[datasets.subsets]]``, OneTrainer's concepts).
    A key left unset (null) takes the value of the same ``data.*`` key."""

    path: str = Field(min_length=1, description="dataset folder, saved `datasets` dataset, or hub id (required)")
    repeats: int = Field(
        1, ge=1, description="how many times each image is seen per epoch (kohya num_repeats); multiplies the "
        "repeats of kohya N_name folders inside it",
    )
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens: int | None = Field(None, ge=0)
    shuffle_tags: bool | None = None
    tag_dropout: float | None = Field(None, ge=0.0, le=1.0)
    caption_dropout: float | None = Field(None, ge=0.0, le=1.0)
    resolution: int | None = Field(None, gt=0, le=MAX_RESOLUTION)
    center_crop: bool | None = None
    random_flip: bool | None = None
    image_column: str | None = None
    caption_column: str | None = None

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return v if v is None else DataCfg._multiple_of_8(v)


#: The data.* keys a concept may set for itself (the rest of data.* is shared by the whole run).
CONCEPT_KEYS = tuple(k for k in ConceptCfg.model_fields if k not in ("path", "repeats"))


class DataCfg(_Section):
    path: str | None = Field(
        description="dataset folder, saved `datasets` dataset, or hub id (required unless data.concepts lists "
        "the datasets; with both, data.path trains as the first concept, with the data.* settings)"
    )
    concepts: list[ConceptCfg] = Field(
        default_factory=list,
        description="several datasets in one run (kohya dataset_config subsets, OneTrainer concepts), e.g. "
        "[{path: photos/me, repeats: 4, caption_prefix: 'sks person'}, {path: photos/style, resolution: 768}]. "
        "Each takes path (required), repeats (>= 1, default 1: times each image is seen per epoch, multiplying "
        "kohya N_name folder repeats) and its own " + ", ".join(CONCEPT_KEYS) + "; a key it leaves unset takes "
        "the data.* value. Concepts of different resolutions train in separate batches (every batch has one "
        "size). Set it in the YAML: command-line overrides can replace the whole list "
        "(data.concepts=[{path: a}, {path: b, repeats: 2}]) but not one item's key",
    )
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = Field(
        512, gt=0, le=MAX_RESOLUTION, description=f"training side length in pixels (a multiple of 8, <= {MAX_RESOLUTION})"
    )
    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability of an empty caption")
    max_token_length: int = Field(
        75, ge=75, le=750, multiple_of=75, description="caption tokens the text encoder sees: 75 (one CLIP window; "
        "longer captions are cut) or 150/225 (kohya --max_token_length): every caption in 75-token windows, each "
        "encoded on its own and joined (A1111's long prompts)",
    )
    shuffle_tags: bool = False
    keep_tokens: int = Field(
        0,
        ge=0,
        description="the first N comma-separated tags of each caption stay first and are never dropped by "
        "shuffle_tags / tag_dropout, e.g. a trigger word (kohya keep_tokens)",
    )
    tag_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="drop each tag after the first keep_tokens with this probability, per sample (kohya "
        "caption_tag_dropout_rate); like shuffle_tags it turns the text-embedding cache off",
    )
    caption_prefix: str = Field(
        "", description="put before every caption, joined with a space, before tags are split (kohya caption_prefix)"
    )
    caption_suffix: str = Field(
        "", description="put after every caption, joined with a space, before tags are split (kohya caption_suffix)"
    )
    buckets: bool = Field(False, description="aspect-ratio buckets around resolution**2 (kohya style; crops centred)")
    bucket_step: int = Field(64, gt=0, description="bucket sides are multiples of this (pixels)")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="images with errors (unreadable/corrupt/truncated/empty files, missing, non-text or non-UTF-8 "
        "captions, metadata rows without a file, links out of the folder): fail = stop before loading weights, listing them all; "
        "skip = train without them, with a warning and a count",
    )
    allow_outside_links: bool = Field(
        False,
        description="read images and captions that lead outside data.path (symlinks to files elsewhere, metadata "
        "file_name values like ../x.png or /abs/x.png); false = they are errors (data.on_error decides), so a "
        "stray link cannot feed e.g. /etc/hostname into training as a caption",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes that decode, crop and flip images (uncached runs) while the "
        "model trains; every random choice is keyed by sample position, so results and exact resume do not "
        "depend on it; 0 = decode in the training process",
    )
    masks: str | None = Field(
        None,
        description="loss masks, so only part of each image trains (kohya --masked_loss): null = off; alpha = "
        "each image's own alpha channel (images without one are errors); or a folder with one grey mask per image "
        "at the same relative path, any image suffix (masks/cat/001.png for cat/001.jpg; missing masks are errors, "
        "data.on_error decides). White trains, black does not; a mask is resized, cropped and flipped with its "
        "image, and scales the per-element loss at latent size (area-averaged); the per-sample loss stays the mean "
        "over all elements (not divided by the mask's area, as kohya)",
    )
    unmasked_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="with data.masks: the loss weight where a mask is black (OneTrainer's unmasked weight); "
        "weight = unmasked_weight + (1 - unmasked_weight) * mask, so 0 = the background does not train",
    )

    @field_validator("masks")
    @classmethod
    def _masks_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise PydanticCustomError("empty_masks", "is empty; use null (off), alpha, or a mask folder")
        return v

    @model_validator(mode="before")
    @classmethod
    def _path_or_concepts(cls, data: Any) -> Any:
        """data.path may be left out only when data.concepts names the datasets; otherwise a
        null path is reported as the missing required key it is."""
        if isinstance(data, dict) and data.get("path") is None:
            data = dict(data)
            if data.get("concepts"):
                data["path"] = None
            else:
                data.pop("path", None)
        return data

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        # Every SD-family VAE downsamples by 8; the model's own (larger) multiple is checked at load.
        if v > 0 and v % 8:
            lo, hi = max(8, v // 8 * 8), v // 8 * 8 + 8
            raise PydanticCustomError(
                "multiple_of_8", "must be a multiple of 8 (latents are 1/8 of the image side); use {lo} or {hi}",
                {"lo": lo, "hi": hi},
            )
        return v


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TextEncoderLoraCfg(_Section):
    rank: int = Field(4, gt=0, le=MAX_RANK, description="text-encoder LoRA rank")
    alpha: float = Field(4, gt=0, description="text-encoder LoRA alpha (scale alpha/rank)")
    targets: list[str] = Field(
        default_factory=lambda: list(TEXT_ENCODER_TARGETS), description="CLIP module names (attention by default)"
    )


class LoraCfg(_Section):
    rank: int = Field(4, gt=0, le=MAX_RANK, description="LoRA rank; at most the targeted layers' smaller side")
    alpha: float = Field(4, gt=0)
    targets: Literal["attn", "transformer"] | list[str] = "attn"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["gaussian", "default", "pissa", "olora", "loftq"] = Field(
        "gaussian", description="peft init_lora_weights; default = kaiming (peft's True)"
    )
    type: Literal["lora", "loha", "lokr"] = Field(
        "lora",
        description="lora | loha (Hadamard product) | lokr (Kronecker product), both via peft; loha/lokr are "
        "saved as lycoris_weights.safetensors in the kohya/LyCORIS layout (A1111, ComfyUI, kohya, loracraft "
        "generate), not in diffusers format (diffusers' load_lora_weights reads only LoRA)",
    )
    use_dora: bool = Field(
        False, description="DoRA (weight-decomposed LoRA, peft); loads in plain diffusers, not in kohya/A1111 format"
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale alpha/sqrt(rank) instead of alpha/rank")
    text_encoder: TextEncoderLoraCfg | None = Field(
        None,
        description="also train a LoRA on the text encoder, e.g. {rank: 4, alpha: 4}; null = UNet only. "
        "Shares dropout/init/use_dora/use_rslora with the UNet adapter; turns the text-embedding cache off",
    )
    init_from: str | None = Field(
        None, description="start from this LoRA file (diffusers or kohya layout) instead of a fresh init; its "
        "rank, alpha and targets must match lora.*; the optimizer starts fresh; a resume takes precedence"
    )

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise PydanticCustomError("empty_targets", "is empty (no layer would train); use attn, transformer or "
                                      "a list of module names such as [to_q, to_v]")
        return v

    def target_modules(self) -> list[str]:
        if self.targets == "attn":
            return list(ATTN_TARGETS)
        if self.targets == "transformer":
            return list(TRANSFORMER_TARGETS)
        return list(self.targets)


class ClassGenerationCfg(_Section):
    steps: int = Field(25, gt=0, description="denoising steps per generated class image")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance of the class images")
    seed: int = Field(0, ge=0, lt=GENERATION_SEED_LIMIT, description="class image k (0, 1, ...) is generated with seed + k, alone in its own "
                      "pipeline call, so an interrupted generation resumes with identical images")
    negative_prompt: str | None = Field(None, description="negative prompt of the class images")


class DreamBoothCfg(_Section):
    """DreamBooth (Ruiz et al. 2022, arXiv:2208.12242): instance images + a prompt with an
    identifier token; prior preservation trains on class images of the base model alongside."""

    instance_prompt: str = Field(
        min_length=1, description="prompt with the identifier token, e.g. 'a photo of sks dog' (required)"
    )
    captions: Literal["instance_prompt", "prepend"] = Field(
        "instance_prompt",
        description="instance_prompt = every data.path image is trained with instance_prompt (captions, if "
        "any, are ignored; images need none); prepend = 'instance_prompt, <caption>' (the prompt alone "
        "for images without one)",
    )
    prior_preservation: bool = Field(
        True, description="pair every instance sample with a class sample (loss += prior_loss_weight x class loss)"
    )
    class_prompt: str | None = Field(
        None, description="prompt of the class images, e.g. 'a photo of a dog' (required with prior_preservation)"
    )
    class_data: str | None = Field(
        None,
        description="folder of your own class images (read only); missing ones up to num_class_images "
        "are generated with the base into the cache folder",
    )
    num_class_images: int = Field(100, gt=0, description="class images to train with (100-200 is usual)")
    prior_loss_weight: float = Field(1.0, gt=0, description="weight of the class (prior) loss")
    class_generation: ClassGenerationCfg = Field(default_factory=ClassGenerationCfg)


class PreserveCfg(_Section):
    """OneTrainer's "prior prediction": regularisation samples learn the base model's own output
    (adapter off) on the same noisy latent, instead of the noise. Their loss is then exactly how
    far the adapter moved the model away from the base where it should not act."""

    trigger: str = Field(
        min_length=1, description="text marking the captions the adapter should change, e.g. 'in lcstyle "
        "style'; every sample whose caption lacks it is a preservation sample (required)",
    )
    weight: float = Field(1.0, gt=0, description="loss weight of the preservation samples")
    empty_captions: bool = Field(
        False, description="also preserve caption-dropped samples (the unconditional branch of CFG); off: they "
        "train on the noise like any other, so guidance still sees the style in the unconditional branch",
    )


MixedPrecision = Literal["no", "bf16", "fp16"]


class TrainCfg(_Section):
    seed: int = Field(0, ge=0, lt=TRAIN_SEED_LIMIT, description="seeds every random draw of the run (0 <= seed < 2**32)")
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(1000, gt=0)
    lr: float = Field(
        1e-3, gt=0, description="peak learning rate. The default (with AdamW, rank 4, alpha 4) reached a lower held-out loss at "
        "200 steps than the diffusers reference script's lr 5e-4 at 300 (scripts/bench_defaults.py, toy world, "
        "3 seeds); the long-run recipes in configs/ use 1e-4",
    )
    scale_lr: bool = Field(False, description="multiply lr by batch_size x processes x grad_accum")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = Field(
        "adamw",
        description="adamw (torch) | adamw8bit (bitsandbytes, CUDA only) | prodigy (prodigyopt, "
        "learning-rate free: use lr ~1.0) | adafactor (transformers, fixed lr)",
    )
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="null disables clipping")
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR-gamma weighting (5.0 is typical)")
    noise_offset: float = Field(
        0.0, ge=0, description="offset noise: + this x one normal draw per sample and channel (0.05-0.1 typical)"
    )
    adaptive_noise_scale: float | None = Field(
        None, description="kohya: noise offset + this x |latent channel mean| (needs noise_offset; may be negative)"
    )
    multires_noise_iterations: int = Field(
        0, ge=0, description="multi-resolution (pyramid) noise levels, kohya style (6-10 typical); 0 = off"
    )
    multires_noise_discount: float = Field(
        0.3, gt=0, le=1, description="weight of each coarser multi-resolution noise level (kohya's default 0.3)"
    )
    input_perturbation: float = Field(
        0.0, ge=0, description="noise the latents with noise + this x fresh noise, target unchanged (0.1 typical; "
        "diffusers --input_perturbation, kohya --ip_noise_gamma)",
    )
    zero_terminal_snr: bool = Field(
        False, description="rescale the noise schedule to zero terminal SNR (Lin et al. 2023); use with "
        "v_prediction, and sample with rescale_betas_zero_snr + timestep_spacing=trailing",
    )
    min_timestep: int = Field(0, ge=0, description="lowest training timestep (kohya --min_timestep)")
    max_timestep: int | None = Field(
        None, gt=0, description="timesteps are drawn below this (exclusive, kohya --max_timestep); null = the "
        "scheduler's num_train_timesteps (1000)",
    )
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "uniform", description="timestep density: uniform | logit_normal (SD3 paper; logit_mean, logit_std) | "
        "mode (SD3 paper; mode_scale)",
    )
    logit_mean: float = Field(0.0, description="mean of the logit-normal timestep density")
    logit_std: float = Field(1.0, gt=0, description="std of the logit-normal timestep density")
    mode_scale: float = Field(1.29, description="scale of the SD3 'mode' timestep density")
    loss_type: Literal["mse", "l1", "huber", "smooth_l1"] = Field(
        "mse", description="mse (kohya l2) | l1 | huber | smooth_l1 (scheduled pseudo-Huber, kohya --loss_type)"
    )
    huber_c: float = Field(0.1, gt=0, le=1, description="pseudo-Huber c of loss_type huber/smooth_l1 (kohya default 0.1)")
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr", description="how huber_c varies with the timestep (kohya's huber_schedule; snr is its default)"
    )
    debiased_estimation: bool = Field(
        False, description="weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v), kohya --debiased_estimation_loss"
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict, description="extra optimizer constructor arguments, e.g. {betas: [0.9, 0.99], "
        "eps: 1.0e-8} or prodigy's {d_coef: 0.8, use_bias_correction: true}",
    )
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="EMA of the adapter weights with this decay (e.g. 0.999); null = off"
    )
    ema_every: int = Field(1, gt=0, description="fold the weights into the EMA every N optimizer steps")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="learning rate of the text-encoder LoRA (lora.text_encoder); null = train.lr"
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: lora_B learning rate = lr x this ratio (16 is the paper's value); null = off"
    )
    cache: Literal["auto"] | bool = Field(
        "auto", description="cache VAE latents + text embeddings on disk; auto = unless random crops/tag shuffling"
    )
    cache_dir: str | None = Field(None, description="cache folder; null -> $LORACRAFT_CACHE or ~/.cache/loracraft")
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="non-finite loss: stop (exit 1, last checkpoint kept) or skip the batch"
    )
    threads: int | str | None = Field(
        None, description="CPU threads of a step: null = PyTorch's choice (OMP_NUM_THREADS); N = fixed; auto = "
        "measure N vs 1 thread during the run and keep the faster (fast on a busy machine, but the weights then "
        "differ in the last bits from run to run)",
    )

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("train.threads must be a positive integer, auto or null")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False; the user meant the string "no".
        return "no" if v is False else v


class CheckpointCfg(_Section):
    every: int = Field(500, gt=0, description="save full training state every N optimizer steps")
    keep: int = Field(3, gt=0, description="complete checkpoints to keep (oldest deleted first)")
    resume: Literal["auto", "latest"] | bool | str = Field(
        "auto", description="auto | latest | false | PATH to a step-NNNNNN checkpoint"
    )
    allow_config_change: bool = Field(False, description="resume even if training-relevant keys changed")


class SamplePromptCfg(_Section):
    """One validation prompt with its own settings; unset ones take validation.* (and data.resolution)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=GENERATION_SEED_LIMIT)
    width: int | None = Field(None, gt=0, le=MAX_RESOLUTION)
    height: int | None = Field(None, gt=0, le=MAX_RESOLUTION)
    steps: int | None = Field(None, gt=0, le=1000)
    guidance: float | None = Field(None, ge=0)


class ValidationCfg(_Section):
    prompts: list[str | SamplePromptCfg] = Field(
        default_factory=list, description="sample prompts: strings, or {prompt, negative_prompt, seed, width, "
        "height, steps, guidance}"
    )
    prompt_file: str | None = Field(
        None, description="more sample prompts: a .txt file in kohya's line syntax (a prompt --n negative --w 512 "
        "--h 768 --d 42 --l 7.5 --s 28) or a .yaml list like validation.prompts"
    )
    at_start: bool = Field(False, description="also generate the samples at step 0, before training")
    heldout: float | str | None = Field(
        None, description="held-out loss at step 0 and every checkpoint: a folder of captioned images, or a "
        "fraction 0 < f < 0.5 of the training data set aside (chosen by image name and train.seed; not trained on)"
    )
    use_ema: bool = Field(False, description="generate validation images with the EMA weights (needs train.ema_decay)")
    every: int = Field(500, gt=0)
    num_images: int = Field(4, gt=0)
    seed: int = Field(0, ge=0, lt=GENERATION_SEED_LIMIT)
    steps: int = Field(25, gt=0)
    guidance: float = Field(7.5, ge=0)

    @field_validator("heldout", mode="before")
    @classmethod
    def _heldout(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                if not v.strip():
                    raise ValueError("validation.heldout is empty; give a folder, a fraction such as 0.1, or null") from None
                return v
        if isinstance(v, bool) or (isinstance(v, (int, float)) and not 0 < v < 0.5):
            raise ValueError("validation.heldout as a fraction must be above 0 and below 0.5 (e.g. 0.1)")
        return v


class OutputCfg(_Section):
    dir: str | None = Field(None, description="run directory; null -> runs/<config file stem>")
    overwrite: bool = False
    export_ema: Literal["extra", "replace"] = Field(
        "extra",
        description="with train.ema_decay: extra = also write pytorch_lora_weights_ema.safetensors; "
        "replace = the EMA weights are the final adapter",
    )
    report: bool = Field(True, description="write report.html (curves, samples, LoRA-scale sweep) at the end")
    share_config: bool = Field(
        False, description="also write the full config (paths, prompts) into the adapter files' header; "
        "off: the header holds training facts only (base model by name), the full config stays in run.json"
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])

    @field_validator("report_to", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        if v in (None, "none", "None"):
            return []
        return [v] if isinstance(v, str) else v


class Config(_Section):
    model: ModelCfg
    data: DataCfg
    lora: LoraCfg = Field(default_factory=LoraCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)
    validation: ValidationCfg = Field(default_factory=ValidationCfg)
    output: OutputCfg = Field(default_factory=OutputCfg)
    dreambooth: DreamBoothCfg | None = Field(
        None, description="DreamBooth mode, e.g. {instance_prompt: 'a photo of sks dog', class_prompt: "
        "'a photo of a dog'}; null = ordinary captioned-dataset training"
    )
    preserve: PreserveCfg | None = Field(
        None, description="train samples without preserve.trigger toward the base model's own prediction, e.g. "
        "{trigger: 'in lcstyle style', weight: 10}; null = every sample trains on the noise"
    )

    def contradictions(self) -> list[tuple[str, str]]:
        """Options that are each valid but cannot all hold: ``[(what, how to fix), ...]``."""
        t, found = self.train, []
        if t.warmup_steps > t.max_steps:
            found.append((f"train.warmup_steps ({t.warmup_steps}) exceeds train.max_steps ({t.max_steps})",
                          "lower warmup_steps"))
        if t.warmup_steps and t.lr_scheduler == "constant":
            # diffusers' "constant" schedule silently ignores num_warmup_steps.
            found.append((f"train.warmup_steps={t.warmup_steps} has no effect with train.lr_scheduler=constant",
                          "use lr_scheduler=constant_with_warmup (or another schedule) or set warmup_steps=0"))
        if t.text_encoder_lr is not None and self.lora.text_encoder is None:
            found.append(("train.text_encoder_lr is set but lora.text_encoder is null (the text encoder is frozen)",
                          "set lora.text_encoder (e.g. {rank: 4, alpha: 4}) or remove train.text_encoder_lr"))
        if t.cache is True and self.lora.text_encoder is not None:
            found.append(("train.cache=true but the text encoder trains (lora.text_encoder), so its embeddings "
                          "change every step", "set train.cache=auto (latents are still cached)"))
        if t.ema_decay is None and self.validation.use_ema:
            found.append(("validation.use_ema=true but train.ema_decay is null (no EMA is kept)",
                          "set train.ema_decay (e.g. 0.999) or validation.use_ema=false"))
        if t.ema_decay is None and self.output.export_ema == "replace":
            found.append(("output.export_ema=replace but train.ema_decay is null (no EMA is kept)",
                          "set train.ema_decay (e.g. 0.999) or output.export_ema=extra"))
        found += self._lycoris_contradictions()
        found += self._training_control_contradictions()
        found += self._dreambooth_contradictions()
        if self.dreambooth is not None and self.data.concepts:
            found.append(("dreambooth and data.concepts are both set (DreamBooth's instance images are the one "
                          "folder data.path)", "put the instance images in data.path and remove data.concepts"))
        if self.data.masks and self.data.concepts:
            found.append(("data.masks applies to data.path only, but data.concepts is set",
                          "train the masked images as data.path alone or set data.masks=null"))
        if self.preserve is not None and self.dreambooth is not None:
            found.append(("preserve and dreambooth are both set (two regularisation schemes for one batch)",
                          "use dreambooth prior preservation or preserve, not both"))
        return found

    def _training_control_contradictions(self) -> list[tuple[str, str]]:
        """Noise/timestep/loss options set without the option that uses them: refused, never ignored."""
        t, found = self.train, []
        if t.max_timestep is not None and t.min_timestep >= t.max_timestep:
            found.append((f"train.min_timestep ({t.min_timestep}) is not below train.max_timestep ({t.max_timestep})",
                          "lower min_timestep or raise max_timestep (max is exclusive)"))
        unused = [
            ("adaptive_noise_scale", t.noise_offset > 0, "set train.noise_offset (e.g. 0.05)"),
            ("multires_noise_discount", t.multires_noise_iterations > 0, "set train.multires_noise_iterations (e.g. 6)"),
            ("logit_mean", t.timestep_sampling == "logit_normal", "set train.timestep_sampling=logit_normal"),
            ("logit_std", t.timestep_sampling == "logit_normal", "set train.timestep_sampling=logit_normal"),
            ("mode_scale", t.timestep_sampling == "mode", "set train.timestep_sampling=mode"),
            ("huber_c", t.loss_type in ("huber", "smooth_l1"), "set train.loss_type=huber or smooth_l1"),
            ("huber_schedule", t.loss_type in ("huber", "smooth_l1"), "set train.loss_type=huber or smooth_l1"),
        ]
        for key, used, fix in unused:
            # a changed value, not mere presence: saved configs (run.json, the UI's YAML) list every key
            if getattr(t, key) != TrainCfg.model_fields[key].default and not used:
                found.append((f"train.{key} is set but has no effect with the other train settings", f"{fix} or remove it"))
        return found

    def _lycoris_contradictions(self) -> list[tuple[str, str]]:
        """LoRA-only options have no LoHa/LoKr meaning in peft: refused, never silently ignored."""
        lo, found = self.lora, []
        if lo.type == "lora":
            return found
        lora_only = [
            ("lora.text_encoder", lo.text_encoder is not None, "set lora.text_encoder=null (LoHa/LoKr adapt the UNet only here)"),
            ("lora.use_dora", lo.use_dora, "set lora.use_dora=false (DoRA is a LoRA variant)"),
            ("lora.use_rslora", lo.use_rslora, "set lora.use_rslora=false (rsLoRA is a LoRA variant)"),
            ("lora.dropout", lo.dropout > 0, "set lora.dropout=0"),
            ("lora.init", "init" in lo.model_fields_set, "remove lora.init (peft initialises LoHa/LoKr its own way)"),
            ("train.loraplus_lr_ratio", self.train.loraplus_lr_ratio is not None,
             "remove train.loraplus_lr_ratio (LoRA+ scales LoRA's B matrices)"),
        ]
        for key, used, fix in lora_only:
            if used:
                found.append((f"{key} applies to lora.type=lora only, but lora.type={lo.type}", fix))
        return found

    def _dreambooth_contradictions(self) -> list[tuple[str, str]]:
        db, found = self.dreambooth, []
        if db is None or not db.prior_preservation:
            if db is not None and db.class_prompt is not None:
                found.append(("dreambooth.class_prompt is set but dreambooth.prior_preservation=false (no class "
                              "images are used)", "set prior_preservation=true or remove class_prompt"))
            if db is not None and db.class_data is not None:
                found.append(("dreambooth.class_data is set but dreambooth.prior_preservation=false",
                              "set prior_preservation=true or remove class_data"))
            return found
        if not (db.class_prompt or "").strip():
            found.append(("dreambooth.prior_preservation=true needs dreambooth.class_prompt",
                          "set class_prompt to the class without the identifier (e.g. 'a photo of a dog') "
                          "or set prior_preservation=false"))
        if self.data.buckets:
            found.append(("dreambooth prior preservation puts instance and class images in one batch, so they "
                          "must share one size, but data.buckets=true", "set data.buckets=false"))
        return found

    def dump(self) -> dict:
        return self.model_dump(mode="json")

    def training_relevant(self) -> dict:
        """The keys whose change changes the learned weights (what a resume must not silently mix)."""
        d = self.dump()
        for section in NON_TRAINING_SECTIONS:
            d.pop(section, None)
        # Which images train is already in the dataset fingerprint (computed after skipping).
        d["data"].pop("on_error", None)
        d["data"].pop("allow_outside_links", None)
        d["data"].pop("num_workers", None)  # where images are decoded changes no result
        d["train"].pop("threads", None)  # summation order only (last bits), like another machine
        return d


#: Sections that never change the learned weights: where files go, how often state is saved,
#: what validation images look like.
NON_TRAINING_SECTIONS = ("output", "checkpoint", "validation")
