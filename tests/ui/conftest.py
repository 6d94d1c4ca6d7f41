"""Fixtures for the web UI tests: one `loracraft ui` server and one headless Chromium per module.

The browser is the Debian ``chromium`` + ``chromium-driver`` pair (``scripts/test.sh`` installs
them when it can). Browser tests skip, saying why, only when no Chromium binary exists at all;
a Chromium without its driver is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` -> a TCP port nothing listens on right now."""
    return _free_port


def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    """The address `loracraft ui` prints once it serves (``http://127.0.0.1:PORT/?token=...``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"UI server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        found = re.search(r"loracraft ui: open (http://\S+)", log.read_text())
        if found:
            with urllib.request.urlopen(found.group(1), timeout=30):
                return found.group(1)
        time.sleep(0.3)
    raise AssertionError(f"UI server did not print its address within {timeout}s:\n{log.read_text()[-3000:]}")


@dataclass
class UIServer:
    """A running `loracraft ui`: ``url`` carries the per-launch token, ``base`` does not."""

    url: str
    runs_dir: Path
    log: Path

    @property
    def base(self) -> str:
        return self.url.split("?", 1)[0]

    @property
    def token(self) -> str:
        return self.url.split("?token=", 1)[1]

    @property
    def port(self) -> int:
        return int(self.base.rstrip("/").rsplit(":", 1)[1])


def stop_training_processes(runs_dir: Path) -> None:
    """Training runs live in their own sessions (they survive the UI): end the ones the tests started."""
    for rec_path in (runs_dir / ".ui").glob("*/process.json"):
        rec = json.loads(rec_path.read_text())
        pid = rec.get("pid")
        if not pid or rec.get("exit_code") is not None:
            continue
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.is_file() and rec["config"].encode() in cmdline.read_bytes():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """`python -m loracraft.train.cli ui` on a free localhost port; yields a :class:`UIServer`."""
    root = tmp_path_factory.mktemp("ui-server")
    runs_dir = root / "runs"
    port = _free_port()
    log = root / "server.log"
    env = dict(
        os.environ,
        GRADIO_TEMP_DIR=str(root / "gradio-tmp"),
        # One torch thread for the server and the runs it starts: tiny-model ops are so short that
        # two threads on a shared 2-core machine mostly wait for each other (tests/infer/conftest.py).
        OMP_NUM_THREADS="1",
    )
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loracraft.train.cli",
                "ui",
                "--port",
                str(port),
                "--runs-dir",
                str(runs_dir),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )
    try:
        yield UIServer(wait_for_url(proc, log), runs_dir, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stop_training_processes(runs_dir)


def _browser_binary() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by selenium through the system chromedriver."""
    binary = _browser_binary()
    if binary is None:
        pytest.skip(
            "no Chromium binary on this platform (looked for "
            + ", ".join(BROWSERS)
            + "); scripts/test.sh installs Debian's chromium + chromium-driver when run as root with apt-get"
        )
    driver_path = shutil.which("chromedriver")
    assert driver_path, f"{binary} exists but chromedriver does not: install chromium-driver (Debian)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chrome-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
