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
    with pytest.raises(DataError, match=r"no column 'caption'.*columns: .*text.*data.caption_column"):
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
