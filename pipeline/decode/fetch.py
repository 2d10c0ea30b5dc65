"""Image bytes from the URIs a job allows: local files, object stores, http(s) (through http_get);
every read bounded in size and time, every URL hop checked against the address policy."""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipeline import storage
from pipeline.decode import http_get
from pipeline.decode.barrier import ImageError
from pipeline.decode.http_get import DISALLOWED_DIRECTIVES, URL_SCHEMES, USER_AGENT, fetch_url

OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
# Schemes that read this machine's files, or read through another URL (fsspec's archives and
# caches): only where local paths are allowed, and every link of a chained URL is checked.
LOCAL_SCHEMES = frozenset({"file", "local", "memory"})
WRAPPER_SCHEMES = frozenset({"zip", "tar", "simplecache", "filecache", "blockcache", "dir"})


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
    # An http(s) fetch: seconds per attempt, and attempts (None: http_get.HTTP_TIMEOUT_S, HTTP_ATTEMPTS).
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
            if isinstance(size, int) and size > http_get.MAX_IMAGE_BYTES:
                raise ImageError("too_large", f"{shown}: {size} bytes > {http_get.MAX_IMAGE_BYTES}")
            data = f.read(http_get.MAX_IMAGE_BYTES + 1)
        if len(data) > http_get.MAX_IMAGE_BYTES:
            raise ImageError("too_large", f"{shown}: more than {http_get.MAX_IMAGE_BYTES} bytes")
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
    if size > http_get.MAX_IMAGE_BYTES:
        raise ImageError("too_large", f"{shown}: {size} bytes > {http_get.MAX_IMAGE_BYTES}")
    return fs.cat_file(path, start=offset, end=offset + size)


def _check_regular_file(path: str, shown: str) -> None:
    """A FIFO would block the read forever and /dev/zero never end: only regular files are read."""
    mode = os.stat(path).st_mode  # FileNotFoundError, PermissionError, ELOOP: handled by the caller
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(mode):
        raise ImageError("read_error", f"{shown}: not a regular file")

