"""The HTTP side of `altclip serve`: ASGI middleware that guards every request (Host, framing),
adds the security headers and answers failures as JSON, request logs without query strings, and
uvicorn serving on a socket bound before the model loads."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading

import uvicorn

from pipeline import storage

# A Host header is a name, an IPv4 address or a bracketed IPv6 address, and a port: nothing else
# (`localhost:1@evil.com` is neither, whatever a lenient parser takes from it).
_HOST = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                   r"(?::[0-9]{1,5})?")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                           "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())]
# How long a stop (Ctrl-C, SIGTERM) waits for requests in flight before closing them.
GRACEFUL_SHUTDOWN_S = 10

log = logging.getLogger("uvicorn.error")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


async def send_json(send, status: int, message: str, close: bool = False) -> None:
    """An error answer written straight to ASGI; `close` ends the connection after it, for a
    request whose body is left unread or whose framing is in doubt."""
    body = json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json; charset=utf-8"),
               (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses, before the app sees them: a Host that is not a host (400) or, served on loopback,
    one that is not loopback (403: a page elsewhere whose name was rebound to 127.0.0.1); a GET
    with a body and a request with both Content-Length and Transfer-Encoding (400, connection
    closed: where a proxy in front frames them otherwise, the rest would be read as another
    request); a Content-Length over the path's limit in `body_limits` (413, the body unread,
    connection closed; a chunked body is counted as it is read, by the route's own limit)."""

    def __init__(self, app, allowed_hosts: set | None, body_limits: dict[str, int]):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.body_limits = body_limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, []).append(value)
        refusal = self._refusal(scope, headers)
        if refusal:
            return await send_json(send, *refusal)
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers) -> tuple[int, str, bool] | None:
        return self._host_refusal(headers) or self._framing_refusal(scope, headers)

    def _host_refusal(self, headers) -> tuple[int, str, bool] | None:
        hosts = headers.get(b"host", [])
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else ""
        match = _HOST.fullmatch(host)
        if len(hosts) > 1 or (hosts and match is None):
            return 400, f"Host {host!r} is not a host[:port]", True
        if self.allowed_hosts is not None and (match is None or
                                               match["name"].lower() not in self.allowed_hosts):
            return 403, f"Host {host!r} is not served here", False
        return None

    def _framing_refusal(self, scope, headers) -> tuple[int, str, bool] | None:
        has_body = b"transfer-encoding" in headers or any(v.strip() != b"0" for v in
                                                          headers.get(b"content-length", []))
        if scope["method"] in ("GET", "HEAD") and has_body:
            return 400, f"a {scope['method']} request takes no body", True
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return 400, "Content-Length and Transfer-Encoding together: send one", True
        limit = self.body_limits.get(scope["path"])
        length = int(headers.get(b"content-length", [b"0"])[0])  # digits: h11 checked them
        if limit is not None and length > limit:
            return 413, f"the body is {length} bytes, at most {limit} are taken", True
        return None


class Answers:
    """Every answer gets the security headers; a failure the app did not answer becomes a 500
    that names its type only (the details, credentials redacted, go to the log)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        except Exception as exc:
            log.error("error on %s %s: %s", scope["method"], scope["path"], storage.describe(exc))
            if started:
                raise
            await send_json(with_headers, 500, f"internal error ({type(exc).__name__})", close=True)


class PathOnly(logging.Filter):
    """uvicorn's access lines as `METHOD /path STATUS`: the query string holds the user's search
    text, and the client's address is not needed to read the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.args, tuple) and len(record.args) == 5):
            return False  # a line of another shape might hold the query: left out
        _client, method, path, _version, status = record.args
        record.msg, record.args = "%s %s %d", (method, path.split("?", 1)[0], status)
        return True


LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"path_only": {"()": PathOnly}},
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {
        "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"},
        "access": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain",
                   "filters": ["path_only"]},
    },
    "loggers": {
        # uvicorn's own start-up lines are left out: run_serve prints the one line that matters.
        "uvicorn.error": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (raises OSError: a port in use, an address not of this machine)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class AppServer:
    """uvicorn serving an ASGI app on an already listening socket: until serve_forever() runs,
    connections wait in its backlog. serve_forever() in the main thread stops on Ctrl-C or
    SIGTERM; in another thread, on shutdown()."""

    def __init__(self, app, sock: socket.socket, quiet: bool = False):
        self.socket = sock
        # h11: a strict parser (conflicting or negative Content-Lengths, transfer codings other
        # than chunked are a 400), and the same one whether or not httptools is installed.
        config = uvicorn.Config(app, http="h11", lifespan="off", log_config=LOG_CONFIG,
                                access_log=not quiet, server_header=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self.server = uvicorn.Server(config)
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet

    @property
    def server_address(self) -> tuple:
        return self.socket.getsockname()

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever() running in another thread, and wait until it has returned."""
        self.server.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
