"""Bad input at the command line: one line naming the problem, the documented exit code, no traceback.

In-process through ``loracraft.train.cli.main`` (a subprocess costs ~10 s of imports per case); the
installed entry point itself is exercised by ``test_debug_shows_the_traceback`` and the e2e runs.
"""

from types import SimpleNamespace

import pytest

from loracraft.train.cli import main


def _one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loracraft: error:")]
    assert lines, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    return lines


@pytest.fixture
def run(capsys):
    """``run("train", ...)`` -> (returncode, stderr), like the ``cli`` subprocess fixture."""

    def call(*argv):
        code = main([str(a) for a in argv])
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    return call


@pytest.fixture
def recipe(tmp_path, tiny_sd, tiny_dataset):
    def write(text):
        p = tmp_path / "c.yaml"
        p.write_text(text.replace("@BASE@", str(tiny_sd)).replace("@DATA@", str(tiny_dataset)).replace("@OUT@", str(tmp_path / "out")))
        return p

    return write


GOOD = "model: {base: @BASE@}\ndata: {path: @DATA@, resolution: 32}\noutput: {dir: @OUT@, report_to: []}\n"


def test_missing_config_file(tmp_path, run):
    _one_line_error(run("train", tmp_path / "missing.yaml"), 2, "config file not found", "missing.yaml")


def test_unknown_key(recipe, run):
    lines = _one_line_error(run("train", recipe(GOOD + "lora: {rnak: 4}\n")), 2, "lora.rnak", "lora.rank")
    assert len(lines) == 1


def test_wrong_type(recipe, run):
    _one_line_error(run("train", recipe(GOOD), "train.max_steps=lots"), 2, "train.max_steps", "lots")


def test_missing_dataset_dir(recipe, tmp_path, run):
    text = GOOD.replace("@DATA@", str(tmp_path / "no-such-data"))
    _one_line_error(run("train", recipe(text)), 2, "dataset folder not found", "no-such-data")


def test_dataset_with_zero_images(recipe, tmp_path, run):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    text = GOOD.replace("@DATA@", str(empty))
    _one_line_error(run("train", recipe(text)), 1, str(empty))


def test_missing_caption_column(recipe, run):
    _one_line_error(
        run("train", recipe(GOOD), "data.caption_column=prompt"), 1, "no column 'prompt'", "data.caption_column"
    )


def test_base_that_is_not_a_diffusers_model(recipe, tmp_path, run):
    (tmp_path / "notamodel").mkdir()
    text = GOOD.replace("@BASE@", str(tmp_path / "notamodel"))
    _one_line_error(run("train", recipe(text)), 2, "not a diffusers model", "notamodel")


def test_pickle_base_refused(recipe, tmp_path, run):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    text = GOOD.replace("@BASE@", str(ckpt))
    _one_line_error(run("train", recipe(text)), 2, "pickle", "model.ckpt")


def test_debug_shows_the_traceback(tmp_path, cli):
    proc = cli("--debug", "train", tmp_path / "missing.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        # a path the user named that does not exist: 2, whichever input it was
        (["train", "@RECIPE@", "data.path=@TMP@/no-such-data"], 2, "dataset folder not found"),
        (["train", "@RECIPE@", "model.base=@TMP@/no-such-model"], 2, "model.base folder not found"),
        (["check-data", "@TMP@/no-such-data"], 2, "dataset folder not found"),
        (["generate", "--base", "@TMP@/no-such-model", "--prompt", "x"], 2, "base model not found"),
        (["generate", "--base", "@BASE@", "--prompt", "x", "--lora", "@TMP@/no.safetensors"], 2, "not found"),
        (["reproduce", "@TMP@/no-such-run"], 2, "not found"),
        # one that exists but cannot be used: the dataset is 1
        (["check-data", "@TMP@/a-file.txt"], 1, "dataset path is a file"),
        (["train", "@RECIPE@", "data.path=@TMP@/empty"], 1, "empty"),
    ],
)
def test_exit_codes_of_missing_and_bad_paths(argv, code, needle, recipe, tmp_path, tiny_sd, run):
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    subs = {"@RECIPE@": str(recipe(GOOD)), "@TMP@": str(tmp_path), "@BASE@": str(tiny_sd)}
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    _one_line_error(run(*argv), code, needle)


HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets")
PROBE = """
import sys
import loracraft.train.config, loracraft.train.cli, loracraft.train.run_dir
from loracraft.train.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:  # --help
    rc = e.code
print(rc, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help-config"],
        ["train", "@RECIPE@", "bad.key=1"],
        ["train", "@RECIPE@", "train.lr=abc"],
        ["check-data", "@TMP@/no-such-data"],
    ],
)
def test_config_errors_and_help_import_no_ml_library(argv, recipe, tmp_path):
    """A typo must be reported in about a second: torch & co. cost ~10 s of imports."""
    import subprocess
    import sys

    argv = [a.replace("@RECIPE@", str(recipe(GOOD))).replace("@TMP@", str(tmp_path)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=120
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(" []"), (last, proc.stderr[-2000:])


@pytest.mark.parametrize("preset", [{}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "PASSIVE"}])
def test_the_command_shortens_openmp_spinning_unless_the_user_chose(preset, recipe, run, monkeypatch):
    """Spinning OpenMP threads made a 2-thread step 5-18x slower beside other work; the entry
    point sets GOMP_SPINCOUNT=1000 before torch can load, and keeps what the user set."""
    import os

    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in preset.items():
        monkeypatch.setenv(key, value)
    run("train", recipe(GOOD), "bad.key=1")
    expected = preset.get("GOMP_SPINCOUNT", "1000" if not preset else None)
    assert os.environ.get("GOMP_SPINCOUNT") == expected
