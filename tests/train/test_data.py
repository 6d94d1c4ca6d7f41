import json

import pytest
import torch

from loracraft.infer.errors import DataError
from loracraft.infer.toyworld.scenes import write_captioned_dataset
from loracraft.train.data import (
    SampleStream,
    load_captioned_images,
    positions_for,
    resize_and_crop,
)


@pytest.mark.parametrize("layout, expected", [("jsonl", "imagefolder"), ("csv", "imagefolder"), ("txt", "txt-sidecars")])
def test_each_folder_layout_reads_every_caption(tmp_path, layout, expected):
    root = write_captioned_dataset(tmp_path / layout, n=3, layout=layout, seed=1)
    data = load_captioned_images(str(root))
    assert data.layout == expected and len(data) == 3
    reference = load_captioned_images(str(write_captioned_dataset(tmp_path / "ref", n=3, seed=1)))
    assert [data.caption(i) for i in range(3)] == [reference.caption(i) for i in range(3)]
    assert data.image(0).mode == "RGB"


def test_kohya_repeat_folder_sets_repeats(tmp_path):
    root = write_captioned_dataset(tmp_path / "k", n=3, layout="repeats")
    data = load_captioned_images(str(root))
    assert data.layout == "kohya-repeats" and data.repeats() == [2, 2, 2]
    assert SampleStream(data.repeats(), seed=0).epoch_length == 6


def test_metadata_wins_over_sidecars(tmp_path):
    root = write_captioned_dataset(tmp_path / "both", n=2, layout="txt")
    rows = [{"file_name": f"{i:04d}.png", "text": f"from metadata {i}"} for i in range(2)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_captioned_images(str(root))
    assert sorted(data.caption(i) for i in range(2)) == ["from metadata 0", "from metadata 1"]


def test_saved_datasets_dataset(tmp_path):
    from datasets import Dataset, Image

    imgs = write_captioned_dataset(tmp_path / "src", n=2)
    ds = Dataset.from_dict(
        {"img": [str(imgs / "0000.png"), str(imgs / "0001.png")], "caption": ["one", "two"]}
    ).cast_column("img", Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_captioned_images(str(tmp_path / "saved"), image_column="img", caption_column="caption")
    assert data.layout == "saved-dataset" and data.caption(1) == "two" and data.image(0).size == (32, 32)


def test_missing_caption_column_names_the_columns(tmp_path):
    root = write_captioned_dataset(tmp_path / "j", n=2)
    with pytest.raises(DataError, match=r"no column 'caption' \(columns in metadata.jsonl: text\).*data.caption_column"):
        load_captioned_images(str(root), caption_column="caption")


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_captioned_images(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no captions found|no images"):
        load_captioned_images(str(tmp_path / "empty"))


def test_fingerprint_changes_with_a_caption(tmp_path):
    root = write_captioned_dataset(tmp_path / "t", n=2, layout="txt")
    before = load_captioned_images(str(root)).fingerprint()
    assert load_captioned_images(str(root)).fingerprint() == before
    (root / "0001.txt").write_text("edited caption")
    assert load_captioned_images(str(root)).fingerprint() != before


def test_stream_epochs_are_permutations_and_seeded():
    s = SampleStream([1, 1, 1, 1, 1], seed=3)
    e0 = [s.item_at(p) for p in range(5)]
    e1 = [s.item_at(p) for p in range(5, 10)]
    assert sorted(e0) == sorted(e1) == [0, 1, 2, 3, 4]
    assert e0 == [SampleStream([1] * 5, seed=3).item_at(p) for p in range(5)]
    assert e0 != [SampleStream([1] * 5, seed=4).item_at(p) for p in range(5)] or e1 != e0


def test_rank_slices_cover_the_global_batch():
    one = positions_for(3, batch_size=4, num_processes=1, rank=0)
    two = positions_for(3, 2, 2, 0) + positions_for(3, 2, 2, 1)
    assert one == two == [12, 13, 14, 15]


def test_resize_and_crop_center(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (64, 32))
    out, (top, left) = resize_and_crop(img, 16, center_crop=True, gen=torch.Generator().manual_seed(0))
    assert out.size == (16, 16) and (top, left) == (0, 8)


# ----------------------------------------------------------------------------- one reader
def _png(path, shade: int) -> bytes:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (shade, 90, 200)).save(path)
    return path.read_bytes()


def _layout(root, layout):
    """A small dataset with good and bad items; returns the (key, caption, repeats) training must see,
    in the order the layout defines (metadata row order; folders, then files, by name; dataset rows)."""
    if layout in ("jsonl", "csv"):
        for i, name in enumerate(["c.png", "a.png", "b.png"]):
            _png(root / name, 40 * i)
        rows = [("c.png", "cee"), ("a.png", "ay"), ("gone.png", "a deleted file"), ("b.png", None)]
        if layout == "jsonl":
            text = "".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows)
            (root / "metadata.jsonl").write_text(text)
            return [("c.png", "cee", 1), ("a.png", "ay", 1)]
        (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{f},{t or ''}\n" for f, t in rows))
        return [("c.png", "cee", 1), ("a.png", "ay", 1), ("b.png", "", 1)]  # CSV has no null: empty caption
    if layout == "saved":
        from datasets import Dataset, Features, Value
        from datasets import Image as HFImage

        src = [_png(root.parent / "src" / f"{i}.png", 50 * i) for i in range(3)]
        ds = Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in src], "text": ["one", None, "three"]},
            features=Features({"image": HFImage(), "text": Value("string")}),
        )
        ds.save_to_disk(str(root))
        return [("row 0", "one", 1), ("row 2", "three", 1)]
    if layout == "repeats":
        _png(root / "3_b" / "z.png", 10)
        (root / "3_b" / "z.caption").write_text("zed")
        _png(root / "10_a" / "y.png", 20)  # no caption: skipped
        _png(root / "10_a" / "x.png", 30)
        (root / "10_a" / "x.txt").write_text("ex\n")
        return [("10_a/x.png", "ex", 10), ("3_b/z.png", "zed", 3)]
    _png(root / "b.png", 10)
    (root / "b.caption").write_text("bee")
    _png(root / "a.png", 20)
    (root / "a.txt").write_text("ay")
    _png(root / "c.png", 30)  # no caption: skipped
    return [("a.png", "ay", 1), ("b.png", "bee", 1)]


