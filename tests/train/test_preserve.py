"""Base-prediction preservation (``preserve:``): which rows, what target, what weight, what errors."""


import pytest
import torch

from loracraft.infer.errors import ConfigError
from loracraft.train.preserve import check_trigger, preservation_weights, preserved_rows, select_rows

TRIGGER = "in lcstyle style"


def test_rows_without_the_trigger_are_preserved_and_dropped_captions_only_when_asked():
    caps = ["a red circle in lcstyle style", "a red circle", "", "in lcstyle style"]
    assert preserved_rows(caps, TRIGGER, empty_captions=False).tolist() == [False, True, False, False]
    assert preserved_rows(caps, TRIGGER, empty_captions=True).tolist() == [False, True, True, False]


def test_weights_multiply_min_snr_weights_on_preserved_rows_only():
    rows = torch.tensor([True, False, True])
    assert preservation_weights(rows, 10.0, None).tolist() == [10.0, 1.0, 10.0]
    assert preservation_weights(rows, 10.0, torch.tensor([0.5, 0.25, 2.0])).tolist() == [5.0, 0.25, 20.0]


def test_select_rows_keeps_tensors_lists_and_nested_dicts_aligned():
    batch = {"captions": ["a", "b", "c"], "x": torch.arange(3), "cond": {"y": torch.arange(3) * 10}, "n": 7}
    sub = select_rows(batch, torch.tensor([True, False, True]))
    assert sub["captions"] == ["a", "c"] and sub["x"].tolist() == [0, 2] and sub["cond"]["y"].tolist() == [0, 20]
    assert sub["n"] == 7


@pytest.mark.parametrize("captions, says", [
    (["a red circle", "a blue square"], "appears in no caption"),
    (["a in lcstyle style", "b in lcstyle style"], "appears in every caption"),
])
def test_a_trigger_selecting_all_or_nothing_is_refused_naming_the_key_and_folder(captions, says):
    with pytest.raises(ConfigError, match=f"preserve.trigger 'in lcstyle style' {says}, data/dir"):
        check_trigger(captions, TRIGGER, "data/dir")
    assert check_trigger(["a in lcstyle style", "b", "c"], TRIGGER, "data/dir") == 2


def test_preserve_and_dreambooth_together_are_refused():
    from loracraft.train.config import build_config

    base = {"model": {"base": "m"}, "data": {"path": "d"}}
    with pytest.raises(ConfigError, match="preserve and dreambooth are both set"):
        build_config(base, ["preserve.trigger=sks", "dreambooth.instance_prompt=a sks dog",
                            "dreambooth.class_prompt=a dog"])
    with pytest.raises(ConfigError, match="preserve.trigger"):
        build_config(base, ["preserve.weight=2"])  # a section without its required trigger


@pytest.fixture(scope="module")
def half_styled(tmp_path_factory):
    """Four scenes; the first two captioned with the trigger, the others plain."""
    from loracraft.infer.testing import append_to_captions, write_captioned_dataset

    return append_to_captions(write_captioned_dataset(tmp_path_factory.mktemp("half"), n=4, seed=3), TRIGGER, [0, 1])


def _plain_diffusers_prediction(tiny_sd, captions, noisy, timesteps):
    """The base's prediction, computed with nothing of loracraft: fresh diffusers/transformers models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
    te = CLIPTextModel.from_pretrained(str(tiny_sd / "text_encoder"))
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet"))
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(noisy, timesteps, te(ids)[0]).sample


@pytest.mark.parametrize("adapter", [{}, {"lora.text_encoder": "{rank: 4, alpha: 4}"}, {"lora.type": "loha"},
                                     {"train.gradient_checkpointing": True},
                                     {"lora.targets": "[to_q, to_v, conv1, conv2]"}],
                         ids=["unet-lora", "with-text-encoder-lora", "loha", "checkpointing", "conv-targets"])
def test_preserved_rows_target_the_base_prediction_with_every_adapter_off(
        tiny_sd, half_styled, tmp_path, make_trainer, adapter):
    """unet-lora, text-encoder-lora and conv-targets take the one-pass path (adapters off per row),
    loha and gradient checkpointing the second no-grad pass: both must give the base's own prediction."""
    over = {"preserve.trigger": TRIGGER, "preserve.weight": 4, "train.batch_size": 4, **adapter}
    trainer = make_trainer(tiny_sd, half_styled, tmp_path / "r", **over)
    torch.manual_seed(0)
    for p in trainer.trainables.values():  # a LoRA far from zero: the base pass must switch it off
        torch.nn.init.normal_(p, std=0.2)
    batch = next(trainer.batches)
    caps = batch["captions"]
    rows = torch.tensor([TRIGGER not in c and c != "" for c in caps])
    assert 0 < int(rows.sum()) < len(caps)
    noisy, t = torch.randn(len(caps), 4, 16, 16), torch.randint(0, 1000, (len(caps),))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    kwargs = trainer.conditioning.unet_kwargs(trainer._text(batch), None)
    with torch.no_grad():
        lora_pred = unet(noisy, t, **kwargs).sample
        pred, base_pred = trainer._with_base_prediction(batch, rows, noisy, t, kwargs)
        lora_pred_after = unet(noisy, t, **kwargs).sample

    base = _plain_diffusers_prediction(tiny_sd, [c for c, r in zip(caps, rows, strict=True) if r], noisy[rows], t[rows])
    torch.testing.assert_close(base_pred, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, lora_pred, rtol=1e-4, atol=1e-5)  # every row, preserved ones too
    assert (lora_pred[rows] - base).abs().max() > 1e-3  # the adapter was on, and it matters
    assert torch.equal(lora_pred, lora_pred_after)  # adapters are back on afterwards (no hook left)


