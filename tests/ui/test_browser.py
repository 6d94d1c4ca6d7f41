"""The whole workflow in a real headless Chromium, on the tiny model, in order:
check a dataset (and fix a caption) -> train (stop, resume) -> runs (compare, report) -> generate.

The tests share one server, one browser and one run; each depends on the one before it.
Screenshots of every tab go to test-artifacts/ui/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

RUN = "ui-run"
STEPS = 60


class Page:
    """Small helpers over selenium for Gradio components (found by their elem_id)."""

    def __init__(self, driver, url: str, artifacts: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.url, self.artifacts = driver, url, artifacts
        self.By, self.Wait = By, WebDriverWait

    def open(self):
        self.d.get(self.url)
        self.wait(lambda: self.d.find_elements(self.By.CSS_SELECTOR, "button[role=tab]"), 60)

    def wait(self, cond, timeout: float = 60, what: str = ""):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

        # Gradio re-renders components when values change: an element found a moment ago may be gone.
        wait = self.Wait(
            self.d, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        )
        try:
            return wait.until(lambda _d: cond())
        except TimeoutException as e:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}") from e

    def find(self, css: str, timeout: float = 30):
        return self.wait(lambda: (self.d.find_elements(self.By.CSS_SELECTOR, css) or [None])[0], timeout, css)

    def all(self, css: str):
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def tab(self, label: str):
        for t in self.all("button[role=tab]"):
            if label in t.text:
                t.click()
                return
        raise AssertionError(f"no tab {label!r}")

    def active_tab(self) -> str:
        return self.find("button[role=tab][aria-selected=true]").text

    def set(self, elem_id: str, value):
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)  # commit (sliders and numbers apply on blur)

    def choose(self, elem_id: str, option: str):
        """Pick ``option`` in a gr.Dropdown the way a user does: open it, click the entry."""
        box = self.find(f"#{elem_id} input")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.click()
        self.find(f"#{elem_id} li[role=option][aria-label='{option}']").click()
        self.wait(lambda: box.get_attribute("value") == option, 30, f"{option!r} chosen in #{elem_id}")

    def value(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")

    def click(self, elem_id: str):
        css = f"#{elem_id}"
        button = self.wait(lambda: (b := self.find(css)).is_enabled() and b, 30, f"{css} to be enabled")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id}").text

    def wait_text(self, elem_id: str, *subs: str, timeout: float = 60) -> str:
        self.wait(lambda: all(s in self.text(elem_id) for s in subs), timeout, f"{subs} in #{elem_id}")
        return self.text(elem_id)

    def type_code(self, elem_id: str, text: str):
        """Type at the end of a gr.Code editor (CodeMirror), as a user would."""
        from selenium.webdriver.common.keys import Keys

        editor = self.find(f"#{elem_id} .cm-content")
        editor.click()
        editor.send_keys(Keys.CONTROL, Keys.END)
        editor.send_keys(text)

    def code(self, elem_id: str) -> str:
        return self.d.execute_script(f"return document.querySelector('#{elem_id} .cm-content').innerText")

    def screenshot(self, name: str) -> Path:
        """The whole page (not just the viewport) as test-artifacts/ui/NAME.png."""
        size = self.d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        self.d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": int(size["width"]),
                "height": int(size["height"]),
                "deviceScaleFactor": 1,
                "mobile": False,
            },
        )
        time.sleep(0.5)
        path = self.artifacts / f"{name}.png"
        self.d.save_screenshot(str(path))
        self.d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return path

    def download(self, elem_id: str, timeout: float = 30) -> Path:
        """Click the (last) file link in a gr.File and wait for the browser to save it."""
        before = set(self.d.downloads.iterdir())
        link = self.all(f"#{elem_id} a")[-1]
        name = link.get_attribute("download")
        link.click()
        done = self.wait(
            lambda: [
                p for p in set(self.d.downloads.iterdir()) - before if not p.name.endswith(".crdownload")
            ],
            timeout,
            f"download of {name}",
        )
        return done[0]


@pytest.fixture(scope="module")
def page(ui_server, browser, artifacts):
    p = Page(browser, ui_server.url, artifacts)
    p.open()
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six 32 px scenes with two findings: an empty caption and an image without a metadata row."""
    from loracraft.infer.testing import write_captioned_dataset

    root = write_captioned_dataset(tmp_path_factory.mktemp("ui-data") / "scenes", n=6, px=32, seed=3)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[2]["text"] = ""
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(root / "0000.png", root / "extra.png")
    return root


