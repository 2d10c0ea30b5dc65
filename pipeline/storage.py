"""Any URI -> a filesystem: the one place schemes, endpoints, credentials and timeouts are read."""

from __future__ import annotations

import os
import posixpath
import re
import uuid

import fsspec
import pyarrow.fs as pafs

from pipeline.config import ConfigError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
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
    region, anon).
    """
    try:
        return fsspec.core.url_to_fs(uri, **_fsspec_options(uri, storage_options))
    except ImportError as exc:
        raise ConfigError(f"{redact(uri)}: {exc}") from None


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
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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
    uri = re.sub(r"\?.*$", "?…", uri)
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


def describe(exc: BaseException) -> str:
    """One line about a storage failure, for an error message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_writable(uri: str, storage_options: dict | None = None, option: str = "--out") -> None:
    """Fail before any work when `uri` cannot be written: missing bucket, no access, no endpoint."""
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
        raise ConfigError(f"{option} {redact(uri)}: bucket '{bucket}' does not exist") from None
    except PermissionError as exc:
        raise ConfigError(f"{option} {redact(uri)}: access denied, check the credentials "
                          f"({describe(exc)})") from None
    except Exception as exc:  # every backend raises its own kinds
        raise ConfigError(f"{option} {redact(uri)}: cannot write there ({describe(exc)})") from None
