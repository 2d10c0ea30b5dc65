"""Image bytes over http(s): the address policy checked on every hop, a wall-clock deadline per attempt."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.util import parse_url

from pipeline import __version__, storage
from pipeline.decode.barrier import ImageError
from pipeline.decode.deadlines import CURRENT, DEADLINES, Attempt, CutOffHTTPConnection, CutOffHTTPSConnection

# An image file or download larger than this is `too_large` (the one cap: fetch.read_bytes looks
# it up here at each read).
MAX_IMAGE_BYTES = 64 << 20
HTTP_TIMEOUT_S = 20  # per attempt, wall clock: connect, redirects, headers and the whole body
HTTP_ATTEMPTS = 4
# A server that let an attempt's whole deadline pass is seldom quicker straight after: it gets
# one more, not HTTP_ATTEMPTS (img2dataset gives it none). At 4 x 20 s a URL that never answers
# held its batch 83 s; 1% of such URLs held half of all 64-row batches that long.
HTTP_TIMEOUT_ATTEMPTS = 2
HTTP_BACKOFF_S = 0.5
MAX_REDIRECTS = 5
# A 429 or 503 with Retry-After is tried again after that long, at most this long.
MAX_RETRY_AFTER_S = HTTP_TIMEOUT_S
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}
USER_AGENT = f"altclip-pipeline/{__version__}"
# X-Robots-Tag directives that opt an image out, as img2dataset honours them by default (and
# `none`, which means noindex, nofollow): the row is `opted_out`, its bytes unread.
DISALLOWED_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
# Addresses a host name resolved to, kept per process this long: a job fetches many images of
# one host. A connection still goes to an address the policy checked.
DNS_CACHE_S = 300.0
DNS_CACHE_ENTRIES = 4096
_REDIRECTS = {301, 302, 303, 307, 308}
URL_SCHEMES = frozenset({"http", "https"})


_RESOLVED: OrderedDict[tuple[str, int], tuple[float, list[str]]] = OrderedDict()
_RESOLVED_LOCK = threading.Lock()


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of `host` (kept DNS_CACHE_S): the connection goes to one of these."""
    key, now = (host.lower(), port), time.monotonic()
    with _RESOLVED_LOCK:
        kept = _RESOLVED.get(key)
        if kept is not None and kept[0] > now:
            _RESOLVED.move_to_end(key)
            return kept[1]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    with _RESOLVED_LOCK:
        _RESOLVED[key] = (now + DNS_CACHE_S, addresses)
        while len(_RESOLVED) > DNS_CACHE_ENTRIES:
            _RESOLVED.popitem(last=False)
    return addresses


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    inner = embedded_ipv4(ip) if ip.version == 6 else None
    if inner is not None:  # judged by the IPv4 address it reaches
        return is_public_address(str(inner))
    return ip.is_global and not ip.is_multicast


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and reaches: IPv4-mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), NAT64 (64:ff9b::a.b.c.d)
    and 6to4 (2002:aabb:ccdd::). Python counts most of these as global whatever they carry."""
    packed = ip.packed
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if packed[:12] == bytes(12) and int(ip) > 1:  # not :: or ::1, which are themselves
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes(8) + b"\xff\xff\x00\x00" or any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(packed[12:])
    return None


_POOLS: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()
_POOLS_LOCK = threading.Lock()
MAX_POOLS = 256  # hosts with open connections kept per process


def _pool(scheme: str, host: str, address: str, port: int) -> urllib3.HTTPConnectionPool:
    """A connection pool to the checked address, speaking to `host` (Host header, TLS name)."""
    key = (scheme, host, address, port)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None:
            _POOLS.move_to_end(key)
            return pool
        options = dict(maxsize=4, block=False, retries=False)
        if scheme == "https":
            pool = urllib3.HTTPSConnectionPool(address, port, server_hostname=host,
                                               assert_hostname=host, cert_reqs="CERT_REQUIRED", **options)
            pool.ConnectionCls = CutOffHTTPSConnection
        else:
            pool = urllib3.HTTPConnectionPool(address, port, **options)
            pool.ConnectionCls = CutOffHTTPConnection
        _POOLS[key] = pool
        while len(_POOLS) > MAX_POOLS:
            _POOLS.popitem(last=False)[1].close()
        return pool


def close_pools() -> None:
    """Close this process's pooled connections (each pool keeps the TLS settings it was made with)."""
    with _POOLS_LOCK:
        while _POOLS:
            _POOLS.popitem()[1].close()