def test_dataset_tab_checks_and_edits_captions(page, dataset):
    assert "token" not in page.d.current_url  # the token link set the cookie, then left the address bar
    page.set("ds-folder", dataset)
    page.set("ds-resolution", 32)
    page.click("ds-check")
    summary = page.wait_text("ds-summary", "6 images", timeout=90)
    assert "trainable" in summary and "2 warning" in summary
    findings = page.text("ds-findings")
    assert "empty-caption" in findings and "0002.png" in findings
    assert "no-metadata-row" in findings and "extra.png" in findings
    thumbs = page.wait(
        lambda: len(page.all("#ds-gallery img")) == 6 and page.all("#ds-gallery img"), 30, "thumbnails"
    )
    assert "a red" in page.text("ds-gallery") or "background" in page.text("ds-gallery")  # captions shown

    # click the image with the empty caption, write one, save
    thumbs[2].click()
    page.wait(lambda: page.value("ds-file") == "0002.png", 30, "selection")
    before = (dataset / "metadata.jsonl").read_text().splitlines()
    page.set("ds-caption", "a blue circle on a red background")
    page.click("ds-save")
    saved = page.wait_text("ds-saved", "Saved", timeout=60)
    after = (dataset / "metadata.jsonl").read_text().splitlines()
    assert json.loads(after[2]) == {"file_name": "0002.png", "text": "a blue circle on a red background"}
    assert after[:2] + after[3:] == before[:2] + before[3:]  # other rows untouched, byte for byte
    backups = list((dataset / ".loracraft-backup").glob("*/metadata.jsonl"))
    assert len(backups) == 1 and backups[0].read_text().splitlines() == before
    assert ".loracraft-backup" in saved
    page.wait(lambda: "empty-caption" not in page.text("ds-findings"), 60, "re-check after saving")
    page.screenshot("1-dataset")

    page.click("ds-to-train")
    page.wait(lambda: "Train" in page.active_tab(), 30, "Train tab")
    assert page.value("train-data") == str(dataset)


def test_train_tab_start_stop_resume(page, ui_server, tiny_sd):
    runs_dir = ui_server.runs_dir
    page.set("train-name", RUN)
    page.set("train-base", tiny_sd)
    page.set("knob-steps", STEPS)
    page.set("knob-val-every", 20)
    page.set("knob-ckpt-every", 20)
    page.wait(
        lambda: all(
            f"\n  {k}: {v}\n" in page.code("train-yaml") for k, v in (("max_steps", STEPS), ("every", 20))
        ),
        30,
        "knobs written into the YAML",
    )
    yaml_text = page.code("train-yaml")
    assert "checkpoint:\n  every: 20\n" in yaml_text and "\n  every: 20\n  num_images" in yaml_text
    assert f"base: {tiny_sd}" in yaml_text and f"dir: {runs_dir / RUN}" in yaml_text
    # a key without a field, typed into the YAML editor: no report at the end (Runs writes one on demand)
    page.type_code("train-yaml", "\nreport: false")  # auto-indented under output:, like the line above
    page.tab("Train")  # leave the editor: the YAML is re-read and validated
    page.wait_text("train-yaml-msg", "config is valid", timeout=30)
    assert "\n  report: false" in page.code("train-yaml")

    page.click("train-start")
    status = page.wait_text("train-status", "running", timeout=240)
    page.click("train-stop")  # as early as possible: the run must not finish before SIGTERM lands
    assert f"/ {STEPS}" in status and "ETA" in status, status
    status = page.wait_text("train-status", "stopped", timeout=240)
    assert "Resume continues from it" in status, status
    log = (runs_dir / ".ui" / RUN / "train.log").read_text()
    assert "stopped by SIGTERM" in log
    assert json.loads((runs_dir / RUN / "run.json").read_text())["status"] == "running"
    assert list((runs_dir / RUN / "checkpoints").glob("step-*/state.json"))
    page.screenshot("2-train-stopped")

    page.click("train-resume")
    page.wait(lambda: page.all("#train-samples img"), 300, "a validation image")
    status = page.wait_text("train-status", "complete", timeout=300)
    assert f"step {STEPS} / {STEPS}" in status, status
    assert "resuming from" in (runs_dir / ".ui" / RUN / "train.log").read_text()
    assert len(page.all("#train-samples img")) == STEPS // 20
    page.wait(lambda: page.all("#train-curves img"), 30, "the loss and LR curves")
    assert (runs_dir / RUN / "pytorch_lora_weights.safetensors").is_file()
    page.screenshot("2-train")


