"""What the web UI does, without the web: recipes, run processes, run status, runs compared.

Nothing here imports gradio, so every piece is testable on its own and the UI module stays a
layout. Everything the UI *does* goes through the existing APIs and commands:

* training is ``python -m loracraft.train.cli train CONFIG`` in its own session (it survives the
  UI); Stop is SIGTERM (the trainer checkpoints and exits 143) and Resume runs the same
  command again (``checkpoint.resume: auto``);
* progress comes from what a run writes anyway (``run.json``, ``logs/metrics.jsonl``,
  ``samples/step-*.png``) plus the trainer's own progress bar in its log;
* configs are validated by :func:`loracraft.train.config.build_config`, datasets checked by
  :func:`loracraft.train.data.check.check_dataset`, images made by :mod:`loracraft.infer`.

UI bookkeeping lives in ``RUNS_DIR/.ui/`` (hidden, so it is never listed as a run):
``.ui/NAME/config.yaml`` (the exact config started), ``.ui/NAME/train.log`` and
``.ui/NAME/process.json`` (command, pid, exit code), and ``.ui/generated/`` for images.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loracraft.infer.errors import ConfigError, UsageError
from loracraft.infer.io import write_json_atomic, write_text_atomic

UI_DIR = ".ui"
LOG_NAME = "train.log"
CONFIG_NAME = "config.yaml"
PROCESS_NAME = "process.json"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

#: The "main knobs" the Train tab shows as fields: dotted config key -> label.
KNOBS: dict[str, str] = {
    "lora.rank": "LoRA rank",
    "lora.alpha": "LoRA alpha",
    "train.max_steps": "Steps",
    "train.lr": "Learning rate",
    "data.resolution": "Resolution (px)",
    "train.batch_size": "Batch size",
    "train.seed": "Seed",
    "validation.prompts": "Validation prompts (one per line)",
    "validation.every": "Validation image every N steps",
    "checkpoint.every": "Checkpoint every N steps",
}


# =============================================================================== recipes + YAML
def recipes() -> dict[str, Path]:
    """The shipped recipes (``configs/*.yaml`` package data): stem -> path."""
    from importlib.resources import files

    root = files("loracraft.configs")
    return {
        Path(p.name).stem: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml")
    }


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_yaml(text: str) -> dict:
    """The editor's text as a mapping; a one-line ConfigError if it is not YAML or not a mapping."""
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML editor"
        raise ConfigError(
            f"config is not valid YAML, {where}, fix the syntax ({getattr(e, 'problem', e)})"
        ) from e
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections, YAML editor, start with e.g. 'model:'")
    return data


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def schema_defaults() -> dict:
    """Every key at its schema default (the required keys filled with placeholders)."""
    from loracraft.train.config import Config

    defaults = Config.model_validate({"model": {"base": ""}, "data": {"path": ""}}).dump()
    defaults["model"]["base"] = defaults["data"]["path"] = None
    return defaults


def read_fields(text: str) -> dict[str, Any]:
    """Knob values (and base, dataset, output dir) as the config means them: YAML value or default."""
    data = parse_yaml(text)
    defaults = schema_defaults()
    out = {}
    for key in [*KNOBS, "model.base", "data.path", "output.dir"]:
        value = _get(data, key)
        out[key] = _get(defaults, key) if value is None else value
    return out


def set_fields(text: str, values: dict[str, Any]) -> str:
    """The YAML text with ``values`` (dotted keys) written into it; other keys kept as they are."""
    from loracraft.train.config import set_dotted

    data = parse_yaml(text)
    for key, value in values.items():
        if key == "validation.prompts" and isinstance(value, str):
            from loracraft.train.samples import prompt_entry

            value = [prompt_entry(line, f"validation.prompts line {n}")
                     for n, line in enumerate(value.splitlines(), start=1) if line.strip()]
        if value == "" and key in ("model.base", "data.path"):
            value = None
        set_dotted(data, key, value)
    return dump_yaml(data)


def validate_config(text: str, source: str = "YAML editor"):
    """Validate the editor's YAML with the training schema; ConfigError lists every problem."""
    from loracraft.train.config import build_config

    return build_config(parse_yaml(text), source=source)


def check_run_name(name: str) -> str:
    name = (name or "").strip()
    if not RUN_NAME.match(name):
        raise UsageError(
            f"run name {name!r} is not usable as a folder name, run name, "
            "use letters, digits, '.', '_' or '-' (e.g. my-style-v1)"
        )
    return name


# =============================================================================== run processes
@dataclass
class RunStatus:
    """What the Train tab shows for one run."""

    name: str
    state: str  # not started | starting | running | stopping | stopped | complete | failed | interrupted
    step: int = 0
    total: int | None = None
    elapsed: str | None = None
    eta: str | None = None
    loss: float | None = None
    message: str = ""
    pid: int | None = None
    metrics: list[dict] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    log_tail: str = ""
    checkpoints: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


_TQDM = re.compile(r"train:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)\s*\[([0-9:]+)<([0-9:?]+)")


def parse_progress(log: str) -> tuple[int, int, str, str] | None:
    """``(step, total, elapsed, remaining)`` from the trainer's last tqdm update in its log."""
    matches = _TQDM.findall(log)
    if not matches:
        return None
    step, total, elapsed, remaining = matches[-1]
    return int(step), int(total), elapsed, remaining


def terminal_text(raw: str, lines: int = 30) -> str:
    """A log as a terminal would show it: each ``\\r`` redraws its line."""
    shown = [line.rsplit("\r", 1)[-1] for line in raw.replace("\r\n", "\n").split("\n")]
    return "\n".join(shown[-lines:]).strip("\n")


def read_metrics(run_dir: Path) -> list[dict]:
    from loracraft.train.commands.report import read_metrics as _read

    try:
        return _read(Path(run_dir))
    except (json.JSONDecodeError, OSError):
        return []  # a row half-written this instant; the next refresh reads it whole


def read_manifest(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "run.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _proc_cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _pid_alive(pid: int, marker: str) -> bool:
    """Is ``pid`` alive and still our training process (``marker`` = its config path)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    cmd = _proc_cmdline(pid)
    return cmd is None or marker in cmd


class RunManager:
    """Starts, stops and watches training processes under ``runs_dir``."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def run_dir(self, name: str) -> Path:
        return self.runs_dir / check_run_name(name)

    def ui_dir(self, name: str) -> Path:
        return self.runs_dir / UI_DIR / check_run_name(name)

    def _record(self, name: str) -> dict | None:
        p = self.ui_dir(name) / PROCESS_NAME
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _write_record(self, name: str, rec: dict) -> None:
        write_json_atomic(self.ui_dir(name) / PROCESS_NAME, rec)

    # ------------------------------------------------------------------ control
    def is_running(self, name: str) -> bool:
        with self._lock:
            proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        rec = self._record(name)
        return bool(
            rec
            and rec.get("exit_code") is None
            and rec.get("pid")
            and _pid_alive(int(rec["pid"]), rec["config"])
        )

    def start(self, name: str, config_text: str) -> list[str]:
        """Validate the config, pin ``output.dir`` to ``RUNS_DIR/NAME``, write it, launch training.

        Returns the command. Raises ConfigError (every problem listed) or UsageError.
        """
        name = check_run_name(name)
        if self.is_running(name):
            raise UsageError(
                f"run {name!r} is already running, Start, press Stop first or pick another run name"
            )
        text = set_fields(config_text, {"output.dir": str(self.run_dir(name))})
        validate_config(text)
        cfg_path = self.ui_dir(name) / CONFIG_NAME
        write_text_atomic(cfg_path, text)
        return self._launch(name, cfg_path)

    def resume(self, name: str) -> list[str]:
        """Run the recorded command again: the trainer resumes from the newest checkpoint."""
        name = check_run_name(name)
        if self.is_running(name):
            raise UsageError(f"run {name!r} is still running, Resume, wait for it to stop")
        cfg_path = self.ui_dir(name) / CONFIG_NAME
        if not cfg_path.is_file():
            raise UsageError(f"run {name!r} was not started from this UI, {cfg_path}, press Start instead")
        return self._launch(name, cfg_path)

    def _launch(self, name: str, cfg_path: Path) -> list[str]:
        cmd = [sys.executable, "-m", "loracraft.train.cli", "train", str(cfg_path)]
        log_path = self.ui_dir(name) / LOG_NAME
        # Unbuffered, so progress-bar updates reach the log as they happen.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own session: closing the UI (or Ctrl-C in it) leaves it running
            )
        rec = {
            "command": cmd,
            "config": str(cfg_path),
            "log": str(log_path),
            "pid": proc.pid,
            "started_at": time.time(),
            "exit_code": None,
            "ended_at": None,
            "stop_requested": False,
        }
        self._write_record(name, rec)
        with self._lock:
            self._procs[name] = proc
        threading.Thread(target=self._reap, args=(name, proc), daemon=True).start()
        return cmd

    def _reap(self, name: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        rec = self._record(name) or {}
        if rec.get("pid") == proc.pid:
            rec.update(exit_code=code, ended_at=time.time())
            self._write_record(name, rec)

    def stop(self, name: str) -> str:
        """SIGTERM: the trainer writes a checkpoint and exits 143."""
        name = check_run_name(name)
        rec = self._record(name)
        if not rec or not self.is_running(name):
            raise UsageError(f"run {name!r} is not running, Stop, nothing to stop")
        os.kill(int(rec["pid"]), signal.SIGTERM)
        rec["stop_requested"] = True
        self._write_record(name, rec)
        return f"sent SIGTERM to {rec['pid']}"

    def wait(self, name: str, timeout: float | None = None) -> int | None:
        with self._lock:
            proc = self._procs.get(name)
        if proc is None:
            return None
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_path(self, name: str) -> Path:
        return self.ui_dir(name) / LOG_NAME

    def config_text(self, name: str) -> str | None:
        p = self.ui_dir(name) / CONFIG_NAME
        return p.read_text(encoding="utf-8") if p.is_file() else None

    # ------------------------------------------------------------------ status
    def status(self, name: str) -> RunStatus:
        name = check_run_name(name)
        run_dir, rec = self.run_dir(name), self._record(name)
        manifest = read_manifest(run_dir)
        running = self.is_running(name)
        raw_log = ""
        if rec and Path(rec.get("log", "")).is_file():
            raw_log = _tail_bytes(Path(rec["log"]), 200_000)
        # only the output of the latest launch counts for progress and messages
        launch_log = raw_log.rsplit("\n$ ", 1)[-1] if raw_log else ""
        metrics = read_metrics(run_dir)
        samples = sorted((run_dir / "samples").glob("step-*.png")) if (run_dir / "samples").is_dir() else []
        ckpts = (
            sorted(
                int(p.name.split("-")[-1])
                for p in (run_dir / "checkpoints").glob("step-*")
                if (p / "state.json").is_file()
            )
            if (run_dir / "checkpoints").is_dir()
            else []
        )
        st = RunStatus(
            name=name,
            state="not started",
            metrics=metrics,
            samples=samples,
            log_tail=terminal_text(raw_log),
            checkpoints=ckpts,
            pid=rec.get("pid") if rec else None,
        )
        cfg = manifest.get("config") if manifest else None
        if cfg is None and rec:
            try:
                cfg = parse_yaml(Path(rec["config"]).read_text(encoding="utf-8"))
            except (OSError, ConfigError):
                cfg = None
        st.total = _get(cfg or {}, "train.max_steps")
        st.step = metrics[-1]["step"] if metrics else 0
        st.loss = metrics[-1]["loss"] if metrics else None
        progress = (
            parse_progress(launch_log) if running or (rec and rec.get("exit_code") is not None) else None
        )
        if progress and (running or progress[0] >= st.step):
            st.step, st.total = max(st.step, progress[0]), progress[1]
            if running:
                st.elapsed, st.eta = progress[2], progress[3]
        errors = [
            ln.split("loracraft: error: ", 1)[1]
            for ln in terminal_text(launch_log, 400).splitlines()
            if "loracraft: error: " in ln
        ]
        status = manifest.get("status") if manifest else None
        if running:
            st.state = (
                "stopping"
                if rec.get("stop_requested")
                else ("running" if progress or metrics else "starting")
            )
            if st.state == "starting":
                st.message = "loading the model, checking and caching the dataset"
            elif st.state == "stopping":
                st.message = "SIGTERM sent: writing a checkpoint, then exiting"
        elif status == "complete":
            st.state = "complete"
            st.step = manifest.get("steps") or st.step
            st.message = "adapter written to " + str(
                run_dir / (manifest.get("adapter") or "pytorch_lora_weights.safetensors")
            )
        elif rec and rec.get("exit_code") is not None:
            code = int(rec["exit_code"])
            if code in (130, 143, -signal.SIGTERM, -signal.SIGINT):
                st.state = "stopped"
                st.message = (
                    f"stopped; last checkpoint at step {ckpts[-1]}. Resume continues from it"
                    if ckpts
                    else "stopped before the first checkpoint. Resume starts again from step 0"
                )
            elif code == 0:
                st.state = "complete"
                st.message = errors[-1] if errors else "finished"
            else:
                st.state = "failed"
                st.message = f"exit code {code}: " + (
                    " | ".join(errors[-3:]) if errors else "see the log below"
                )
        elif status == "running":
            st.state = "interrupted"
            st.message = (
                "the training process is gone (machine restart or kill); Resume continues from step "
                f"{ckpts[-1]}"
                if ckpts
                else "the training process is gone; Resume starts again"
            )
        return st


def _tail_bytes(path: Path, n: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - n))
        return fh.read().decode("utf-8", errors="replace")


# =============================================================================== runs list / compare
def list_runs(runs_dir: str | Path) -> list[dict]:
    """One row per run folder (has ``run.json`` or was started from the UI), newest first."""
    root = Path(runs_dir)
    names = set()
    if root.is_dir():
        names |= {
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "run.json").is_file()
        }
        ui = root / UI_DIR
        if ui.is_dir():
            names |= {p.name for p in ui.iterdir() if p.is_dir() and (p / PROCESS_NAME).is_file()}
    rows = []
    for name in names:
        run_dir = root / name
        m = read_manifest(run_dir) or {}
        cfg = m.get("config") or {}
        metrics = read_metrics(run_dir)
        mtime = max(
            [
                p.stat().st_mtime
                for p in (run_dir / "run.json", root / UI_DIR / name / PROCESS_NAME)
                if p.is_file()
            ]
            or [0]
        )
        rows.append(
            {
                "name": name,
                "status": m.get("status") or "not started",
                "steps": f"{m.get('steps', 0)}/{_get(cfg, 'train.max_steps') or '?'}" if m else "",
                "final loss": round(metrics[-1]["loss"], 5) if metrics else None,
                "base": _short(_get(cfg, "model.base")),
                "dataset": ", ".join(_short(d) for d in _datasets(cfg)),
                "rank/alpha": f"{_get(cfg, 'lora.rank')}/{_get(cfg, 'lora.alpha')}" if cfg else "",
                "lr": _get(cfg, "train.lr"),
                "wall time (s)": m.get("wall_time_s"),
                "adapter": "yes" if (run_dir / "pytorch_lora_weights.safetensors").is_file() else "no",
                "report": "yes" if (run_dir / "report.html").is_file() else "no",
                "_mtime": mtime,
            }
        )
    rows.sort(key=lambda r: -r["_mtime"])
    for r in rows:
        r.pop("_mtime")
    return rows


def _datasets(cfg: dict) -> list[str]:
    """data.path and every data.concepts path (a concepts-only run has no data.path)."""
    concepts = _get(cfg, "data.concepts") or []
    paths = [_get(cfg, "data.path"), *(c.get("path") for c in concepts if isinstance(c, dict))]
    return [str(p) for p in paths if p]


def _short(location) -> str:
    """The last two parts of a path or hub id ('tiny-sd/model', 'runwayml/stable-diffusion-v1-5')."""
    parts = Path(str(location or "")).parts
    return "/".join(parts[-2:]) if parts and parts[-2:] != ("/",) else ""


def manifest_summary(run_dir: str | Path) -> list[tuple[str, str]]:
    """The manifest's key facts as (label, value) pairs."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    if m is None:
        return [("run", f"{run_dir.name} has no run.json yet (not started, or still loading)")]
    cfg = m.get("config") or {}
    metrics = read_metrics(run_dir)
    v = m.get("versions") or {}
    pairs = [
        ("status", m.get("status")),
        ("steps", f"{m.get('steps')} of {_get(cfg, 'train.max_steps')}"),
        ("final loss", f"{metrics[-1]['loss']:.5f}" if metrics else "n/a"),
        ("base model", _get(cfg, "model.base")),
        ("dataset", ", ".join(_datasets(cfg))),
        ("resolution", _get(cfg, "data.resolution")),
        ("rank / alpha", f"{_get(cfg, 'lora.rank')} / {_get(cfg, 'lora.alpha')}"),
        ("learning rate", f"{_get(cfg, 'train.lr')} ({_get(cfg, 'train.lr_scheduler')})"),
        ("batch size", _get(cfg, "train.batch_size")),
        ("seed", m.get("seed")),
        ("dataset fingerprint", str(m.get("dataset_fingerprint") or "")[:16]),
        ("weights sha256", str(m.get("weights_sha256") or "")[:16] or "n/a (not finished)"),
        ("wall time (s)", m.get("wall_time_s")),
        ("git commit", str(m.get("git_commit") or "n/a")[:12]),
        (
            "versions",
            ", ".join(
                f"{k} {val}" for k, val in v.items() if k in ("torch", "diffusers", "peft", "loracraft")
            ),
        ),
    ]
    return [(k, "" if val is None else str(val)) for k, val in pairs]


def _effective(cfg: dict) -> dict:
    """A saved config with today's defaults filled in, so keys added since do not show as changes."""
    from pydantic import ValidationError

    from loracraft.train.config import Config

    try:
        return Config.model_validate(cfg).dump()
    except ValidationError:
        return cfg


def compare_runs(run_a: str | Path, run_b: str | Path) -> tuple[list[str], list[dict]]:
    """Config differences (``key: a -> b``) and both loss curves as rows {run, step, loss}."""
    from loracraft.train.config import config_diff

    a, b = Path(run_a), Path(run_b)
    ma, mb = read_manifest(a), read_manifest(b)
    missing = [p.name for p, m in ((a, ma), (b, mb)) if m is None]
    if missing:
        raise UsageError(
            f"no run.json for {', '.join(missing)}, Compare, pick runs that have started training"
        )
    diff = config_diff(_effective(ma.get("config") or {}), _effective(mb.get("config") or {}))
    rows = [{"run": p.name, "step": r["step"], "loss": r["loss"]} for p in (a, b) for r in read_metrics(p)]
    return diff, rows
