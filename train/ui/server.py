"""Who may talk to ``loracraft ui``, and the HTTP server that enforces it.

The UI reads and writes files and starts processes, so a page in the user's browser from any
other site must not be able to drive it. Three checks run in front of every route (the page,
``/gradio_api/*``, uploads, file downloads, the queue's event streams), as one ASGI middleware
on the outer app Gradio is mounted in:

* the ``Host`` header must name this UI (its loopback names, or the host it was started on,
  with its port; ``--allow-host`` adds more): a DNS-rebinding page arrives with its own name;
* an ``Origin`` header, when a browser sends one, must be this UI's own: no cross-site call
  reaches Gradio, so Gradio never answers one with ``Access-Control-Allow-Origin``;
* without a configured login, every request needs the per-launch secret, as Jupyter does: the
  printed link carries ``?token=...``; the first request with it sets an HttpOnly,
  SameSite=Strict cookie, and API clients may send the ``X-Loracraft-Token`` header instead.
  With a login (``--auth-file`` / ``LORACRAFT_UI_AUTH``), Gradio's login page guards instead.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.requests import cookie_parser

from loracraft.infer.errors import UsageError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
TOKEN_PARAM = "token"
TOKEN_HEADER = "x-loracraft-token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_name(port: int) -> str:
    """One cookie per port: cookies ignore ports, and two UIs on one machine must not clash."""
    return f"loracraft-ui-{port}"


def url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 literals in brackets), lower case."""
    host = host.strip().lower()
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]"
    except ValueError:
        pass
    return host


def host_names(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The names a browser may use for a UI bound to ``host``.

    Loopback names always (only this machine can use them); the bound host itself; for a
    wildcard bind, this machine's own name and addresses; then ``extra`` (``--allow-host``).
    """
    names = list(LOOPBACK_NAMES)
    if host.strip("[]") in {h.strip("[]") for h in WILDCARD_HOSTS}:
        names += [socket.gethostname(), socket.getfqdn()]
        try:
            names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    else:
        names.append(host)
    names += list(extra)
    return list(dict.fromkeys(url_host(n) for n in names if n))


def allowed_hosts(names: Iterable[str], port: int) -> frozenset[str]:
    """``Host`` header values accepted: each name with the port (or as given, if it has one)."""
    out = set()
    for name in names:
        if urlsplit(f"//{name}").port is not None:
            out.add(name)
            continue
        out.add(f"{name}:{port}")
        if port == 80:
            out.add(name)
    return frozenset(out)


@dataclass(frozen=True)
class Access:
    """What a request must show: one of ``hosts`` as its Host, and the ``token`` (None: a login)."""

    hosts: frozenset[str]
    token: str | None
    cookie: str

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(f"{scheme}://{h}" for h in self.hosts for scheme in ("http", "https"))


async def _respond(scope, send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    if scope["type"] == "websocket":  # closing before accept: the server answers 403
        await send({"type": "websocket.close", "code": 1008})
        return
    body = (text + "\n").encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: Host, Origin and per-launch secret checks before anything else runs."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "").strip().lower()
        if host not in self.access.hosts:
            await _respond(
                scope,
                send,
                403,
                f"loracraft ui: refused: Host {host!r} is not this UI's address; open the address "
                "`loracraft ui` printed, or start it with --allow-host NAME for a proxy or tunnel",
            )
            return
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower() not in self.access.origins:
            await _respond(
                scope, send, 403, f"loracraft ui: refused: a page from {origin!r} may not call this UI"
            )
            return
        if self.access.token is None:
            await self.app(scope, receive, send)
            return
        await self._with_token(scope, receive, send, headers)

    def _matches(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.access.token.encode())

    async def _with_token(self, scope, receive, send, headers: dict[str, str]) -> None:
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        in_query = next((v for k, v in query if k == TOKEN_PARAM), None)
        if self._matches(in_query):
            set_cookie = (
                b"set-cookie",
                f"{self.access.cookie}={self.access.token}; Path=/; HttpOnly; SameSite=Strict".encode(),
            )
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and _is_page_load(headers):
                # as Jupyter does: the secret leaves the address bar and the history at once
                rest = urlencode([(k, v) for k, v in query if k != TOKEN_PARAM])
                path = scope.get("raw_path") or scope["path"].encode()
                location = path.decode("latin-1") + (f"?{rest}" if rest else "")
                await _respond(scope, send, 303, "", [set_cookie, (b"location", location.encode())])
                return
            await self.app(scope, receive, _adding_header(send, set_cookie))
            return
        # starlette's parser, not SimpleCookie: one odd cookie of another app on this host
        # must not hide ours
        cookie = cookie_parser(headers.get("cookie", "")).get(self.access.cookie)
        if self._matches(cookie) or self._matches(headers.get(TOKEN_HEADER)):
            await self.app(scope, receive, send)
            return
        await _respond(
            scope,
            send,
            401,
            "loracraft ui: this UI needs its secret: open the link with ?token=... that `loracraft ui` "
            f"printed when it started (API clients: send it as the {TOKEN_HEADER} header)",
        )


def _is_page_load(headers: dict[str, str]) -> bool:
    return headers.get("sec-fetch-mode") == "navigate" or "text/html" in headers.get("accept", "")


def _adding_header(send, header: tuple[bytes, bytes]):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return wrapped


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line UsageError (port taken, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(
            f"cannot serve on {host}:{port} ({e.strerror or e}), --host/--port, "
            "pick a free port (e.g. --port 7861) or an address of this machine"
        ) from e
    return sock


class Server:
    """uvicorn serving ``app`` on an already bound socket, in a thread."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the main thread keeps Ctrl-C
        self._sock = sock
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self, timeout: float = 60) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UsageError(
                    "the web server did not start, loracraft ui, see the messages above (run with --debug)"
                )
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
