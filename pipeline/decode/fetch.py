"""Image bytes from the URIs a job allows: local files, object stores, http(s); every read
bounded in size and time, every URL hop checked against the address policy."""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import socket
import stat
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.util import parse_url

from pipeline import __version__, storage
from schemas.embeddings import error

MAX_IMAGE_BYTES = 64 << 20  # an image file or download larger than this is `too_large`
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
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
# Schemes that read this machine's files, or read through another URL (fsspec's archives and
# caches): only where local paths are allowed, and every link of a chained URL is checked.
LOCAL_SCHEMES = frozenset({"file", "local", "memory"})
WRAPPER_SCHEMES = frozenset({"zip", "tar", "simplecache", "filecache", "blockcache", "dir"})


class ImageError(Exception):
    """A row's image could not be had; `str()` is the row's `image_error` (`kind: message`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(error(kind, storage.redact_text(message)))


@dataclass(frozen=True)
class FetchPolicy:
    """Where image fetches may go, and with which storage settings."""

    storage_options: dict = field(default_factory=dict, repr=False)
    # Local paths (and fsspec's archive and cache protocols) may be read: true for a manifest on
    # this machine, false for one from object storage unless --allow-local-paths.
    allow_local_paths: bool = True
    # URLs may not reach loopback, link-local or private addresses (the cluster's own services,
    # cloud metadata endpoints) unless allowed.
    allow_private_urls: bool = False
    # An unreachable store among these schemes (the manifest's, the output's, the table's) is
    # waited out this long, then the job stops (see storage.patiently); any other store that
    # does not answer is the row's `timeout` or `read_error`.
    patience_s: float = storage.DEFAULT_PATIENCE_S
    job_schemes: frozenset = frozenset({"file"})
    # An http(s) fetch: seconds per attempt, and attempts (None: HTTP_TIMEOUT_S, HTTP_ATTEMPTS).
    # A person waiting on a page (serve's thumbnails) is given less than a batch job.
    http_timeout_s: float | None = None
    http_attempts: int | None = None
    user_agent: str = USER_AGENT
    disallowed_directives: frozenset = DISALLOWED_DIRECTIVES


def source_of(uri: str) -> str:
    """Where a URI's bytes come from, as fetch limits count them: a URL's host or a store's
    bucket (`scheme://name`); this machine's files are one source, `local`."""
    parts = urlsplit(uri.split("::")[-1])
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}" if parts.netloc else "local"


def job_schemes(*uris: str | None) -> frozenset:
    """The storage schemes of a job's own locations (manifest, output, table, model)."""
    return frozenset(storage.scheme(u) for u in uris if u)


