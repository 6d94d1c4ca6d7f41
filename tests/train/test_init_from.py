"""lora.init_from: start from an existing adapter file (diffusers or kohya layout)."""

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def finished(tiny_sd, tiny_dataset, tmp_path_factory, make_trainer):
    run = tmp_path_factory.mktemp("init") / "run"
    trainer = make_trainer(tiny_sd, tiny_dataset, run, **{"train.max_steps": 3})
    trainer.train()
    trainer.cleanup()
    return run


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_init_from_a_finished_adapter_reproduces_it_before_any_step(
    finished, tiny_sd, tiny_dataset, tmp_path, make_trainer, layout
):
    source = (finished / "pytorch_lora_weights.safetensors" if layout == "diffusers"
              else next(p for p in finished.glob("*.safetensors") if p.name != "pytorch_lora_weights.safetensors"))
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **{"lora.init_from": str(source)})
    expected = load_file(finished / "pytorch_lora_weights.safetensors")
    # the file's diffusers names -> peft's parameter names in the model
    state = {f"unet.{n.replace('.default.weight', '.weight')}": p for n, p in trainer.trainables.items()}
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(state[k].detach().float(), v.float(), rtol=0, atol=1e-6 if layout == "kohya" else 0)
    assert all(not s for s in trainer.optimizer.optimizer.state.values())  # the optimizer starts fresh


def test_a_mismatched_rank_is_refused_in_one_line(finished, tiny_sd, tiny_dataset, tmp_path, make_trainer):
    from loracraft.infer.errors import ConfigError

    source = finished / "pytorch_lora_weights.safetensors"
    with pytest.raises(ConfigError) as e:
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **{"lora.init_from": str(source), "lora.rank": 4})
    assert "\n" not in str(e.value)
    assert "rank 8" in str(e.value) and "lora.rank=8" in str(e.value)


def test_other_targets_are_refused(finished, tiny_sd, tiny_dataset, tmp_path, make_trainer):
    from loracraft.infer.errors import ConfigError

    source = finished / "pytorch_lora_weights.safetensors"
    with pytest.raises(ConfigError, match="lacks .* unet layers the config trains"):
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **{"lora.init_from": str(source),
                                                                "lora.targets": "transformer"})


def test_a_resume_takes_precedence_over_init_from(finished, tiny_sd, tiny_dataset, tmp_path, make_trainer):
    over = {"lora.init_from": str(finished / "pytorch_lora_weights.safetensors"), "train.max_steps": 4}
    first = make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **over)
    for _ in range(2):
        first.optimizer_step()
    first._checkpoint()
    at_checkpoint = {n: p.detach().clone() for n, p in first.trainables.items()}
    resumed = make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **over)
    assert resumed.step == 2
    for n, p in resumed.trainables.items():
        assert torch.equal(p.detach(), at_checkpoint[n]), n
    resumed.optimizer_step()  # and the resumed optimizer state is the checkpoint's, not a fresh one
    assert all(s for s in resumed.optimizer.optimizer.state.values())
