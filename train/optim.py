"""Optimizers selected by ``train.optimizer``; optional backends imported lazily.

| name      | implementation                                   | extra to install   |
|-----------|--------------------------------------------------|--------------------|
| adamw     | ``torch.optim.AdamW``                            | (none)             |
| adamw8bit | ``bitsandbytes.optim.AdamW8bit`` (CUDA only)     | ``loracraft[bnb]`` |
| prodigy   | ``prodigyopt.Prodigy`` (learning-rate free; lr ~1.0) | ``loracraft[prodigy]`` |
| adafactor | ``transformers.optimization.Adafactor``, fixed lr | (none)             |

``train.optimizer_args`` go to the constructor as keyword arguments (kohya's
``--optimizer_args``), checked against its signature before any weights load.

Every optimizer's state is a dict of tensors and plain numbers, which the pickle-free
checkpoint stores as safetensors + JSON (tested by exact-resume tests).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Iterable

import torch

from loracraft.infer.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")


def optimizer_problems(cfg_train) -> list[str]:
    """Why the configured optimizer cannot run here (no weights needed): one line per problem."""
    name = cfg_train.optimizer
    backend = _backend_problems(name)
    return backend or _argument_problems(name, cfg_train.optimizer_args)


def _backend_problems(name: str) -> list[str]:
    if name == "adamw8bit":
        if not torch.cuda.is_available():
            # bitsandbytes' 8-bit optimizer update kernels are CUDA kernels; on a CPU-only
            # machine the step fails deep inside bitsandbytes (or it is not even installable).
            return [
                "train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer kernels run on CUDA) "
                "and none is available, config, use train.optimizer=adamw or adafactor"
            ]
        if importlib.util.find_spec("bitsandbytes") is None:
            return [
                "train.optimizer=adamw8bit needs bitsandbytes, which is not installed, config, "
                "pip install 'loracraft[bnb]' (or choose train.optimizer=adamw)"
            ]
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        return [
            "train.optimizer=prodigy needs prodigyopt, which is not installed, config, "
            "pip install 'loracraft[prodigy]' (or choose train.optimizer=adamw)"
        ]
    return []


#: constructor arguments loracraft sets itself, and the config key that sets them
_OWN_ARGS = {"params": "the trained LoRA parameters", "lr": "train.lr", "weight_decay": "train.weight_decay"}


def _optimizer_class(name: str) -> type:
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    raise ConfigError(f"unknown train.optimizer {name!r}, config, use one of {', '.join(OPTIMIZERS)}")


def _argument_problems(name: str, args: dict) -> list[str]:
    """``train.optimizer_args`` keys the optimizer's constructor does not take (checked by
    ``inspect.signature``, so a typo fails before any weights load instead of in the first step)."""
    if not args:
        return []
    params = inspect.signature(_optimizer_class(name).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = sorted(k for k, p in params.items() if k not in ("self", *_OWN_ARGS) and p.kind is not p.VAR_KEYWORD)
    problems = []
    for key in args:
        if key in _OWN_ARGS:
            problems.append(f"train.optimizer_args.{key} is set by loracraft, config, use {_OWN_ARGS[key]} instead")
        elif key not in params and not takes_any:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                f"train.optimizer_args.{key} is not an argument of {name}, config, {hint}"
                f"{name} takes {', '.join(accepted)}"
            )
    return problems


def optimizer_kwargs(args: dict) -> dict:
    """Constructor keyword arguments from ``train.optimizer_args``: YAML lists become tuples
    (``betas: [0.9, 0.99]``), and numbers YAML 1.1 reads as strings (``eps: 1e-8``) become floats."""

    def value(v):
        if isinstance(v, list):
            return tuple(value(x) for x in v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    return {k: value(v) for k, v in args.items()}


def param_groups(
    trainables: dict[str, torch.nn.Parameter],
    lr: float,
    loraplus_lr_ratio: float | None = None,
    text_encoder_lr: float | None = None,
) -> list[dict]:
    """Torch param groups: LoRA+ gives ``lora_B`` matrices ``lr x ratio`` (Hayou et al. 2024,
    arXiv:2402.12354); text-encoder parameters (names starting ``text_encoder.``, or SDXL's
    ``text_encoder_2.``) get their own lr (one group for both encoders, as diffusers' SDXL script).

    The first group is always the UNet's base-lr group, so ``get_last_lr()[0]`` is ``train.lr``.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in trainables.items():
        te = name.startswith(("text_encoder.", "text_encoder_2."))
        b = loraplus_lr_ratio is not None and ".lora_B." in name
        groups.setdefault((te, b), []).append(p)
    out = []
    for te, b in sorted(groups):  # (unet, A) first
        group_lr = (text_encoder_lr if te and text_encoder_lr is not None else lr) * (loraplus_lr_ratio if b else 1)
        name = ("text_encoder" if te else "unet") + ("_lora_B" if b else "")
        out.append({"params": groups[(te, b)], "lr": group_lr, "name": name})
    return out


def build_optimizer(
    cfg_train, params_or_groups: Iterable[torch.nn.Parameter] | list[dict], effective_lr: float
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg_train.optimizer`` over parameters or param groups.

    Args:
        cfg_train: the ``train`` config section (``optimizer``, ``weight_decay``).
        params_or_groups: parameters, or torch param groups (dicts with ``params`` and
            optionally their own ``lr``, e.g. LoRA+ or a text-encoder learning rate).
        effective_lr: the default learning rate (``train.lr``, scaled if ``train.scale_lr``).
    """
    problems = optimizer_problems(cfg_train)
    if problems:
        raise ConfigError(problems[0], problems)
    params = list(params_or_groups)
    name = cfg_train.optimizer
    kwargs = {"lr": effective_lr, "weight_decay": cfg_train.weight_decay}
    if name == "adafactor":
        # Fixed external learning rate (the kohya / OneTrainer LoRA setting), not Adafactor's
        # relative step size, so train.lr and the LR schedule mean what they say.
        kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
    # Prodigy estimates the step size itself; lr is a multiplier on it (1.0 recommended).
    kwargs.update(optimizer_kwargs(cfg_train.optimizer_args))
    try:
        return _optimizer_class(name)(params, **kwargs)
    except (ValueError, TypeError) as e:  # torch's own range checks, e.g. "Invalid beta parameter at index 0"
        if not cfg_train.optimizer_args:
            raise
        raise ConfigError(f"bad train.optimizer_args for {name} ({e}), config, fix the value") from e


__all__ = ["OPTIMIZERS", "build_optimizer", "optimizer_problems", "param_groups"]