def test_runs_tab_lists_compares_and_reports(page, ui_server, cli_run):
    runs_dir = ui_server.runs_dir
    shutil.copytree(cli_run, runs_dir / "cli-quickstart")  # a second run to compare with (20 steps)
    page.tab("Runs")
    page.click("runs-refresh")
    table = page.wait_text("runs-table", RUN, "cli-quickstart", timeout=30)
    assert table.count("complete") == 2
    page.choose("runs-a", RUN)
    page.choose("runs-b", "cli-quickstart")
    page.click("runs-compare")
    diff = page.wait_text("runs-diff", "train.max_steps", timeout=60)
    assert f"train.max_steps: {STEPS} -> 20" in diff
    page.wait(lambda: page.all("#runs-curves canvas, #runs-curves svg"), 30, "the comparison plot")
    assert RUN in page.text("runs-curves") and "cli-quickstart" in page.text("runs-curves")

    # the UI run was trained with output.report: false -> Open report writes it (loracraft report)
    page.choose("runs-pick", RUN)
    page.wait_text("runs-summary", "weights sha256", f"{STEPS} of {STEPS}", timeout=30)
    assert not (runs_dir / RUN / "report.html").exists()
    page.click("runs-report")
    frame = page.find("#runs-report-view iframe", timeout=180)
    assert "written now" in page.text("runs-report-view")
    page.d.switch_to.frame(frame)
    assert page.d.find_element(page.By.TAG_NAME, "h1").text == f"loracraft run: {RUN}"
    page.d.switch_to.default_content()
    assert (runs_dir / RUN / "report.html").is_file()
    page.screenshot("3-runs")


def test_generate_tab_two_scales_and_download(page, ui_server, tiny_sd):
    from PIL import Image

    from loracraft.infer.generation import read_record

    runs_dir = ui_server.runs_dir
    page.tab("Runs")
    page.click("runs-to-generate")  # the run chosen above: the one trained in the Train tab
    page.wait(lambda: "Generate" in page.active_tab(), 30, "Generate tab")
    adapter = runs_dir / RUN / "pytorch_lora_weights.safetensors"
    page.wait(lambda: page.value("gen-lora-1") == str(adapter), 30, "the adapter sent from Runs")
    assert page.value("gen-base") == str(tiny_sd)
    page.set("gen-steps", 4)
    page.set("gen-seed", 7)

    records, pixels = [], []
    for scale in (1.0, 0.5):
        page.set("gen-scale-1", scale)
        old = [a.get_attribute("href") for a in page.all("#gen-file a")]
        page.click("gen-generate")
        page.wait(
            lambda old=old: [a for a in page.all("#gen-file a") if a.get_attribute("href") not in old],
            120,
            "image",
        )
        png = page.download("gen-file")
        records.append(read_record(png))
        with Image.open(png) as im:
            pixels.append(im.tobytes())
    assert [r.adapters[0]["scale"] for r in records] == [1.0, 0.5]
    assert all(r.adapters[0]["path"] == str(adapter) and r.seed == 7 and r.steps == 4 for r in records)
    assert pixels[0] != pixels[1], "scale 0.5 should change the image"
    assert "<lora:" in page.value("gen-params")

    page.set("gen-scale-1", 1.0)
    page.set("gen-sweep-scales", "0, 1")
    page.click("gen-sweep")
    page.wait(lambda: len(page.all("#gen-sweep-gallery img")) == 2, 120, "two sweep images")
    assert "scale ×0" in page.text("gen-sweep-gallery") and "scale ×1" in page.text("gen-sweep-gallery")
    page.screenshot("4-generate")
