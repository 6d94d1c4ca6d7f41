"""``loracraft ui``: a local web UI (Gradio) for checking data, training, comparing runs and generating.

The UI is a thin layer over the same APIs and commands as the CLI (see
:mod:`loracraft.train.ui.backend`); its layout lives in :mod:`loracraft.train.ui.app`.

Security: the UI can start processes and read and write files, so it answers only requests
that name it as their ``Host`` (its loopback names, or ``--host`` and ``--allow-host``), come
from no foreign ``Origin``, and carry its per-launch secret: the printed address has
``?token=...``, as Jupyter's does (see :mod:`loracraft.train.ui.server`). By default it binds
to 127.0.0.1. Binding to any other address prints a warning and *requires* a login instead,
taken from the ``LORACRAFT_UI_AUTH`` environment variable (``user:password``) or from
``--auth-file FILE`` (one ``user:password`` per line) - never from the command line itself,
where ``ps`` and shell history would show them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from pathlib import Path

from loracraft.infer.errors import UsageError

AUTH_ENV = "LORACRAFT_UI_AUTH"
LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def register(subparsers) -> None:
    """Add ``loracraft ui``."""
    p = subparsers.add_parser(
        "ui",
        help="start the web UI (dataset check, training, runs, generation)",
        description="Start the loracraft web UI (needs the 'ui' extra: pip install 'loracraft[ui]'). "
        "Open the printed address (it carries a per-launch ?token=). "
        f"Binding to a non-local --host requires a login from ${AUTH_ENV}=user:password or --auth-file.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs-dir", default="runs", help="folder of training runs (default ./runs)")
    p.add_argument(
        "--auth-file", metavar="FILE", help="file with one user:password per line (login for the UI)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="also accept requests addressed to this host name (a reverse proxy's or an SSH tunnel's, "
        "e.g. localhost:8888); repeatable. Other Host headers get 403",
    )
    p.set_defaults(func=cmd_ui)


def is_local(host: str) -> bool:
    """True for loopback addresses and names (only this machine can connect)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


HOST_VALUE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?)(:[0-9]{1,5})?")


def check_allowed_host(value: str) -> str:
    """An ``--allow-host`` value as the ``Host`` header carries it: ``name`` or ``name:port``."""
    text = value.strip().lower()
    if not HOST_VALUE.fullmatch(text):
        raise UsageError(
            f"not a host name, --allow-host {value}, give NAME or NAME:PORT (e.g. localhost:8888)"
        )
    return text


def _parse_credentials(text: str, where: str) -> list[tuple[str, str]]:
    creds = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise UsageError(
                f"credentials must look like user:password, {where} (entry {n}), write one user:password per line"
            )
        creds.append((user, password))
    return creds


def resolve_auth(host: str, auth_file: str | None, environ=os.environ) -> list[tuple[str, str]] | None:
    """The logins the server will require, or None (localhost without credentials given).

    Raises UsageError (exit 2) for a non-local host without credentials, or unreadable ones.
    """
    creds: list[tuple[str, str]] = []
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(
                f"cannot read the auth file ({e.strerror}), --auth-file {path}, check the path"
            ) from e
        creds += _parse_credentials(text, f"--auth-file {path}")
        if not creds:
            raise UsageError(
                f"the auth file holds no credentials, --auth-file {path}, add a user:password line"
            )
    if environ.get(AUTH_ENV):
        creds += _parse_credentials(environ[AUTH_ENV].replace(",", "\n"), f"${AUTH_ENV}")
    if not is_local(host) and not creds:
        raise UsageError(
            f"refusing to serve on non-local address {host} without a login, --host {host}, "
            f"set {AUTH_ENV}=user:password or pass --auth-file FILE (or use --host 127.0.0.1)"
        )
    return creds or None


def _import_gradio():
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"the web UI needs gradio, which is not installed ({e.name or 'gradio'}), loracraft ui, "
            "install the extra: pip install 'loracraft[ui]'"
        ) from e


def cmd_ui(args: argparse.Namespace) -> int:
    if not (0 < args.port < 65536):
        raise UsageError(f"port must be 1-65535 (got {args.port}), --port, e.g. --port 7860")
    allow_hosts = tuple(check_allowed_host(h) for h in args.allow_host)
    auth = resolve_auth(args.host, args.auth_file)
    if not is_local(args.host):
        print(
            f"loracraft: warning: serving on {args.host}:{args.port}: anyone who can reach this address and log in "
            "can read and write files and start processes as this user; the connection is not encrypted",
            file=sys.stderr,
        )
    # No usage statistics or update checks: the UI works offline and reports nothing.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _import_gradio()
    from loracraft.train.ui.app import launch

    launch(
        runs_dir=args.runs_dir,
        host=args.host,
        port=args.port,
        auth=auth,
        allow_hosts=allow_hosts,
    )
    return 0


__all__ = ["register", "cmd_ui", "resolve_auth", "is_local", "check_allowed_host", "AUTH_ENV"]
