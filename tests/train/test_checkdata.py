"""check-data: exact findings per file on a messy dataset, every layout, training under data.on_error, secrets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from messy import write_messy_dataset

from loracraft.infer.errors import ConfigError, DataError
from loracraft.train.data.check import PROBLEMS, check_dataset, checked_images, inspect_image, load_tokenizer

E, W = "error", "warning"

#: The exact findings on ``write_messy_dataset(layout="txt")`` at resolution 32 with a tokenizer.
EXPECTED_TXT = {
    "empty.png": [("empty-file", E)],
    "not_an_image.png": [("unreadable-image", E)],
    "corrupt.png": [("corrupt-image", E)],
    "truncated.jpg": [("truncated-image", E)],
    "uncaptioned.png": [("missing-caption", E)],
    "latin1.png": [("caption-not-utf8", E)],
    "no_iend.png": [("incomplete-file", W)],
    "cmyk.jpg": [("cmyk-image", W)],
    "sixteen.png": [("16-bit-image", W)],
    "palette.png": [("palette-transparency", W)],
    "rgba.png": [("alpha-channel", W)],
    "float.tif": [("unusual-mode", W)],
    "small.png": [("too-small", W)],
    "wide.png": [("extreme-aspect", W)],
    "rotated.jpg": [("exif-orientation", W)],
    "blank.png": [("empty-caption", W)],
    "long.png": [("caption-too-long", W)],
    "bom.png": [("caption-bom", W)],
    "good_0_copy.png": [("duplicate-image", W)],
    "case.png": [("case-collision", W)],
    "case.txt": [("case-collision", W)],
    "orphan.txt": [("orphan-caption", W)],
    "photo.heic": [("ignored-file", W)],
    "sub/nested.png": [("ignored-file", W)],
}
EXPECTED_JSONL = {
    "corrupt.png": [("corrupt-image", E)],
    "gone.png": [("missing-file", E)],
    "uncaptioned.png": [("missing-caption", E)],
    "blank.png": [("empty-caption", W)],
    "norow.png": [("no-metadata-row", W)],
}
ERROR_FILES_TXT = sorted(f for f, found in EXPECTED_TXT.items() if found[0][1] == E)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (and the set of paths) below root: proof nothing was touched."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = write_messy_dataset(tmp_path_factory.mktemp("messy") / "txt")
    return root, tree_hashes(root)


@pytest.fixture(scope="module")
def messy_jsonl(tmp_path_factory):
    root = write_messy_dataset(tmp_path_factory.mktemp("messy") / "jsonl", layout="jsonl")
    return root, tree_hashes(root)


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return load_tokenizer(str(tiny_sd))


@pytest.fixture(scope="module")
def report(messy, tokenizer):
    return check_dataset(messy[0], resolution=32, tokenizer=tokenizer, progress=False)


# ----------------------------------------------------------------------------- findings
def test_messy_dataset_exact_findings_per_file(report, messy):
    assert report.layout == "txt-sidecars" and report.images == 25
    assert report.by_file() == EXPECTED_TXT
    assert len({p for found in EXPECTED_TXT.values() for p, _ in found}) >= 15
    assert not report.trainable and report.notes == []
    assert tree_hashes(messy[0]) == messy[1]


def test_messages_say_what_and_how_to_fix(report):
    msg = {f.file: f.message for f in report.findings}
    assert "upscaled 2.00x (short side 16 -> 32)" in msg["small.png"]
    assert "aspect ratio 3.00:1 (96x32)" in msg["wide.png"] and "keeps only 33%" in msg["wide.png"]
    assert "EXIF orientation 6" in msg["rotated.jpg"] and "exif_transpose" in msg["rotated.jpg"]
    assert "converted to RGB" in msg["cmyk.jpg"]
    assert "mode I;16" in msg["sixteen.png"] and "8 bits" in msg["sixteen.png"]
    assert "composited on white" in msg["palette.png"] and "composited on white" in msg["rgba.png"]
    assert "cut short" in msg["truncated.jpg"] and "damaged" in msg["corrupt.png"]
    assert "0 bytes" in msg["empty.png"] and "cannot identify" in msg["not_an_image.png"]
    assert "add uncaptioned.txt" in msg["uncaptioned.png"]
    assert "not UTF-8" in msg["latin1.png"] and "café" in msg["latin1.png"]
    assert "same bytes as good_0.png" in msg["good_0_copy.png"]
    assert "only in case" in msg["case.png"] and "Case.png" in msg["case.png"]
    assert "byte-order mark" in msg["bom.png"]
    assert ".heic" in msg["photo.heic"] and "not directly in" in msg["sub/nested.png"]
    for f in report.findings:
        assert "\n" not in f.line() and f.severity == PROBLEMS[f.problem][0]
        assert f.what and f.fix


def test_token_count_matches_the_tokenizer(report, tokenizer, messy):
    caption = (messy[0] / "long.txt").read_text(encoding="utf-8").strip()
    n = len(tokenizer(caption, truncation=False, verbose=False).input_ids)
    (long_finding,) = [f for f in report.findings if f.file == "long.png"]
    assert f"caption is {n} tokens" in long_finding.what and f"the last {n - 77} are cut" in long_finding.what


def test_token_count_includes_prefix_suffix_and_follows_max_token_length(tmp_path, tokenizer):
    """Counted as training tokenizes: prefix + caption + suffix joined with spaces (kohya), and
    max_token_length=150 allows 150 content tokens + BOS/EOS before anything is cut."""
    from PIL import Image

    words = " ".join(["red"] * 70)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(words, encoding="utf-8")
    plain = check_dataset(tmp_path, tokenizer=tokenizer, progress=False)
    assert "caption-too-long" not in {f.problem for f in plain.findings}
    prefix, suffix = "blue " * 5, "green " * 5
    n = len(tokenizer(f"{prefix.strip()} {words} {suffix.strip()}", truncation=False).input_ids)
    assert n > 77
    affixed = check_dataset(tmp_path, tokenizer=tokenizer, progress=False, caption_prefix=prefix.strip(),
                            caption_suffix=suffix.strip())
    (long_finding,) = [f for f in affixed.findings if f.problem == "caption-too-long"]
    assert f"is {n} tokens" in long_finding.what and f"the last {n - 77} are cut" in long_finding.what
    assert "data.max_token_length" in long_finding.fix
    windows = check_dataset(tmp_path, tokenizer=tokenizer, progress=False, caption_prefix=prefix.strip(),
                            caption_suffix=suffix.strip(), max_token_length=150)
    assert "caption-too-long" not in {f.problem for f in windows.findings}


def test_size_and_token_checks_are_skipped_with_a_note(messy):
    bare = check_dataset(messy[0], progress=False)
    problems = {p for found in bare.by_file().values() for p, _ in found}
    assert "too-small" not in problems and "caption-too-long" not in problems
    assert any("--base" in n for n in bare.notes) and any("--resolution" in n for n in bare.notes)


def test_imagefolder_metadata_findings(messy_jsonl, tokenizer):
    rep = check_dataset(messy_jsonl[0], resolution=32, tokenizer=tokenizer, progress=False)
    assert rep.layout == "imagefolder" and rep.by_file() == EXPECTED_JSONL
    msg = {f.file: f.message for f in rep.findings}
    assert "metadata.jsonl line 8" in msg["gone.png"] and "line 7 of metadata.jsonl" in msg["uncaptioned.png"]
    assert tree_hashes(messy_jsonl[0]) == messy_jsonl[1]


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt", "repeats"])
def test_clean_datasets_have_no_findings(tmp_path, layout, tokenizer):
    from loracraft.infer.testing import write_captioned_dataset

    root = write_captioned_dataset(tmp_path / layout, n=3, layout=layout)
    rep = check_dataset(root, resolution=32, tokenizer=tokenizer, progress=False)
    assert rep.findings == [] and rep.trainable and rep.images == 3
    if layout == "repeats":
        assert rep.layout == "kohya-repeats" and [e.repeats for e in rep.entries] == [2, 2, 2]


def test_kohya_images_outside_repeat_folders_are_reported(tmp_path):
    from loracraft.infer.testing import write_captioned_dataset

    root = write_captioned_dataset(tmp_path / "k", n=2, layout="repeats")
    (root / "stray.png").write_bytes((root / "2_scenes" / "0000.png").read_bytes())
    rep = check_dataset(root, progress=False)
    assert rep.by_file() == {"stray.png": [("ignored-file", W)]}
    assert "outside the N_name repeat folders" in rep.findings[0].what


def test_saved_dataset_rows(tmp_path):
    from datasets import Dataset, Features, Image, Value

    good = (write_messy_dataset(tmp_path / "src") / "good_1.png").read_bytes()
    ds = Dataset.from_dict(
        {
            "image": [
                {"bytes": good, "path": None},
                {"bytes": good[:-200], "path": None},
                {"bytes": b"junk", "path": None},
            ],
            "text": ["fine", None, "junk bytes"],
        },
        features=Features({"image": Image(), "text": Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    rep = check_dataset(tmp_path / "saved", progress=False)
    assert rep.layout == "saved-dataset"
    assert rep.by_file() == {
        "row 1": [("truncated-image", E), ("missing-caption", E)],
        "row 2": [("unreadable-image", E)],
    }
    images, skipped = checked_images(rep, "skip")
    assert (
        len(images) == 1 and images.caption(0) == "fine" and {f.file for f in skipped} == {"row 1", "row 2"}
    )


@pytest.mark.parametrize(
    "content, problem, needle",
    [
        (
            '{"file_name": "a.png", "text": "x"}\n{not json\n',
            "bad-metadata",
            "line 2 of metadata.jsonl is not JSON",
        ),
        ('{"text": "x"}\n', "bad-metadata", "has no file_name"),
        (
            '{"file_name": "a.png", "caption": "x"}\n',
            "missing-column",
            "no column 'text' (columns in metadata.jsonl: caption)",
        ),
    ],
)
def test_unreadable_metadata_is_fatal(tmp_path, content, problem, needle):
    root = write_messy_dataset(tmp_path / "m", layout="jsonl")
    (root / "metadata.jsonl").write_text(content, encoding="utf-8")
    rep = check_dataset(root, progress=False)
    (finding,) = [f for f in rep.findings if f.severity == E and f.file == "metadata.jsonl"]
    assert finding.problem == problem and needle in finding.what and finding.file == "metadata.jsonl"
    with pytest.raises(DataError) as e:
        checked_images(rep, "skip")  # dataset-level: skipping cannot help
    assert "set data.on_error=skip" not in "\n".join(e.value.problems)


def test_empty_folder_has_no_images(tmp_path):
    rep = check_dataset(tmp_path, progress=False)
    assert rep.by_file() == {".": [("no-images", E)]} and not rep.trainable


def test_inspect_image_prefers_the_decoder_over_verify():
    """A PNG without its end marker decodes fine: a warning, not an error."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    assert inspect_image(data) == []
    assert [p for p, *_ in inspect_image(data[:-12])] == ["incomplete-file"]
    assert [p for p, *_ in inspect_image(data[: len(data) // 2])] == ["truncated-image"]
    assert [p for p, *_ in inspect_image(data[:20])] == ["truncated-image"]  # cut inside the header
    assert [p for p, *_ in inspect_image(b"GIF89a but not really")] == ["unreadable-image"]


# ----------------------------------------------------------------------------- training view
def test_fail_lists_every_error_file_at_once(report, messy):
    with pytest.raises(DataError) as e:
        checked_images(report, "fail")
    problems = e.value.problems
    assert len(problems) == len(ERROR_FILES_TXT) + 1
    for name, line in zip(ERROR_FILES_TXT, problems, strict=False):
        assert str(messy[0] / name) in line and "\n" not in line
    assert "data.on_error=skip" in problems[-1] and "6 dataset error(s)" in problems[-1]


def test_skip_leaves_out_exactly_the_error_files_and_the_rest_decode(report, messy):
    images, skipped = checked_images(report, "skip")
    assert sorted({f.file for f in skipped}) == ERROR_FILES_TXT
    kept = sorted(Path(it.path).name for it in images.items)
    assert len(kept) == 25 - len(ERROR_FILES_TXT) and not set(kept) & set(ERROR_FILES_TXT)
    for i in range(len(images)):  # every warned-about image converts as its message says
        img = images.image(i)
        assert img.mode == "RGB"
    rotated = next(i for i, it in enumerate(images.items) if it.path.name == "rotated.jpg")
    assert images.image(rotated).size == (32, 48)  # 48x32 stored, EXIF rotation applied
    assert tree_hashes(messy[0]) == messy[1]


def test_skip_on_imagefolder_drops_rows(messy_jsonl):
    rep = check_dataset(messy_jsonl[0], progress=False)
    images, skipped = checked_images(rep, "skip")
    assert sorted(images.caption(i) for i in range(len(images))) == [
        "",
        "caption of good_0.png",
        "caption of good_1.png",
        "caption of good_2.png",
        "caption of good_3.png",
    ]
    assert {f.file for f in skipped} == {"corrupt.png", "gone.png", "uncaptioned.png"}
    images.fingerprint()  # reads every kept image: the missing file is really gone from the list


# ----------------------------------------------------------------------------- trainer
def _cfg(tiny_sd, data, out, *over):
    from loracraft.train.config import build_config

    return build_config(
        {"model": {"base": str(tiny_sd)}, "data": {"path": str(data), "resolution": 32}},
        [
            "train.batch_size=2",
            "train.max_steps=1",
            "lora.rank=2",
            "output.report_to=[]",
            f"output.dir={out}",
            *over,
        ],
    )


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_trainer_fails_before_loading_weights(tiny_sd, messy, tmp_path):
    from loracraft.train.trainer import LoraTrainer

    _reset_accelerate()
    trainer = LoraTrainer(_cfg(tiny_sd, messy[0], tmp_path / "run"))
    with pytest.raises(DataError) as e:
        trainer.setup()
    assert getattr(trainer, "c", None) is None, "model weights were loaded before the data check"
    assert len(e.value.problems) == len(ERROR_FILES_TXT) + 1
    assert not (tmp_path / "run" / "run.json").exists()
    assert tree_hashes(messy[0]) == messy[1]


def test_batch_larger_than_dataset(tiny_sd, tmp_path):
    from loracraft.infer.testing import write_captioned_dataset
    from loracraft.train.trainer import LoraTrainer

    data = write_captioned_dataset(tmp_path / "three", n=3)
    _reset_accelerate()
    trainer = LoraTrainer(_cfg(tiny_sd, data, tmp_path / "run", "train.batch_size=4"))
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is larger than the dataset \(3 samples"):
        trainer.setup()
    assert getattr(trainer, "c", None) is None


SECRET = "lcsecret-7f3a9c1e-do-not-log"


@pytest.fixture(scope="module")
def skip_run(tiny_sd, messy, tmp_path_factory):
    """One real 1-step run on the messy set with data.on_error=skip, tokens in the environment,
    tensorboard, a validation grid and a checkpoint: every place a secret could leak to."""
    import os

    from loracraft.train.trainer import run_training

    out = tmp_path_factory.mktemp("skip") / "run"
    cfg = _cfg(
        tiny_sd,
        messy[0],
        out,
        "data.on_error=skip",
        "output.report_to=[tensorboard]",
        "checkpoint.every=1",
        "validation.prompts=[a red circle]",
        "validation.every=1",
        "validation.num_images=1",
        "validation.steps=2",
    )
    env = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "WANDB_API_KEY": SECRET}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _reset_accelerate()
    import contextlib
    import io

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            run_training(cfg)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out, log.getvalue()


def test_skip_trains_without_the_error_files(skip_run):
    out, log = skip_run
    assert f"skipped {len(ERROR_FILES_TXT)} of 25 images with errors (data.on_error=skip)" in log
    assert all(name in log for name in ERROR_FILES_TXT)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["data"]["on_error"] == "skip"
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == str(25 - len(ERROR_FILES_TXT))


def test_dataset_is_byte_identical_after_training(skip_run, messy):
    assert tree_hashes(messy[0]) == messy[1]


def test_no_secret_in_any_run_file_or_log(skip_run):
    out, log = skip_run
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {p.name.split(".")[0] for p in files}
    assert {".json", ".safetensors", ".png", ".jsonl"} <= kinds and "events" in kinds, kinds
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == [] and SECRET not in log


def test_scrub_masks_credential_like_keys():
    from loracraft.train.manifest import scrub

    cfg = {
        "model": {"base": "x", "hub_token": SECRET, "revision": None},
        "output": {"wandb": {"api_key": SECRET, "WANDB_API_KEY": SECRET}},
        "extra": [{"password": SECRET}, {"client_secret": SECRET, "keep": 1}],
    }
    scrubbed = scrub(cfg)
    assert SECRET not in json.dumps(scrubbed)
    assert scrubbed["model"]["base"] == "x" and scrubbed["extra"][1]["keep"] == 1


def test_config_errors_do_not_echo_secret_values():
    from loracraft.train.config import build_config

    with pytest.raises(ConfigError) as e:
        build_config({"model": {"base": "x", "hub_token": SECRET}, "data": {"path": "d"}})
    text = "\n".join(e.value.problems)
    assert "model.hub_token" in text and SECRET not in text


# ----------------------------------------------------------------------------- links out of the folder
def test_training_refuses_links_out_unless_allowed(tiny_sd, tmp_path):
    """`hostname.txt -> <elsewhere>/hostname` must not silently become a caption."""
    from loracraft.infer.testing import write_captioned_dataset
    from loracraft.train.trainer import LoraTrainer

    data = write_captioned_dataset(tmp_path / "data", n=2, layout="txt")
    (tmp_path / "hostname").write_text("secret-host-name")
    (data / "hostname.png").write_bytes((data / "0000.png").read_bytes())
    (data / "hostname.txt").symlink_to(tmp_path / "hostname")
    before = tree_hashes(tmp_path)

    def setup_data(*over):
        _reset_accelerate()
        trainer = LoraTrainer(_cfg(tiny_sd, data, tmp_path / "run", "train.batch_size=1", *over))
        trainer.accelerator = trainer._setup_accelerator()
        return trainer._setup_data()

    with pytest.raises(DataError) as e:
        setup_data()
    assert e.value.problems[0] == (
        f"caption file hostname.txt is a link to {tmp_path / 'hostname'}, outside the dataset folder, "
        f"{data / 'hostname.png'}, copy the file into the dataset folder, or set data.allow_outside_links=true "
        "(check-data: --allow-outside-links) if you trust it [outside-link]"
    )
    assert "secret-host-name" not in "\n".join(e.value.problems)
    skipped = setup_data("data.on_error=skip")
    assert [it.key for it in skipped.items] == ["0000.png", "0001.png"]
    allowed = setup_data("data.allow_outside_links=true")
    assert [(it.key, it.caption) for it in allowed.items][-1] == ("hostname.png", "secret-host-name")
    assert tree_hashes(tmp_path) == before


def test_saved_dataset_with_number_captions(tmp_path):
    from datasets import Dataset, Features, Image, Value

    good = (write_messy_dataset(tmp_path / "src") / "good_1.png").read_bytes()
    ds = Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}] * 2, "text": [12345, None]},
        features=Features({"image": Image(), "text": Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    rep = check_dataset(tmp_path / "saved", progress=False)
    assert rep.by_file() == {
        "row 0": [("caption-not-text", E)],
        "row 1": [("missing-caption", E), ("duplicate-image", W)],
    }
    (line,) = [f.line() for f in rep.findings if f.file == "row 0"]
    assert line == (
        "error    row 0: its 'text' is a number (12345), not text; store the 'text' column as strings [caption-not-text]"
    )
