"""data.concepts: several datasets in one run, each with its own repeats, caption and crop settings
and resolution; counted against the repeat formula, the caption rules, one size per global batch,
one-line config errors, check-data per concept, and exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from loracraft.infer.errors import DataError, DataNotFound
from loracraft.train.config import build_config
from loracraft.train.data import TrainingExamples, collate, positions_for
from loracraft.train.data.concepts import (
    check_concepts,
    checked_concept_images,
    concept_planner,
    concepts_fingerprint,
    resolve_concepts,
)

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def _folder(
    root: Path, captions: list[str], size: tuple[int, int] = (32, 32), repeat_dir: int | None = None
) -> Path:
    """PNG + .txt sidecar per caption; with ``repeat_dir`` N inside a kohya ``N_things`` folder."""
    img_dir = root / f"{repeat_dir}_things" if repeat_dir else root
    img_dir.mkdir(parents=True)
    for k, caption in enumerate(captions):
        Image.new("RGB", size, COLORS[k % len(COLORS)]).save(img_dir / f"{root.name}{k}.png")
        (img_dir / f"{root.name}{k}.txt").write_text(caption, encoding="utf-8")
    return root


def _config(concepts: list[dict], path: Path | None = None, **data):
    """A run's config with ``data.concepts`` (and ``data.path`` when given), as the YAML would give it."""
    tree = {
        "model": {"base": "x"},
        "data": {"path": str(path) if path else None, "resolution": 32, "concepts": concepts, **data},
    }
    return build_config(tree, ["train.batch_size=2"])


def _images(cfg):
    concepts = resolve_concepts(cfg.data)
    reports = check_concepts(concepts, progress=False, allow_outside_links=cfg.data.allow_outside_links)
    return checked_concept_images(reports, concepts, cfg.data.on_error)[0]


def _planner(cfg, num_processes: int = 1):
    images = _images(cfg)
    sizes = [images.size(i) for i in range(len(images))]
    return concept_planner(images, cfg, sizes, num_processes, lambda _line: None)


