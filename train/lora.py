"""LoRA injection into the UNet with peft, and extraction of the trained adapter."""

from __future__ import annotations

import torch
from peft import LoraConfig

from loracraft.infer.errors import ConfigError


def lora_config(cfg_lora) -> LoraConfig:
    """The peft config of ``lora`` (LoHa/LoKr: ``LoHaConfig``/``LoKrConfig``, peft's defaults otherwise)."""
    if cfg_lora.type != "lora":
        from peft import LoHaConfig, LoKrConfig

        cls = LoHaConfig if cfg_lora.type == "loha" else LoKrConfig
        return cls(r=cfg_lora.rank, alpha=cfg_lora.alpha, target_modules=cfg_lora.target_modules())
    init = {"gaussian": "gaussian", "default": True}.get(cfg_lora.init, cfg_lora.init)
    return LoraConfig(
        r=cfg_lora.rank,
        lora_alpha=cfg_lora.alpha,
        lora_dropout=cfg_lora.dropout,
        init_lora_weights=init,
        target_modules=cfg_lora.target_modules(),
        use_dora=cfg_lora.use_dora,
        use_rslora=cfg_lora.use_rslora,
    )


def inject_lora(unet: torch.nn.Module, cfg_lora) -> LoraConfig:
    """Freeze the UNet and add a trainable LoRA adapter on the configured modules.

    Order matters (as in the diffusers reference scripts): base frozen first, so that only
    the adapter's parameters require grad.
    """
    unet.requires_grad_(False)
    config = lora_config(cfg_lora)
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    full = {n for n, _ in unet.named_modules()}
    unknown = [t for t in config.target_modules if t not in names and not any(n.endswith("." + t) for n in full)]
    if unknown:
        raise ConfigError(
            f"lora.targets {unknown} match no UNet module, config, use 'attn', 'transformer' or names like to_q"
        )
    unet.add_adapter(config)
    return config


def inject_text_encoder_lora(text_encoder: torch.nn.Module | None, cfg_lora) -> LoraConfig | None:
    """A trainable LoRA on the (frozen) text encoder per ``lora.text_encoder``; None when it is off
    (or when ``text_encoder`` is None: SDXL's second encoder on an SD1 base).

    Dropout, init, DoRA and rsLoRA follow the UNet adapter's settings. On SDXL both encoders get
    the same settings, as in diffusers' ``train_text_to_image_lora_sdxl.py --train_text_encoder``.
    """
    te = cfg_lora.text_encoder
    if te is None or text_encoder is None:
        return None
    text_encoder.requires_grad_(False)
    config = lora_config(cfg_lora)
    config.r, config.lora_alpha, config.target_modules = te.rank, te.alpha, set(te.targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in text_encoder.named_modules()}
    unknown = [t for t in te.targets if t not in names]
    if unknown:
        raise ConfigError(
            f"lora.text_encoder.targets {unknown} match no text-encoder module, config, "
            "use CLIP names like q_proj, k_proj, v_proj, out_proj, fc1, fc2"
        )
    # peft directly: transformers 5's ``add_adapter`` demands a newer peft than the UNet path needs.
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder)
    return config


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def unet_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter in diffusers naming (what ``load_lora_weights`` expects after the 'unet.' prefix).

    Works for any peft-injected model (the text encoder too)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from loracraft.infer.formats.lycoris import is_lycoris_state

    state = get_peft_model_state_dict(unet)
    if is_lycoris_state(state):  # LoHa/LoKr: peft naming as is (diffusers has no spelling for them)
        return state
    return convert_state_dict_to_diffusers(state)


def init_from(path: str, models: dict[str, torch.nn.Module | None], cfg_lora) -> int:
    """Copy an existing LoRA file (diffusers or kohya layout) into the freshly injected adapters.

    The file must describe exactly the adapter the config builds (same layers, rank and alpha):
    anything else would silently train a different model than the config says. Returns the
    number of layers loaded.
    """
    from loracraft.infer.formats import read_lora

    if cfg_lora.type != "lora" or cfg_lora.use_dora:
        raise ConfigError(f"lora.init_from supports plain LoRA only, lora.type={cfg_lora.type}"
                          f"{' with use_dora' if cfg_lora.use_dora else ''}, remove lora.init_from")
    adapter = read_lora(path)
    expected = {"unet": (cfg_lora.rank, cfg_lora.alpha)}
    if cfg_lora.text_encoder is not None:
        expected["text_encoder"] = expected["text_encoder_2"] = (cfg_lora.text_encoder.rank, cfg_lora.text_encoder.alpha)
    loaded = 0
    with torch.no_grad():
        for component, model in models.items():
            if model is None:
                continue
            trained = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
            mods = adapter.modules.get(component, {})
            if set(mods) != trained:
                _mismatch(path, component, sorted(set(mods) - trained), sorted(trained - set(mods)))
            rank, alpha = expected[component]
            for name, mod in mods.items():
                if mod.rank != rank or abs(mod.alpha - alpha) > 1e-6 * max(1.0, alpha):
                    key = "lora" if component == "unet" else "lora.text_encoder"
                    raise ConfigError(f"lora.init_from has rank {mod.rank} / alpha {mod.alpha:g} at {component} {name}, "
                                      f"{path}, set {key}.rank={mod.rank} and {key}.alpha={mod.alpha:g} (config: "
                                      f"{rank} / {alpha:g})")
                module = model.get_submodule(name)
                for weight, value in ((module.lora_A["default"].weight, mod.down), (module.lora_B["default"].weight, mod.up)):
                    if value.numel() != weight.numel():
                        raise ConfigError(f"lora.init_from {component} {name} has shape {tuple(value.shape)}, {path}, "
                                          f"the base's layer needs {tuple(weight.shape)}: the file was trained on another base")
                    weight.copy_(value.reshape(weight.shape).to(weight.dtype))
                loaded += 1
    for component in adapter.modules:
        if models.get(component) is None and adapter.modules[component]:
            _mismatch(path, component, sorted(adapter.modules[component]), [])
    return loaded


def _mismatch(path, component: str, extra: list[str], missing: list[str]) -> None:
    what = (f"adapts {len(extra)} {component} layers the config does not train (e.g. {extra[0]})" if extra else
            f"lacks {len(missing)} {component} layers the config trains (e.g. {missing[0]})")
    raise ConfigError(f"lora.init_from {what}, {path}, set lora.targets / lora.text_encoder to the file's layers")