def test_one_pass_and_two_pass_preservation_give_the_same_gradients(
        tiny_sd, half_styled, tmp_path, make_trainer, monkeypatch):
    """The preserved rows riding along in the training pass (detached) change no gradient: the
    LoRA gradients equal those of a separate no-grad base pass."""
    import loracraft.train.trainer as trainer_module

    trainer = make_trainer(tiny_sd, half_styled, tmp_path / "r",
                           **{"preserve.trigger": TRIGGER, "preserve.weight": 4, "train.batch_size": 4})
    torch.manual_seed(0)
    for p in trainer.trainables.values():
        torch.nn.init.normal_(p, std=0.2)
    batch = next(trainer.batches)
    grads, losses = [], []
    for one_pass in (True, False):
        monkeypatch.setattr(trainer_module, "per_row_switch_possible", lambda *a, one_pass=one_pass: one_pass)
        loss = trainer.compute_loss(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in trainer.trainables.items()})
        for p in trainer.trainables.values():
            p.grad = None
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7)


def test_a_fresh_adapter_has_zero_loss_on_preserved_rows(tiny_sd, half_styled, tmp_path, make_trainer):
    """LoRA's B starts at zero, so the model equals the base: preserved rows contribute nothing."""
    trainer = make_trainer(tiny_sd, half_styled, tmp_path / "r",
                           **{"preserve.trigger": TRIGGER, "preserve.weight": 4, "train.batch_size": 4})
    batch = next(trainer.batches)
    rows = preserved_rows(batch["captions"], TRIGGER, False)
    with torch.no_grad():
        assert trainer.compute_loss(select_rows(batch, rows)).item() == 0.0
        assert trainer.compute_loss(select_rows(batch, ~rows)).item() > 0.0


def test_training_with_a_trigger_in_no_caption_stops_before_loading_weights(
        tiny_sd, half_styled, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, half_styled, tmp_path / "r", setup=False, **{"preserve.trigger": "zzz"})
    with pytest.raises(ConfigError, match="preserve.trigger 'zzz' appears in no caption"):
        trainer.setup()


def test_preserved_training_resumes_exactly(
        tiny_sd, half_styled, tmp_path, resume_split):
    """4 steps straight == 2 steps + resume + 2; and it trains (the adapter moves)."""
    over = {"preserve.trigger": TRIGGER, "preserve.weight": 10, "train.batch_size": 4,
            "train.max_steps": 4, "checkpoint.every": 2}
    a, c = resume_split(tiny_sd, half_styled, tmp_path, **over)
    assert any(p.abs().max() > 0 for n, p in a.trainables.items() if "lora_B" in n)
    for n, p in a.trainables.items():
        assert torch.equal(p, c.trainables[n]), n


def test_sdxl_preserved_rows_keep_their_own_text_and_size_conditioning(tiny_sdxl, half_styled, tmp_path, make_trainer):
    """SDXL's extra inputs (pooled text, add_time_ids) must be sub-selected with the rows: the
    sub-batch base pass equals diffusers' own adapter switch on the whole batch, row for row."""
    trainer = make_trainer(tiny_sdxl, half_styled, tmp_path / "r",
                           **{"preserve.trigger": TRIGGER, "train.batch_size": 4})
    torch.manual_seed(0)
    for p in trainer.trainables.values():
        torch.nn.init.normal_(p, std=0.2)
    batch = next(trainer.batches)
    rows = preserved_rows(batch["captions"], TRIGGER, False)
    assert 0 < int(rows.sum()) < len(rows)
    n, shape = len(rows), batch["latent_mean"].shape[1:]
    noisy, t = torch.randn(n, *shape), torch.randint(0, 1000, (n,))
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    kwargs = trainer.conditioning.unet_kwargs(trainer._text(batch), batch["size_cond"])
    assert "added_cond_kwargs" in kwargs
    with torch.no_grad():
        pred, base = trainer._with_base_prediction(batch, rows, noisy, t, kwargs)
        unet.disable_adapters()
        whole = unet(noisy, t, **kwargs).sample
        unet.enable_adapters()
        lora = unet(noisy, t, **kwargs).sample
    torch.testing.assert_close(base, whole[rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, lora, rtol=1e-4, atol=1e-5)
    assert (lora[rows] - whole[rows]).abs().max() > 1e-3
