"""`loracraft check-data` and the trainer's data/config checks at the command line: exit codes,
one line per problem naming the file or key, no traceback, the dataset untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from messy import write_messy_dataset

from loracraft.train.cli import main
from loracraft.train.data.check import check_dataset, load_tokenizer

ERROR_FILES = [
    "corrupt.png",
    "empty.png",
    "latin1.png",
    "not_an_image.png",
    "truncated.jpg",
    "uncaptioned.png",
]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("loracraft: error:")]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = write_messy_dataset(tmp_path_factory.mktemp("cli-messy") / "data")
    return root, tree_hashes(root)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- check-data
def test_check_data_on_the_messy_set(cli, messy, tiny_sd, tmp_path):
    root, before = messy
    fix = tmp_path / "fix.json"
    proc = cli("check-data", root, "--resolution", "32", "--base", tiny_sd, "--fix-report", fix)
    assert proc.returncode == 1, proc.stderr
    (err,) = error_lines(proc.stderr)
    assert "6 error(s) in 6 file(s)" in err and str(root) in err and "data.on_error=skip" in err
    expected = check_dataset(root, 32, load_tokenizer(str(tiny_sd)), progress=False)
    lines = proc.stdout.splitlines()
    for f in expected.findings:  # one line per finding: severity, file, what; fix [class]
        assert f.line() in lines, f.line()
    assert any(line.startswith("problem ") and "severity" in line for line in lines)
    assert "25 images (txt-sidecars): 6 errors in 6 files, 18 warnings" in proc.stdout
    written = json.loads(fix.read_text())
    assert written["trainable"] is False and written["images"] == 25
    assert [(f["file"], f["problem"], f["severity"]) for f in written["findings"]] == [
        (f.file, f.problem, f.severity) for f in expected.findings
    ]
    assert sorted({f["file"] for f in written["findings"] if f["severity"] == "error"}) == ERROR_FILES
    assert tree_hashes(root) == before


def test_check_data_clean_dataset_exits_zero(capsys, tiny_dataset):
    code, out, err = run_main(capsys, "check-data", tiny_dataset, "--resolution", "32")
    assert code == 0 and error_lines(err) == []
    assert "dataset is trainable" in out and "note: caption token lengths not checked" in out


def test_check_data_takes_captionless_dreambooth_instance_images_with_instance_prompt(capsys, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"dog{i}.png")
    code, out, err = run_main(capsys, "check-data", tmp_path)
    assert code == 1 and "caption" in out  # as a captioned dataset: every image lacks its caption
    code, out, err = run_main(capsys, "check-data", tmp_path, "--instance-prompt", "a photo of sks dog")
    assert code == 0 and error_lines(err) == [] and "dataset is trainable" in out
    code, out, err = run_main(capsys, "check-data", tmp_path, "--instance-prompt", " ")
    assert code == 2 and error_lines(err) == ["loracraft: error: --instance-prompt is empty, command line, "
                                              'pass e.g. --instance-prompt "a photo of sks dog"']


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["check-data", "{tmp}/no-such-dir"], 1, ["dataset folder not found", "no-such-dir"]),
        (["check-data", "{data}", "--base", "{tmp}"], 2, ["cannot load the tokenizer", "--base"]),
        (["check-data", "{data}", "--resolution", "0"], 2, ["--resolution must be positive"]),
    ],
)
def test_check_data_usage_errors(capsys, tmp_path, tiny_dataset, args, code, needles):
    argv = [a.format(tmp=tmp_path, data=tiny_dataset) for a in args]
    got, _, err = run_main(capsys, *argv)
    (line,) = error_lines(err)
    assert got == code and all(n in line for n in needles), line


# ----------------------------------------------------------------------------- train
def _recipe(tmp_path, base, data, extra=""):
    p = tmp_path / "c.yaml"
    p.write_text(
        f"model: {{base: {base}}}\ndata: {{path: {data}, resolution: 32}}\n"
        f"train: {{max_steps: 1, batch_size: 2}}\noutput: {{dir: {tmp_path / 'out'}, report_to: []}}\n{extra}"
    )
    return p


def test_train_on_messy_data_fails_up_front_listing_every_bad_file(cli, messy, tiny_sd, tmp_path):
    root, before = messy
    proc = cli("train", _recipe(tmp_path, tiny_sd, root))
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == len(ERROR_FILES) + 1
    for name, line in zip(ERROR_FILES, lines, strict=False):
        assert str(root / name) in line
    assert "data.on_error=skip" in lines[-1]
    assert not (tmp_path / "out" / "run.json").exists()
    assert tree_hashes(root) == before


def test_config_problems_reported_together(capsys, tmp_path, tiny_sd, tiny_dataset):
    recipe = _recipe(tmp_path, tiny_sd, tiny_dataset)
    code, _, err = run_main(
        capsys, "train", recipe, "data.resolution=36", "train.warmup_steps=3", "data.on_error=ignore"
    )
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 2, lines  # field errors first; contradictions are checked once fields are valid
    assert "'data.resolution'" in lines[0] and "multiple of 8" in lines[0] and "use 32 or 40" in lines[0]
    assert "'data.on_error'" in lines[1] and "'fail' or 'skip'" in lines[1]
    code, _, err = run_main(capsys, "train", recipe, "train.warmup_steps=3", "train.max_steps=10")
    (line,) = error_lines(err)
    assert (
        code == 2
        and "train.warmup_steps=3" in line
        and "lr_scheduler=constant" in line
        and str(recipe) in line
    )


def test_batch_larger_than_dataset(capsys, tmp_path, tiny_sd, tiny_dataset):
    code, _, err = run_main(capsys, "train", _recipe(tmp_path, tiny_sd, tiny_dataset), "train.batch_size=9")
    (line,) = error_lines(err)
    assert (
        code == 2 and "train.batch_size=9" in line and "(8 samples per epoch)" in line and "at most 8" in line
    )