def read_bytes(uri: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """An image's bytes from a path, an object-store URI or an http(s) URL, as the policy allows."""
    shown = storage.redact(uri)
    if storage.scheme(uri) in URL_SCHEMES:  # a URL whole: `::` in it is an IPv6 address or a query
        return fetch_url(uri, policy.allow_private_urls, policy.http_timeout_s, policy.http_attempts,
                         policy.user_agent, policy.disallowed_directives)
    links = uri.split("::")
    schemes = [storage.scheme(link) for link in links]
    chained = len(links) > 1 or schemes[0] in WRAPPER_SCHEMES
    allowed = LOCAL_SCHEMES | WRAPPER_SCHEMES | OBJECT_STORE_SCHEMES if chained else (
        LOCAL_SCHEMES | OBJECT_STORE_SCHEMES)
    unknown = [s for s in schemes if s not in allowed]
    if unknown:
        raise ImageError("forbidden", f"{shown}: images are not read over {unknown[0]}:// (local "
                         "paths, object stores and http(s) URLs are)")
    reaches_local = chained or schemes[0] in LOCAL_SCHEMES
    if not policy.allow_local_paths and (reaches_local or schemes[0] not in policy.job_schemes):
        what = "a local path" if reaches_local else f"a {schemes[0]}:// store the job is not configured for"
        raise ImageError("forbidden", f"{shown}: {what} in a manifest from object storage "
                         "(pass --allow-local-paths to permit it)")

    def read() -> bytes:
        if schemes[0] == "tar" and len(links) == 2:  # a member of a tar (a WebDataset shard)
            return _read_member(links[1], links[0].split("://", 1)[1], policy.storage_options, shown)
        fs, path = storage.filesystem(uri, policy.storage_options)
        if storage.is_local(uri):
            _check_regular_file(path, shown)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if isinstance(size, int) and size > MAX_IMAGE_BYTES:
                raise ImageError("too_large", f"{shown}: {size} bytes > {MAX_IMAGE_BYTES}")
            data = f.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError("too_large", f"{shown}: more than {MAX_IMAGE_BYTES} bytes")
        return data

    try:
        if schemes[-1] in policy.job_schemes:
            return storage.patiently(read, uri, policy.patience_s)
        return read()
    except (storage.StorageUnavailable, ImageError):
        raise  # the first: the store's fault, not the row's; the job stops and a rerun resumes
    except FileNotFoundError:
        raise ImageError("not_found", f"{shown} does not exist") from None
    except IsADirectoryError:
        raise ImageError("read_error", f"{shown} is a directory") from None
    except PermissionError:
        raise ImageError("read_error", f"{shown}: permission denied") from None
    except Exception as exc:  # every storage backend raises its own kinds
        kind = "timeout" if storage.is_unavailable(exc) else "read_error"
        raise ImageError(kind, f"{shown}: {storage.describe(exc)}") from None


# A WebDataset row's image is a member of its shard, in fsspec's form `tar://MEMBER::SHARD`
# (pipeline/read/webdataset.py). Finding a member means reading every header of the shard (in object
# storage, most of its bytes): the member index of the last shards read is kept in each process
# while the shard's size and modification time stay as they were, and a member is then one
# ranged read.
SHARD_INDEXES_KEPT = 8
_SHARD_INDEXES: OrderedDict[str, tuple[tuple, dict[str, tuple[int, int]]]] = OrderedDict()
_SHARD_INDEXES_LOCK = threading.Lock()


def _read_member(shard: str, member: str, storage_options: dict, shown: str) -> bytes:
    """The bytes of one member of a tar (the last of that name), by its index."""
    fs, path = storage.filesystem(shard, storage_options)
    if storage.is_local(shard):
        _check_regular_file(path, shown)
    info = fs.info(path)
    version = (info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag")))
    with _SHARD_INDEXES_LOCK:
        kept = _SHARD_INDEXES.get(shard)
        if kept is not None and kept[0] == version:
            _SHARD_INDEXES.move_to_end(shard)
    if kept is None or kept[0] != version:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            # Of two members with one name the later wins, as `tar -x` and fsspec have it.
            kept = (version, {m.name: (m.offset_data, m.size) for m in tar if m.isreg()})
        with _SHARD_INDEXES_LOCK:
            _SHARD_INDEXES[shard] = kept
            while len(_SHARD_INDEXES) > SHARD_INDEXES_KEPT:
                _SHARD_INDEXES.popitem(last=False)
    if member not in kept[1]:
        raise FileNotFoundError(member)
    offset, size = kept[1][member]
    if size > MAX_IMAGE_BYTES:
        raise ImageError("too_large", f"{shown}: {size} bytes > {MAX_IMAGE_BYTES}")
    return fs.cat_file(path, start=offset, end=offset + size)


def _check_regular_file(path: str, shown: str) -> None:
    """A FIFO would block the read forever and /dev/zero never end: only regular files are read."""
    mode = os.stat(path).st_mode  # FileNotFoundError, PermissionError, ELOOP: handled by the caller
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise ImageError("read_error", f"{shown}: not a regular file")


# --- http(s) ---------------------------------------------------------------------------------

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
            pool.ConnectionCls = _CutOffHTTPSConnection
        else:
            pool = urllib3.HTTPConnectionPool(address, port, **options)
            pool.ConnectionCls = _CutOffHTTPConnection
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


# --- wall-clock deadlines --------------------------------------------------------------------
# A socket timeout bounds each read, not an answer: a server sending a byte a second never trips
# it, through the headers (read by http.client line by line) or the body. So each attempt has a
# deadline, and one thread per process shuts down the sockets of attempts past theirs: a read
# blocked on such a socket returns at once, and the attempt ends as a `timeout`.

class _Attempt:
    """One attempt's deadline and the sockets it opened or used."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock) -> None:
        with self._lock:
            if self.finished:
                return
            self._sockets.append(sock)
            if self.expired:
                _shut_down(sock)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)

    def finish(self) -> bool:
        """Stop watching; whether the deadline cut the attempt off first."""
        with self._lock:
            self.finished = True
            self._sockets.clear()
            return self.expired


def _shut_down(sock) -> None:
    try:
        # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown drops its TLS
        # state, which the thread blocked in a read still uses.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError, ValueError):
        pass  # closed already


class _Deadlines:
    """The process's attempts in flight, by deadline, and the thread that cuts them off."""

    def __init__(self):
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, attempt: _Attempt) -> None:
        with self._wake:
            heapq.heappush(self._heap, (attempt.deadline, next(self._order), attempt))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                heapq.heappop(self._heap)[2].expire()


_DEADLINES = _Deadlines()
_CURRENT = threading.local()  # .attempt: the attempt this thread is making


def _watch_current(sock) -> None:
    attempt = getattr(_CURRENT, "attempt", None)
    if attempt is not None and sock is not None:
        attempt.watch(sock)


class _CutOff:
    """A connection whose socket the attempt's deadline can shut down: from its creation (a TLS
    handshake trickled byte by byte) and at each response (a connection kept alive)."""

    def _new_conn(self):
        sock = super()._new_conn()
        _watch_current(sock)
        return sock

    def getresponse(self):
        _watch_current(self.sock)
        return super().getresponse()


class _CutOffHTTPConnection(_CutOff, urllib3.connection.HTTPConnection):
    pass


class _CutOffHTTPSConnection(_CutOff, urllib3.connection.HTTPSConnection):
    pass


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
    may time out; a 429 or 503 waits what its Retry-After asks, up to MAX_RETRY_AFTER_S), a size cap, and an image whose X-Robots-Tag
    carries one of `disallowed_directives` refused as `opted_out`."""
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
    attempt = _CURRENT.attempt = _Attempt(timeout_s)
    _DEADLINES.add(attempt)
    try:
        data = _get(url, allow_private, attempt, ask)
    except (_Retry, ImageError) as exc:
        # Past the deadline, a failure to read is the deadline's doing; an answer the server
        # gave before it (a 404, a refused address, a size) stands.
        if attempt.finish() and (isinstance(exc, _Retry) or str(exc).startswith("read_error:")):
            raise _Retry("timeout", _too_slow(attempt)) from None
        raise
    finally:
        _CURRENT.attempt = None
    if attempt.finish():  # the body may have been cut short at the deadline
        raise _Retry("timeout", _too_slow(attempt))
    return data


def _too_slow(attempt: _Attempt) -> str:
    return f"no complete answer in {attempt.seconds:g} s"


def _get(url: str, allow_private: bool, attempt: _Attempt, ask: _Ask) -> bytes:
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
             attempt: _Attempt, user_agent: str):
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


def _read_body(response, shown: str, attempt: _Attempt) -> bytes:
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