# ----------------------------------------------------------------------------- repeats
def test_an_epoch_holds_each_image_folder_repeats_times_concept_repeats(tmp_path):
    a = _folder(tmp_path / "a", ["a one", "a two"], repeat_dir=2)  # kohya 2_things: folder repeats 2
    b = _folder(tmp_path / "b", ["b one", "b two", "b three"])
    plain = _folder(tmp_path / "plain", ["p one"])
    cfg = _config([{"path": str(a), "repeats": 3}, {"path": str(b)}], path=plain)
    planner = _planner(cfg)
    images = planner.images
    # data.path first (repeats 1), then the concepts in order; a: 2 (folder) x 3 (concept) = 6
    expected = {"p one": 1, "a one": 6, "a two": 6, "b one": 1, "b two": 1, "b three": 1}
    assert planner.stream.epoch_length == sum(expected.values()) == 16
    for epoch in (0, 1):
        seen = Counter(
            images.caption(planner.stream.item_at(p))
            for p in range(epoch * planner.stream.epoch_length, (epoch + 1) * planner.stream.epoch_length)
        )
        assert seen == expected
    assert [images.items[i].concept for i in range(len(images))] == [0, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------- captions
def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def test_each_concepts_caption_options_reach_the_text_encoder(tmp_path):
    a = _folder(tmp_path / "a", ["red, round, small, shiny", "green, square, large, matte"])
    b = _folder(tmp_path / "b", ["a blue card, plain"])
    cfg = _config(
        [
            {"path": str(a), "caption_prefix": "sks,", "keep_tokens": 1, "shuffle_tags": True},
            {"path": str(b), "caption_suffix": "in lcstyle"},
        ],
        caption_prefix="photo of",
    )  # data.caption_prefix: the default of concepts that set none
    planner = _planner(cfg)
    by_concept: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
    for p in range(60):
        plan = planner.plan(p)
        item = planner.images.items[plan.index]
        by_concept[item.concept].append((item.caption, plan.caption))
    orders = set()
    for raw, seen in by_concept[0]:
        # caption_prefix is joined with a space before tags are split; keep_tokens=1 keeps it first,
        # shuffle_tags permutes the rest (no tag dropout: every tag survives)
        tags = _tags(seen)
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(_tags(raw)), seen
        orders.add(tuple(tags[1:]))
    assert len(orders) > 2  # really shuffled
    for raw, seen in by_concept[1]:  # b: no shuffling; data.caption_prefix, caption, its suffix, spaced
        assert seen == f"photo of {raw} in lcstyle"
    # the uncached path encodes exactly the planned captions
    batch = collate([TrainingExamples(planner)[p] for p in range(4)])
    assert batch["captions"] == [planner.plan(p).caption for p in range(4)]


def test_a_concepts_shuffled_tags_turn_the_text_cache_off_like_the_global_option(tmp_path):
    from loracraft.train.cache import cache_plan

    a = _folder(tmp_path / "a", ["x, y"])
    b = _folder(tmp_path / "b", ["z"])
    square = [(32, 32), (32, 32)]
    fixed = cache_plan(_config([{"path": str(a)}, {"path": str(b)}], center_crop=True), square, square)
    assert fixed.text and fixed.latents
    shuffled = _config([{"path": str(a)}, {"path": str(b), "tag_dropout": 0.2}], center_crop=True)
    plan = cache_plan(shuffled, square, square)
    assert not plan.text and plan.latents
    assert any("data.concepts[1].tag_dropout" in n for n in plan.notes), plan.notes
    # a concept that turns the global option off keeps captions fixed
    off = _config([{"path": str(a), "shuffle_tags": False}], shuffle_tags=True, center_crop=True)
    assert cache_plan(off, square[:1], square[:1]).text
    # a concept without center_crop whose images need cropping turns the latent cache off
    wide = _config([{"path": str(a), "center_crop": False}, {"path": str(b)}], center_crop=True)
    plan = cache_plan(wide, [(48, 32), (48, 32)], square, [False, True])
    assert not plan.latents and "1 image(s) are randomly cropped" in plan.notes[0]


# ----------------------------------------------------------------------------- resolutions
@pytest.mark.parametrize("buckets", [False, True])
def test_concepts_of_two_resolutions_never_share_a_batch(tmp_path, buckets):
    a = _folder(tmp_path / "a", [f"a{k}" for k in range(3)])
    b = _folder(tmp_path / "b", [f"b{k}" for k in range(5)], size=(48, 48))
    cfg = _config(
        [{"path": str(a), "repeats": 2}, {"path": str(b), "resolution": 48}], buckets=buckets, bucket_step=16
    )
    processes, batch = 2, 2
    planner = _planner(cfg, num_processes=processes)
    assert {planner.targets[i] for i, it in enumerate(planner.images.items) if it.concept == 1} == {(48, 48)}
    sizes = set()
    for step in range(3 * planner.stream.epoch_length // (batch * processes)):  # three epochs
        # every rank's slice of one global batch: the same size everywhere
        positions = [p for r in range(processes) for p in positions_for(step, batch, processes, r)]
        targets = {planner.plan(p).target for p in positions}
        assert len(targets) == 1, (step, targets)
        sizes |= targets
    assert sizes == {(32, 32), (48, 48)}
    shapes = {
        collate([TrainingExamples(planner)[p] for p in positions_for(s, 2, 1, 0)])["pixel_values"].shape[-1]
        for s in range(6)
    }
    assert shapes <= {32, 48}


# ----------------------------------------------------------------------------- errors
def test_bad_concept_keys_are_one_line_errors_naming_the_item(capsys):
    from loracraft.train.cli import main

    recipe = str(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    over = ["model.base=/nonexistent-base", "data.path=null"]
    assert main(["train", recipe, *over, "data.concepts=[{path: /a}, {path: /b, repeat: 2}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'data.concepts[1].repeat'" in err[0], err
    assert "did you mean 'repeats'" in err[0]
    assert main(["train", recipe, *over, "data.concepts=[{path: /a}, {repeats: 2}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required config key 'data.concepts[1].path' is not set" in err[0], err
    assert main(["train", recipe, *over, "data.concepts=[{path: /a, repeats: 0}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'data.concepts[0].repeats' (got 0)" in err[0], err
    # neither data.path nor a concept: the missing required key, as before
    assert main(["train", recipe, *over]) == 2
    assert "required config key 'data.path' is not set" in capsys.readouterr().err


def test_a_missing_concept_folder_names_its_key(tmp_path):
    a = _folder(tmp_path / "a", ["a"])
    cfg = _config([{"path": str(a)}, {"path": str(tmp_path / "gone")}])
    with pytest.raises(
        DataNotFound, match=r"dataset folder not found, .*gone, check data\.concepts\[1\]\.path"
    ):
        _images(cfg)


def test_dreambooth_with_concepts_is_refused(tmp_path):
    from loracraft.infer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_config(
            {
                "model": {"base": "x"},
                "data": {"path": "x", "concepts": [{"path": "y"}]},
                "dreambooth": {"instance_prompt": "a sks dog", "prior_preservation": False},
            }
        )
    assert e.value.problems == [
        "dreambooth and data.concepts are both set (DreamBooth's instance images are the one folder data.path), "
        "config, put the instance images in data.path and remove data.concepts"
    ]


# ----------------------------------------------------------------------------- check-data
def test_check_data_checks_every_concept_and_names_its_path(tmp_path, capsys):
    from loracraft.train.cli import main

    a = _folder(tmp_path / "a", ["a one"])
    b = _folder(tmp_path / "b", ["b one", "b two"])
    (b / "b1.png").write_bytes(b"")  # an empty image in the second concept
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data:\n  resolution: 32\n  concepts:\n    - path: {a}\n    - path: {b}\n      repeats: 2\n"
    )
    report = tmp_path / "report.json"
    assert main(["check-data", "--config", str(recipe), "--fix-report", str(report)]) == 1
    out, err = capsys.readouterr()
    blocks = out.split("loracraft check-data: ")[1:]
    assert len(blocks) == 2 and blocks[0].startswith(f"{a} (") and blocks[1].startswith(f"{b} (")
    assert "[data.concepts[1]]" in blocks[1] and "b1.png: file is empty" in blocks[1]
    assert "error" not in blocks[0].split("\n")[1]  # the first concept is clean
    assert "data.concepts[1] untrainable" in err and str(b) in err
    saved = json.loads(report.read_text())
    assert not saved["trainable"] and [c["dataset"] for c in saved["concepts"]] == [str(a), str(b)]
    assert saved["concepts"][1]["findings"][0]["problem"] == "empty-file"
    # training's own pre-check stops on the same file, named by its full path
    cfg = _config([{"path": str(a)}, {"path": str(b)}])
    with pytest.raises(DataError) as e:
        _images(cfg)
    assert e.value.problems[0].startswith("data.concepts[1]: ") and str(b / "b1.png") in e.value.problems[0]
    # data.on_error=skip leaves out that image only
    skipped = _images(_config([{"path": str(a)}, {"path": str(b)}], on_error="skip"))
    assert sorted(skipped.caption(i) for i in range(len(skipped))) == ["a one", "b one"]


def test_the_fingerprint_sees_every_concept(tmp_path):
    a = _folder(tmp_path / "a", ["a one"])
    b = _folder(tmp_path / "b", ["b one"])

    def fingerprint(**b_settings):
        return concepts_fingerprint(_images(_config([{"path": str(a)}, {"path": str(b), **b_settings}])))

    first = fingerprint()
    assert fingerprint() == first
    assert fingerprint(repeats=2) != first
    (b / "b0.txt").write_text("b changed", encoding="utf-8")
    assert fingerprint() != first


# ----------------------------------------------------------------------------- training
def test_two_concept_run_resumes_exactly(tiny_sd, tmp_path, make_trainer, resume_split):
    """A two-concept run at two resolutions (one size per batch), resumed from its step-2 checkpoint,
    ends with the bits of the uninterrupted run; run.json and the adapter name what they should."""
    from safetensors import safe_open

    a = _folder(tmp_path / "a", ["red, round", "green, square"], repeat_dir=2)
    b = _folder(tmp_path / "b", ["blue, card", "yellow, card"], size=(48, 48))
    concepts = (
        f"[{{path: {a}, repeats: 2, caption_prefix: 'sks,', keep_tokens: 1, shuffle_tags: true}}, "
        f"{{path: {b}, resolution: 48, random_flip: true, caption_dropout: 0.3}}]"
    )
    over = {"data.path": "null", "data.concepts": concepts, "train.max_steps": 4, "lora.dropout": 0.1}
    straight, resumed = resume_split(tiny_sd, a, tmp_path, **over)
    assert {straight.planner.plan(p).target for p in range(16)} == {(32, 32), (48, 48)}
    for n in straight.trainables:
        assert torch.equal(straight.trainables[n], resumed.trainables[n]), n
    adapter = straight.cleanup()
    manifest = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert [c["path"] for c in manifest["config"]["data"]["concepts"]] == [str(a), str(b)]
    assert manifest["dataset_fingerprint"] == concepts_fingerprint(_images(build_config(manifest["config"])))
    with safe_open(str(adapter), "pt") as f:  # the shared header holds no local path
        assert not any(str(tmp_path) in v for v in f.metadata().values())


def test_eval_and_report_of_a_concepts_run(tmp_path):
    """eval cannot re-split a held-out fraction of several datasets: one line asking for --heldout;
    the report names every dataset the run trained on."""
    from loracraft.infer.errors import UsageError
    from loracraft.infer.names import LORA_WEIGHT_NAME
    from loracraft.train.commands.evaluate import evaluate
    from loracraft.train.commands.report import write_report
    run = tmp_path / "run"
    run.mkdir()
    (run / LORA_WEIGHT_NAME).write_bytes(b"")
    config = {"model": {"base": "unused"}, "lora": {"rank": 4, "alpha": 4},
              "data": {"path": None, "resolution": 32, "concepts": [{"path": "/d/a", "repeats": 3}, {"path": "/d/b"}]},
              "validation": {"heldout": 0.25, "prompts": [], "seed": 0, "steps": 2, "guidance": 1.0}}
    (run / "run.json").write_text(json.dumps({"config": config, "status": "complete"}))
    with pytest.raises(UsageError, match=r"data.concepts.*pass --heldout DIR"):
        evaluate(run)
    page = write_report(run, sweep=False).read_text()
    assert "/d/a (x3), /d/b (x1)" in page
