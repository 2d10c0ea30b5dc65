"""Any URI -> a filesystem: the one place schemes, endpoints, credentials and timeouts are read."""

from __future__ import annotations

import errno
import os
import posixpath
import re
import sys
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import ConfigError, named

# fsspec takes `_` in protocol names too (arrow_hdfs, async_wrapper): so must the policy.
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+._-]*://")
_S3_SCHEMES = ("s3", "s3a")
# No storage call may hang: botocore's defaults (60 s connect, legacy retries) would let an
# unreachable endpoint stall a job for minutes.
S3_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 60,
                    "retries": {"max_attempts": 5, "mode": "standard"}}
# fsspec's S3 option names -> the names LanceDB (object_store) gives the same settings.
_LANCE_S3_OPTIONS = {"endpoint_url": "aws_endpoint", "key": "aws_access_key_id",
                     "secret": "aws_secret_access_key", "token": "aws_session_token",
                     "region": "aws_region"}


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME.match(uri))


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if has_scheme(uri) else "file"


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def absolute(path: str | None) -> str | None:
    """A local path made absolute in the driver's working directory, which Ray's workers do not
    share: on another node, or started from another directory (`ray start`, a session that
    outlives a `cd`), they would resolve a relative path against their own. URIs as they are."""
    if not path or has_scheme(path):
        return path
    return os.path.abspath(path)


def is_url(uri: str) -> bool:
    return scheme(uri) in ("http", "https")


def _fsspec_options(uri: str, storage_options: dict | None) -> dict:
    options = dict(storage_options or {})
    if scheme(uri) in _S3_SCHEMES:
        region = options.pop("region", None) or os.environ.get("AWS_REGION")
        client_kwargs = dict(options.get("client_kwargs") or {})
        if region:
            client_kwargs.setdefault("region_name", region)
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        options["config_kwargs"] = {**S3_CLIENT_CONFIG, **(options.get("config_kwargs") or {})}
        options.setdefault("endpoint_url", os.environ.get("AWS_ENDPOINT_URL") or None)
    return options


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it.

    Credentials come from where each backend looks (AWS_* variables, instance roles, ...);
    `storage_options` are fsspec's own option names (for S3: endpoint_url, key, secret, token,
    region, anon). In a chained URI (`tar://member::s3://bucket/shard.tar`) they are the last
    link's, the store where the bytes are.
    """
    links = uri.split("::")
    if len(links) > 1:
        target = links[-1]
        options = {scheme(target): _fsspec_options(target, storage_options)}
    else:
        options = _fsspec_options(uri, storage_options)
    try:
        try:
            return fsspec.core.url_to_fs(uri, **options)
        except (ImportError, AttributeError) as exc:
            torn = _packages_being_imported(exc.__traceback__)
            if not torn:
                raise
            _forget(torn)
            return fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        raise ConfigError(f"{redact(uri)}: {exc}") from None


def _packages_being_imported(tb) -> set[str]:
    """The top-level packages whose module code was running when an import failed."""
    packages, importing = set(), False
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name.startswith(("importlib", "_frozen_importlib")):
            importing = True
        elif importing and name:
            packages.add(name.split(".")[0])
        tb = tb.tb_next
    return packages


def _forget(packages: set[str]) -> None:
    """Drop `packages` from the module cache so the next import runs them afresh.

    Ray Data cancels a stopped stage's tasks with a KeyboardInterrupt, which can land while a
    worker is first importing a store's client (s3fs -> aiobotocore -> aiohttp, about a second).
    The interrupted package leaves its finished submodules cached; importing it again binds
    none of them as attributes ("module aiohttp has no attribute http_exceptions"), and every
    later task on that worker would fail the same way.
    """
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]


def lance_storage_options(uri: str, storage_options: dict | None = None) -> dict | None:
    """The same settings under LanceDB's names (it reads AWS_* credentials itself)."""
    if scheme(uri) not in _S3_SCHEMES:
        return dict(storage_options) if storage_options else None
    options = {_LANCE_S3_OPTIONS.get(k, k): str(v) for k, v in (storage_options or {}).items()}
    endpoint = options.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["aws_endpoint"] = endpoint
        if endpoint.startswith("http://"):
            options.setdefault("allow_http", "true")
    return options or None


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem | None:
    """The same filesystem for pyarrow and Ray Data readers (None: let them use the local disk)."""
    if _is_local_fs(fs):
        return None
    return pafs.PyFileSystem(_FSSpecHandler(fs))


