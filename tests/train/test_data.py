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
