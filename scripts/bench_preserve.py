"""What ``preserve`` costs, and what one batched UNet pass would cost instead.

    python scripts/bench_preserve.py [--model sd15-small|tiny] [--batch-size 4] [--threads 1] [--repeats 6]

``preserve`` trains the rows without the trigger towards the base's own prediction (adapters
off) at the same noisy input. Three ways to run one step's UNet work, on the bare UNet + peft
LoRA (attention targets, a non-zero adapter), half of the rows preserved:

- ``plain``: fwd + bwd of the batch (no preserve: the reference speed);
- ``separate``: fwd + bwd of the batch, then a no-grad fwd of the preserved rows with adapters
  disabled (what the trainer does for LoHa/LoKr, DoRA and gradient checkpointing);
- ``mixed``: one fwd + bwd of the batch plus the preserved rows again, those extra rows with
  the adapter off per row (peft's mixed-batch ``adapter_names``, ``"__base__"``), their output
  detached as the target (what the trainer does otherwise: ``preserve.predict_with_base``).

Prints CPU seconds per step (load-insensitive at 1 thread) and speed relative to ``plain``, and
checks that ``mixed`` gives the same targets and LoRA gradients as ``separate`` (to fp rounding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench.train import MODELS


def _unet(model: str, root: Path):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from loracraft.train.config import ATTN_TARGETS

    model_dir = root / model / "model"
    if not (model_dir / "model_index.json").is_file():
        MODELS[model].builder(model_dir, seed=0)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=ATTN_TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: its output differs from the base
    return unet


def main(argv: list[str] | None = None) -> int:
    from peft.tuners.lora import LoraLayer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-small", choices=[m for m in MODELS if m != "sd15"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--work-dir", help="keep the built model here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = Path(a.work_dir or tempfile.mkdtemp(prefix="loracraft-bench-preserve-"))
    unet = _unet(a.model, root)
    cfg, b = unet.config, a.batch_size
    torch.manual_seed(0)
    side = cfg.sample_size
    x, t = torch.randn(b, cfg.in_channels, side, side), torch.randint(0, 1000, (b,))
    c = torch.randn(b, 77, cfg.cross_attention_dim)
    on = torch.arange(b) % 2 == 1
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]

    def loss_of(pred, base):
        return (pred[on] - base).pow(2).mean() + pred[~on].pow(2).mean()

    def plain():
        unet(x, t, c).sample.pow(2).mean().backward()

    def separate():
        pred = unet(x, t, c).sample
        with torch.no_grad():
            unet.disable_adapters()
            base = unet(x[on], t[on], c[on]).sample
            unet.enable_adapters()
        loss_of(pred, base).backward()
        return base

    def mixed():
        names = ["default"] * b + ["__base__"] * int(on.sum())

        def pre(_mod, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in lora_layers]
        try:
            out = unet(torch.cat([x, x[on]]), torch.cat([t, t[on]]), torch.cat([c, c[on]])).sample
        finally:
            for h in hooks:
                h.remove()
        base = out[b:].detach()
        loss_of(out[:b], base).backward()
        return base

    def grads():
        g = {n: q.grad.clone() for n, q in unet.named_parameters() if q.requires_grad}
        unet.zero_grad(set_to_none=True)
        return g

    base_s, g_s = separate(), grads()
    base_m, g_m = mixed(), grads()
    num = sum((g_s[k] - g_m[k]).norm() ** 2 for k in g_s) ** 0.5
    den = sum(g.norm() ** 2 for g in g_s.values()) ** 0.5

    def cpu(step) -> float:
        step()
        unet.zero_grad(set_to_none=True)
        t0 = time.process_time()
        for _ in range(a.repeats):
            step()
            unet.zero_grad(set_to_none=True)
        return (time.process_time() - t0) / a.repeats

    times = {}
    for name, step in (("plain", plain), ("separate", separate), ("mixed", mixed)) * 2:  # twice, interleaved
        times.setdefault(name, []).append(cpu(step))
    s = {k: min(v) for k, v in times.items()}
    print(
        f"{a.model}, batch {b} ({int(on.sum())} preserved), {a.threads} thread(s): CPU s/step plain {s['plain']:.3f}, "
        f"separate {s['separate']:.3f} ({s['plain'] / s['separate']:.2f}x plain speed), "
        f"mixed {s['mixed']:.3f} ({s['plain'] / s['mixed']:.2f}x)"
    )
    print(
        f"mixed vs separate: targets max |diff| {(base_s - base_m).abs().max().item():.2e}, "
        f"LoRA gradients relative diff {(num / den).item():.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