class _Retry(Exception):
    """A transient failure of one attempt: `kind` if it is the last; `after`: seconds the server
    asked to be left alone (Retry-After)."""

    def __init__(self, kind: str, message: str, after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.after = after


def _retry_after(value: str | None) -> float | None:
    """Retry-After's seconds, from a number or an HTTP date (None: absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(frozen=True)
class _Ask:
    """What one fetch sends and refuses."""

    user_agent: str = USER_AGENT
    disallowed: frozenset = DISALLOWED_DIRECTIVES


def fetch_url(url: str, allow_private: bool = False, timeout_s: float | None = None,
              attempts: int | None = None, user_agent: str = USER_AGENT,
              disallowed_directives: frozenset = DISALLOWED_DIRECTIVES) -> bytes:
    """GET with redirects followed by hand (each hop's scheme and address checked, and the
    connection made to the address checked), a wall-clock deadline per attempt (connect,
    redirects, headers and body: `timeout_s`, default HTTP_TIMEOUT_S), retries with backoff on
    transient failures (`attempts` in all, default HTTP_ATTEMPTS, of which HTTP_TIMEOUT_ATTEMPTS
    may time out; a 429 or 503 waits what its Retry-After asks, up to MAX_RETRY_AFTER_S), a size
    cap, and an image whose X-Robots-Tag carries one of `disallowed_directives` refused as
    `opted_out`."""
    shown = storage.redact(url)
    timeout_s = HTTP_TIMEOUT_S if timeout_s is None else timeout_s
    attempts = HTTP_ATTEMPTS if attempts is None else attempts
    ask = _Ask(user_agent, frozenset(d.lower() for d in disallowed_directives))
    timeouts = 0
    for attempt in range(attempts):
        try:
            return _attempt(url, allow_private, timeout_s, ask)
        except _Retry as exc:
            timeouts += exc.kind == "timeout"
            if attempt == attempts - 1 or timeouts == HTTP_TIMEOUT_ATTEMPTS:
                raise ImageError(exc.kind, f"{shown}: {exc}, {attempt + 1} attempts") from None
            wait = HTTP_BACKOFF_S * 2**attempt
            if exc.after is not None:
                wait = max(wait, min(exc.after, MAX_RETRY_AFTER_S))
        time.sleep(wait)
    raise AssertionError("unreachable")


def _attempt(url: str, allow_private: bool, timeout_s: float, ask: _Ask) -> bytes:
    """One attempt at `url`, cut off `timeout_s` after it starts."""
    attempt = CURRENT.attempt = Attempt(timeout_s)
    DEADLINES.add(attempt)
    try:
        data = _get(url, allow_private, attempt, ask)
    except (_Retry, ImageError) as exc:
        # Past the deadline, a failure to read is the deadline's doing; an answer the server
        # gave before it (a 404, a refused address, a size) stands.
        if attempt.finish() and (isinstance(exc, _Retry) or str(exc).startswith("read_error:")):
            raise _Retry("timeout", _too_slow(attempt)) from None
        raise
    finally:
        CURRENT.attempt = None
    if attempt.finish():  # the body may have been cut short at the deadline
        raise _Retry("timeout", _too_slow(attempt))
    return data


def _too_slow(attempt: Attempt) -> str:
    return f"no complete answer in {attempt.seconds:g} s"


def _get(url: str, allow_private: bool, attempt: Attempt, ask: _Ask) -> bytes:
    first = storage.redact(url)
    for _ in range(MAX_REDIRECTS + 1):
        shown = storage.redact(url)
        try:
            parts = parse_url(url)
        except Exception as exc:
            raise ImageError("read_error", f"{shown}: not a valid URL ({storage.describe(exc)})") from None
        scheme = (parts.scheme or "").lower()
        if scheme not in URL_SCHEMES:
            raise ImageError("forbidden", f"{first}: redirected to {scheme or 'no'}:// ({shown}); "
                             "only http and https are followed")
        if not parts.host:
            raise ImageError("read_error", f"{shown}: the URL names no host")
        host = parts.host.strip("[]")
        port = parts.port or (443 if scheme == "https" else 80)
        address = _checked_address(host, port, allow_private, shown)
        host_header = parts.host if parts.port is None else f"{parts.host}:{parts.port}"
        response = _request(scheme, host, address, port, parts.request_uri, host_header, attempt,
                            ask.user_agent)
        try:
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise ImageError("read_error", f"{shown}: HTTP {response.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if response.status in (404, 410):
                raise ImageError("not_found", f"{shown}: HTTP {response.status}")
            if response.status in _RETRYABLE_HTTP:
                raise _Retry("read_error", f"HTTP {response.status}",
                             _retry_after(response.headers.get("Retry-After")))
            if response.status >= 400:
                raise ImageError("read_error", f"{shown}: HTTP {response.status}")
            refusal = _opted_out(response.headers.getlist("X-Robots-Tag"), ask)
            if refusal:
                raise ImageError("opted_out", f"{shown}: X-Robots-Tag: {refusal}")
            return _read_body(response, shown, attempt)
        finally:
            if attempt.expired:
                response.close()  # its socket is shut down: not back into the pool
            response.release_conn()
    raise ImageError("read_error", f"{first}: more than {MAX_REDIRECTS} redirects")


def _opted_out(values: list[str], ask: _Ask) -> str | None:
    """The X-Robots-Tag value that opts this fetch out (None: none does), read as img2dataset
    reads it: `directive, ...` for every agent, or `agent: directive, ...` for one."""
    token = ask.user_agent.split("/", 1)[0].strip().lower()
    for value in values:
        agent, colon, directives = value.partition(":")
        if not colon:
            agent, directives = "", value
        if agent.strip().lower() not in ("", token, "*"):
            continue
        if {d.strip().lower() for d in directives.split(",")} & ask.disallowed:
            return value.strip()
    return None


def _checked_address(host: str, port: int, allow_private: bool, shown: str) -> str:
    try:
        addresses = resolve_host(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise ImageError("read_error", f"{shown}: cannot resolve {host} ({storage.describe(exc)})") from None
    if not addresses:
        raise ImageError("read_error", f"{shown}: {host} has no address")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise ImageError("forbidden", f"{shown}: {host} is a non-public address ({address}); "
                                 "pass --allow-private-urls to permit it")
    return addresses[0]


def _request(scheme: str, host: str, address: str, port: int, target: str, host_header: str,
             attempt: Attempt, user_agent: str):
    pool = _pool(scheme, host, address, port)
    # Each socket operation may take what is left of the attempt, at most.
    left = max(0.01, attempt.deadline - time.monotonic())
    try:
        return pool.urlopen(
            "GET", target, headers={"Host": host_header, "User-Agent": user_agent,
                                    "Accept-Encoding": "identity"},
            redirect=False, retries=False, preload_content=False, assert_same_host=False,
            timeout=urllib3.Timeout(connect=left, read=left),
        )
    except (urllib3.exceptions.TimeoutError, TimeoutError, socket.timeout):
        raise _Retry("timeout", _too_slow(attempt)) from None
    except (urllib3.exceptions.HTTPError, ConnectionError, OSError) as exc:
        # Refused or reset connections, a server answering garbage, a TLS failure: retried.
        raise _Retry("read_error", storage.describe(exc)) from None


def _read_body(response, shown: str, attempt: Attempt) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_IMAGE_BYTES:
        raise ImageError("too_large", f"{shown}: {int(length)} bytes > {MAX_IMAGE_BYTES}")
    chunks, size = [], 0
    try:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_IMAGE_BYTES:
                raise ImageError("too_large", f"{shown}: more than {MAX_IMAGE_BYTES} bytes")
    except (urllib3.exceptions.TimeoutError, TimeoutError, socket.timeout):
        raise _Retry("timeout", _too_slow(attempt)) from None
    except (urllib3.exceptions.HTTPError, ConnectionError, OSError) as exc:
        raise _Retry("read_error", storage.describe(exc)) from None
    return b"".join(chunks)