@pytest.mark.parametrize("layout", ["jsonl", "csv", "saved", "repeats", "sidecars"])
def test_check_data_and_the_trainer_see_the_same_items(tiny_sd, tmp_path, layout):
    from accelerate.state import AcceleratorState

    from loracraft.train.config import build_config
    from loracraft.train.data.check import check_dataset
    from loracraft.train.trainer import LoraTrainer

    root = tmp_path / layout
    expected = _layout(root, layout)
    report = check_dataset(root, progress=False)
    skip = report.skippable()
    checked = [(e.key, e.caption, e.repeats, e.path) for e in report.entries if e.key not in skip]

    cfg = build_config(
        {"model": {"base": str(tiny_sd)}, "data": {"path": str(root), "resolution": 32, "on_error": "skip"}},
        ["output.report_to=[]", f"output.dir={tmp_path / 'run'}"],
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = LoraTrainer(cfg)
    trainer.accelerator = trainer._setup_accelerator()
    images = trainer._setup_data()  # what training draws from (no weights loaded)
    trained = [(it.key, it.caption, it.repeats, it.path) for it in images.items]

    assert [(k, c, r) for k, c, r, _ in trained] == expected
    assert trained == checked
    assert images.repeats() == [r for _, _, r in expected]
    for i, it in enumerate(images.items):  # the bytes training decodes are the file's
        if it.path is not None:
            assert images.image_bytes(i) == (root / it.key).read_bytes()
        assert images.image(i).size == (32, 32)


# ----------------------------------------------------------------------------- caption controls
def _captions(n, **controls):
    from loracraft.train.data import keyed_generator, prepare_caption

    caption = controls.pop("caption", "t0, t1, t2, t3, t4")
    args = {"dropout": 0.0, "shuffle_tags": False, **controls}
    return [prepare_caption(caption, keyed_generator(7, p, "caption"), **args) for p in range(n)]


def test_caption_prefix_and_suffix_are_joined_with_a_space():
    assert _captions(1, prefix="sks", suffix="photo") == ["sks t0, t1, t2, t3, t4 photo"]
    assert _captions(1, caption="", prefix="sks") == ["sks"]
    # kohya: the prefix is part of the first tag, so keep_tokens=1 keeps "sks t0" in front
    assert all(c.startswith("sks t0, ") for c in _captions(50, prefix="sks", keep_tokens=1, shuffle_tags=True))
    assert set(_captions(50, prefix="sks", dropout=0.5)) == {"", "sks t0, t1, t2, t3, t4"}  # dropout drops it all


def test_keep_tokens_keeps_the_first_tags_and_shuffles_the_rest_uniformly():
    import collections
    import itertools

    got = _captions(600, keep_tokens=2, shuffle_tags=True)
    assert all(c.startswith("t0, t1, ") for c in got)
    orders = collections.Counter(c[len("t0, t1, ") :] for c in got)
    assert set(orders) == {", ".join(p) for p in itertools.permutations(["t2", "t3", "t4"])}
    assert all(60 <= n <= 140 for n in orders.values()), orders  # 100 each expected; sd ~9
    assert _captions(5, keep_tokens=2) == ["t0, t1, t2, t3, t4"] * 5  # nothing random: unchanged


def test_tag_dropout_drops_each_unkept_tag_with_its_probability():
    n, p = 2000, 0.25
    got = [c.split(", ") for c in _captions(n, keep_tokens=1, tag_dropout=p)]
    assert all(tags[0] == "t0" for tags in got)  # kept tags are never dropped
    assert all(tags == sorted(tags) for tags in got)  # without shuffle_tags the order stays
    for tag in ("t1", "t2", "t3", "t4"):
        share = sum(tag in tags for tags in got) / n
        assert abs(share - (1 - p)) < 0.04, (tag, share)  # sd ~0.01
    together = sum({"t1", "t2"} <= set(tags) for tags in got) / n
    assert abs(together - (1 - p) ** 2) < 0.04  # independent draws per tag
    assert _captions(3, tag_dropout=1.0, keep_tokens=1) == ["t0"] * 3


def test_captions_depend_only_on_seed_and_position():
    """Exact resume and multi-process runs plan position p alike, whatever was planned before."""
    from types import SimpleNamespace

    from loracraft.train.data import CaptionedImages, Item, Planner, SampleStream

    cfg = SimpleNamespace(random_flip=True, caption_dropout=0.2, shuffle_tags=True, keep_tokens=1, tag_dropout=0.3,
                          caption_prefix="sks", caption_suffix="", center_crop=True, buckets=False)
    images = CaptionedImages([Item(f"a{i}, b{i}, c{i}, d{i}", key=str(i)) for i in range(4)], "test", ".")

    def planner():
        return Planner(images, SampleStream([1] * 4, seed=3), cfg, 3, [(32, 32)] * 4)

    forward = [planner().plan(p) for p in range(40)]
    one = planner()
    backward = [one.plan(p) for p in reversed(range(40))][::-1]
    assert forward == backward
    assert len({p.caption for p in forward}) > 10  # the controls really vary the captions
    assert planner().fixed_caption(2) == "sks a2, b2, c2, d2"


def test_random_captions_turn_the_text_cache_off_and_prefixes_cache_correctly(tiny_sd, tmp_path, make_trainer, capsys):
    data = write_captioned_dataset(tmp_path / "data", n=4)
    cache = {"train.cache": "true", "train.cache_dir": str(tmp_path / "cache"), "data.center_crop": "true"}
    shuffled = make_trainer(tiny_sd, data, tmp_path / "shuffled", **cache, **{
        "data.shuffle_tags": "true", "data.tag_dropout": 0.5, "data.keep_tokens": 1})
    assert "latent_lookup" in shuffled.sources and "text_lookup" not in shuffled.sources
    note = "text-embedding cache off: data.shuffle_tags and data.tag_dropout change captions every step"
    assert note in capsys.readouterr().err
    batch = next(shuffled.batches)
    assert "latent_mean" in batch and "text_embeds" not in batch
    with torch.no_grad():
        assert torch.isfinite(shuffled.compute_loss(batch))

    losses = {}
    for mode in ("true", "false"):  # a prefix is fixed: cached text embeddings hold the prefixed captions
        trainer = make_trainer(tiny_sd, data, tmp_path / f"prefix-{mode}", **{**cache, "train.cache": mode}, **{
            "data.caption_prefix": "sks", "data.caption_dropout": 0.3})
        batches = [next(trainer.batches) for _ in range(3)]
        assert ("text_embeds" in batches[0]) == (mode == "true")
        assert all(c == "" or c.startswith("sks ") for b in batches for c in b["captions"])
        with torch.no_grad():
            losses[mode] = torch.stack([trainer.compute_loss(b) for b in batches])
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- DataLoader workers
def test_num_workers_change_no_bit_and_resume_stays_exact(tiny_sd, tmp_path, make_trainer):
    """Workers only move decoding to other processes: every draw is keyed by sample position."""
    import signal

    from PIL import Image
    from safetensors.torch import load_file

    from loracraft.train.trainer import Interrupted

    data = write_captioned_dataset(tmp_path / "data", n=4)
    for png in data.glob("*.png"):  # 48x32: random crops, decoded on every step (no latent cache)
        Image.open(png).resize((48, 32)).save(png)
    over = {"train.max_steps": 4, "checkpoint.every": 2, "train.cache": "false", "data.random_flip": "true",
            "data.caption_dropout": 0.3, "lora.dropout": 0.1}

    def trained(name, workers, stop_at=None):
        trainer = make_trainer(tiny_sd, data, tmp_path / name, **over, **{"data.num_workers": workers})
        assert ("MultiProcessing" in type(trainer.batches).__name__) == (workers > 0)
        assert trainer.step == (2 if name == "resumed" and stop_at is None else 0)
        if stop_at is not None:  # as if SIGTERM arrived during step `stop_at`
            step = trainer.optimizer_step

            def stepping():
                loss = step()
                if trainer.step == stop_at:
                    trainer._signal = signal.SIGTERM
                return loss

            trainer.optimizer_step = stepping
            with pytest.raises(Interrupted):
                trainer.train()
            return None
        trainer.train()
        trainer.cleanup()
        return load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))

    inline = trained("inline", 0)
    workers = trained("workers", 2)
    assert inline.keys() == workers.keys() and all(torch.equal(inline[k], workers[k]) for k in inline)
    trained("resumed", 2, stop_at=2)
    resumed = trained("resumed", 2)  # the same command again: resumes at step 2
    assert all(torch.equal(inline[k], resumed[k]) for k in inline)
