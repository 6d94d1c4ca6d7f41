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
        (["check-data", "{tmp}/no-such-dir"], 2, ["dataset folder not found", "no-such-dir"]),
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


# ----------------------------------------------------------------------------- safety findings
def _png(path: Path, shade: int = 90) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (shade, 90, 200)).save(path)


def _good(root: Path, n: int = 2) -> None:
    for i in range(n):
        _png(root / f"good{i}.png", 30 * i)
        (root / f"good{i}.txt").write_text(f"a good picture {i}")


def _linked_caption(root: Path, outside: Path) -> None:
    _good(root)
    (outside / "hostname").write_text("secret-host-name")
    _png(root / "hostname.png")
    (root / "hostname.txt").symlink_to(outside / "hostname")


def _linked_image(root: Path, outside: Path) -> None:
    _good(root)
    _png(outside / "elsewhere.png")
    (root / "linked.png").symlink_to(outside / "elsewhere.png")
    (root / "linked.txt").write_text("a linked picture")


def _metadata(root: Path, rows: list[dict]) -> None:
    for i in range(2):
        _png(root / f"good{i}.png", 30 * i)
    rows = [{"file_name": f"good{i}.png", "text": f"a good picture {i}"} for i in range(2)] + rows
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dotdot(root: Path, outside: Path) -> None:
    _png(root.parent / "x.png")
    _metadata(root, [{"file_name": "../x.png", "text": "up and out"}])


def _absolute(root: Path, outside: Path) -> None:
    _png(outside / "abs.png")
    _metadata(root, [{"file_name": str(outside / "abs.png"), "text": "anywhere"}])


def _number_caption(root: Path, outside: Path) -> None:
    _png(root / "n.png")
    _metadata(root, [{"file_name": "n.png", "text": 12345}])


def _control_names(root: Path, outside: Path) -> None:
    _good(root)
    _png(root / "two\nlines.png", 200)  # no caption: missing-caption, shown escaped
    _png(root / "red\x1b[31m.png", 220)


def _many_bad_lines(root: Path, outside: Path) -> None:
    _metadata(root, [])
    with (root / "metadata.jsonl").open("a") as f:
        f.write('{not json\n[1, 2]\n{"text": "no file"}\n{"file_name": 7, "text": "x"}\n')


OUTSIDE_FIX = "copy the file into the dataset folder, or set data.allow_outside_links=true"
#: (case, builder, the expected finding lines (a {out} placeholder is the outside folder), exit code)
SAFETY_CASES = [
    ("caption link", _linked_caption,
     ["error    hostname.png: caption file hostname.txt is a link to {out}/hostname, outside the dataset "
      f"folder; {OUTSIDE_FIX} (check-data: --allow-outside-links) if you trust it [outside-link]"], 1),
    ("image link", _linked_image,
     ["error    linked.png: image is a link to {out}/elsewhere.png, outside the dataset folder; "
      f"{OUTSIDE_FIX} (check-data: --allow-outside-links) if you trust it [outside-link]"], 1),
    ("../ in metadata", _dotdot,
     ["error    ../x.png: metadata.jsonl line 3 names a relative path to {up}/x.png, outside the dataset "
      f"folder; {OUTSIDE_FIX} (check-data: --allow-outside-links) if you trust it [outside-path]"], 1),
    ("absolute path", _absolute,
     ["error    {out}/abs.png: metadata.jsonl line 3 names an absolute path to {out}/abs.png, outside the "
      f"dataset folder; {OUTSIDE_FIX} (check-data: --allow-outside-links) if you trust it [outside-path]"], 1),
    ("number caption", _number_caption,
     ["error    n.png: its 'text' in metadata.jsonl line 3 is a number (12345), not text; "
      'write it as a quoted string, e.g. "12345" [caption-not-text]'], 1),
    ("control characters", _control_names,
     ["error    red\\x1b[31m.png: image has no caption; add red\\x1b[31m.txt beside it [missing-caption]",
      "error    two\\nlines.png: image has no caption; add two\\nlines.txt beside it [missing-caption]"], 1),
    ("every bad metadata line", _many_bad_lines,
     ["error    metadata.jsonl: line 3 of metadata.jsonl is not JSON (Expecting property name enclosed in "
      "double quotes); fix that line (one JSON object per line) [bad-metadata]",
      "error    metadata.jsonl: line 4 of metadata.jsonl is not a JSON object; write one "
      '{"file_name": ..., "text": ...} object per line [bad-metadata]',
      "error    metadata.jsonl: line 5 of metadata.jsonl has no file_name; give every row a file_name "
      "relative to the folder [bad-metadata]",
      "error    metadata.jsonl: line 6 of metadata.jsonl has a file_name that is not text (7); write it as "
      'a quoted path, e.g. "0001.png" [bad-metadata]'], 1),
]


@pytest.mark.parametrize("case, build, expected, code", SAFETY_CASES, ids=[c[0] for c in SAFETY_CASES])
def test_safety_findings_one_line_each(capsys, tmp_path, case, build, expected, code):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    build(root, outside)
    before = tree_hashes(tmp_path)
    got, out, err = run_main(capsys, "check-data", root)
    assert got == code, out + err
    findings = [line for line in out.splitlines() if line.startswith(("error ", "warning "))]
    assert findings == [e.replace("{out}", str(outside)).replace("{up}", str(tmp_path)) for e in expected]
    assert "secret-host-name" not in out + err  # a link out is reported, never read
    (line,) = error_lines(err)
    assert f"{len(expected)} error(s)" in line
    assert tree_hashes(tmp_path) == before


def test_allow_outside_links_reads_them(capsys, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    _linked_caption(root, outside)
    before = tree_hashes(tmp_path)
    code, out, err = run_main(capsys, "check-data", root, "--allow-outside-links")
    assert code == 0 and error_lines(err) == [] and "outside-link" not in out
    assert "note: 1 file(s) outside the dataset folder are read (data.allow_outside_links)" in out
    assert tree_hashes(tmp_path) == before