class _FSSpecHandler(pafs.FSSpecHandler):
    """pyarrow's handler, except that opening a file does not first ask `isfile()`, which fsspec
    answers False on any error: an unreachable store read as a missing file (exit 1, "file not
    found") instead of an outage (waited out, then exit 75). A missing file still raises
    FileNotFoundError, from the open itself."""

    def open_input_file(self, path):
        return pa.PythonFile(self.fs.open(path, mode="rb"), mode="r")

    def open_input_stream(self, path):
        return pa.PythonFile(self.fs.open(path, mode="rb"), mode="r")


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a path inside `fs` (what `filesystem` stripped)."""
    return path if _is_local_fs(fs) else fs.unstrip_protocol(path)


def resolve(reference: str, base: str) -> str:
    """An image reference as a URI: absolute URIs and paths stay, relative ones join `base`."""
    if has_scheme(reference) or reference.startswith("/"):
        return reference
    if has_scheme(base):
        return base.rstrip("/") + "/" + posixpath.normpath(reference)
    return posixpath.normpath(posixpath.join(base, reference))


def redact(uri: str) -> str:
    """A URI safe to print: no query string (signed URLs carry credentials there), no user info."""
    uri = re.sub(r"(\?|%3[fF]).*$", "?…", uri)  # also a query quoted into a path (`%3F`)
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


# A URI in a message ends before spaces, quotes and the punctuation that follows it in a sentence.
_URI_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:)\]]")
_QUERY_IN_TEXT = re.compile(r"(/[^\s'\"<>?]*)\?(?!…)[^\s'\"<>]*[^\s'\"<>.,;:)\]]")


def redact_text(text: str) -> str:
    """A message safe to print: every URI in it redacted, and query strings after any path
    (libraries quote the request target alone, `GET /a.jpg?X-Amz-Signature=...`)."""
    text = _URI_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    return _QUERY_IN_TEXT.sub(lambda m: m.group(1) + "?…", text)


def describe(exc: BaseException) -> str:
    """One line about a failure, for an error message (URIs and query strings redacted)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return redact_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def check_writable(uri: str, storage_options: dict | None = None, setting: str = "out") -> None:
    """Fail before any work when `uri` (the value of `setting`) cannot be written: missing
    bucket, no access, no endpoint."""
    fs, path = filesystem(uri, storage_options)
    try:
        if _is_local_fs(fs):
            fs.makedirs(path, exist_ok=True)
            return
        probe = f"{path.rstrip('/')}/.altclip-probe-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:
        bucket = path.split("/", 1)[0]
        raise ConfigError(f"{named(setting)} {redact(uri)}: bucket '{bucket}' does not exist") from None
    except PermissionError as exc:
        raise ConfigError(f"{named(setting)} {redact(uri)}: access denied, check the credentials "
                          f"({describe(exc)})") from None
    except Exception as exc:  # every backend raises its own kinds
        raise ConfigError(f"{named(setting)} {redact(uri)}: cannot write there ({describe(exc)})") from None


# How long a job waits out an unreachable or overloaded store before it stops (and can be
# rerun to resume); each storage call already retries a few times within seconds.
DEFAULT_PATIENCE_S = 300.0


class StorageUnavailable(Exception):
    """The store stayed unreachable longer than the job's patience: a job failure, never a row's."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether a storage error means the store is unreachable or overloaded, not that the
    object is missing or forbidden: refused and reset connections, timeouts, 5xx and throttling."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _UNAVAILABLE_ERRNOS:
        return True  # s3fs turns 500/503/SlowDown into these
    module = type(exc).__module__.split(".")[0]
    name = type(exc).__name__
    if module == "botocore":  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError ...
        return "Connection" in name or "Timeout" in name or name == "HTTPClientError"
    if module in ("aiohttp", "fsspec"):  # gcsfs and adlfs speak aiohttp
        return "Connect" in name or "Timeout" in name or "Disconnected" in name
    # Lance and LanceDB (Rust's object_store) raise ValueError/OSError with the cause in the text.
    return any(sign in str(exc) for sign in _LANCE_UNAVAILABLE)


_LANCE_UNAVAILABLE = ("tcp connect error", "Connection refused", "dns error", "operation timed out",
                      "connection reset", "HttpError { kind: Timeout")
_UNAVAILABLE_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNREFUSED,
                       errno.ECONNRESET, errno.EREMOTEIO}


# An unreachable store's failure in a reader's words: the first of these signs its errors' text
# holds (Rust's object_store prints a page of debug structures; botocore a cut URL).
_UNAVAILABLE_WORDS = (("connectionrefused", "connection refused"), ("connection refused", "connection refused"),
                      ("dns error", "name not resolved"), ("name or service not known", "name not resolved"),
                      ("timed out", "timed out"), ("timeout", "timed out"), ("reset", "connection reset"),
                      ("slowdown", "throttled"), ("could not connect", "no connection"))
_ENDPOINT_IN_TEXT = re.compile(r"https?://[^/\s\"'(),?]+")


def why_unavailable(exc: BaseException) -> str:
    """An unreachable store's error in a few words, with the endpoint it tried: `connection
    refused at http://127.0.0.1:9`, not the library's text."""
    texts, seen, pending = [], set(), [exc]
    while pending:  # the telling link is often down the chain
        exc = pending.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        texts.append(f"{type(exc).__name__}: {exc}")
        # botocore keeps the connector's error in `kwargs`, aiohttp's connector the socket's as `os_error`.
        wrapped = getattr(exc, "kwargs", None)
        pending += [e for e in (exc.__cause__, exc.__context__, getattr(exc, "os_error", None),
                                wrapped.get("error") if isinstance(wrapped, dict) else None)
                    if isinstance(e, BaseException)]
    text = " ".join(texts)
    what = next((words for sign, words in _UNAVAILABLE_WORDS if sign in text.lower()), "no answer")
    endpoint = _ENDPOINT_IN_TEXT.search(text)
    return f"{what} at {endpoint.group(0)}" if endpoint else what


_OUTAGE_IN_TEXT = re.compile(r"(?:pipeline\.storage\.)?StorageUnavailable: (.+)")


def outage_in(exc: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable a task raised, however Ray wrapped it on its way to the driver: as
    a cause, or (Ray Data's UserCodeException keeps only the text) in a traceback's text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageUnavailable):
            return exc
        found = _OUTAGE_IN_TEXT.search(str(exc))
        if found:
            return StorageUnavailable(found.group(1).strip())
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def patiently(call, uri: str, patience_s: float = DEFAULT_PATIENCE_S):
    """`call()`, retried with backoff while the store is unavailable, for up to `patience_s`.

    Other errors pass through at once. Past the patience it raises StorageUnavailable, which
    fails the job: rows are not marked failed because a store was down.
    """
    started = time.monotonic()
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - started
            if not is_unavailable(exc):
                raise
            if waited + delay > patience_s:
                raise StorageUnavailable(
                    f"{redact(uri)}: storage unavailable for {waited:.0f} s ({why_unavailable(exc)})"
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 30.0)
