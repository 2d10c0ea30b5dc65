"""What `altclip serve` answers with: one table kept fresh, its model's towers warm, searches by
vector with typed filters, row lookups, and thumbnails read server-side.

Thumbnails are read with the server's storage options and re-encoded as JPEG, so the browser
never sees a storage URI, a credential or a signed URL.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.decode.barrier import ImageError
from pipeline.decode.fetch import FetchPolicy, read_bytes, source_of
from pipeline.decode.thumbnails import ThumbnailCache, make_thumbnails
from pipeline.query.filters import Column, Filters
from pipeline.query.query_table import nearest, open_query_table
from pipeline.table.sql_text import sql_equals
from schemas.embeddings import (
    CAPTION_TRUNCATED,
    HEIGHT,
    IMAGE_ERROR,
    IMAGE_SHA256,
    VECTOR_COLUMNS,
    WIDTH,
    contract_column_names,
)
from schemas.manifest import CAPTION, ID, IMAGE, IMAGE_BYTES
from schemas.table import SEARCH_COLUMNS

MAX_TEXT_CHARS = 4000
# An uploaded query image may have at most this many pixels (a 40 MP photo), read from its header
# before it is decoded: a 160 KB PNG of 13000x13000 would otherwise cost 0.8 GB and seconds.
MAX_UPLOAD_PIXELS = 40_000_000
# A string column with at most this many distinct values is offered as a choice of values.
MAX_LISTED_VALUES = 50
# How often an open table looks for versions written since (a nightly reembed, a load).
REFRESH_SECONDS = 10.0
FILTERABLE_CONTRACT_COLUMNS = (WIDTH, HEIGHT, CAPTION_TRUNCATED)
# A thumbnail's image is read from wherever its row points, and a slow host holds the worker
# reading it until the fetch's deadline. Thumbnails take at most THUMBNAIL_FETCHES of the
# server's 40 worker threads at once, and one host at most THUMBNAIL_FETCHES_PER_HOST; past
# either a thumbnail is refused at once (503), so searches and other hosts' images are answered
# (50 requests for a row on a host trickling a byte a second once held all 40, and every other
# request timed out). A person is waiting: 2 attempts of 10 s, not a batch job's up to 4 of 20.
THUMBNAIL_FETCHES = 16
THUMBNAIL_FETCHES_PER_HOST = 4
THUMBNAIL_FETCH_TIMEOUT_S = 10.0
THUMBNAIL_FETCH_ATTEMPTS = 2
RETRY_AFTER_S = 5


class ServeError(Exception):
    """An answer other than 200 (a missing row, an unreadable image), with its message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class FetchSlots:
    """Fetches in flight, in all and per host; a fetch that would pass either limit is refused."""

    def __init__(self, total: int, per_host: int):
        self.total, self.per_host = total, per_host
        self._by_host: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, uri: str) -> str | None:
        """The host's key, its slot taken; None when none is free."""
        host = source_of(uri)
        with self._lock:
            if sum(self._by_host.values()) >= self.total or self._by_host.get(host, 0) >= self.per_host:
                return None
            self._by_host[host] = self._by_host.get(host, 0) + 1
            return host

    def give_back(self, host: str) -> None:
        with self._lock:
            self._by_host[host] -= 1
            if not self._by_host[host]:
                del self._by_host[host]


class Searcher:
    """One table, its model (both towers loaded once), and what the API answers with.

    Values a user sent that cannot be used raise ConfigError (a 400); rows and images that are
    not there or cannot be read raise ServeError with its status."""

    def __init__(self, db: str, table_name: str, model: str | None = None,
                 storage_options: dict | None = None, allow_private_urls: bool = False,
                 log=None, show_uris: bool = False):
        self.db, self.table_name = db, table_name
        # Without it, where images and the model live stays on the server: a hit's `image` is
        # its thumbnail's path, the model is named by its last path component.
        self.show_uris = show_uris
        self.storage_options = dict(storage_options or {})
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.query = open_query_table(db, table_name, model, self.storage_options, self.log)
        self.query.load_towers()
        self.model, self.dtype, self.table = self.query.model, self.query.dtype, self.query.table
        self.policy = FetchPolicy(self.storage_options, allow_local_paths=True,
                                  allow_private_urls=allow_private_urls,
                                  http_timeout_s=THUMBNAIL_FETCH_TIMEOUT_S,
                                  http_attempts=THUMBNAIL_FETCH_ATTEMPTS)
        self._fetches = FetchSlots(THUMBNAIL_FETCHES, THUMBNAIL_FETCHES_PER_HOST)
        self._table_lock = threading.Lock()
        self._checked = time.monotonic()
        self._view: TableView | None = None
        self._columns: tuple[int, list[dict]] | None = None
        self._thumbnails = ThumbnailCache()

    # table state

    def view(self) -> TableView:
        """The table at its latest version at most REFRESH_SECONDS old, with that version's
        columns: read once per version, not per request (each read is a round trip through
        LanceDB's event loop)."""
        with self._table_lock:
            if time.monotonic() - self._checked > REFRESH_SECONDS:
                try:
                    self.table.checkout_latest()
                except Exception as exc:  # keep serving the version we have
                    self.log(f"warning: could not look for a newer table version "
                             f"({storage.describe(exc)})")
                self._checked = time.monotonic()
                self._view = None
            if self._view is None:
                self._view = TableView.of(self.table)
            return self._view

    def columns(self) -> list[dict]:
        """Filterable columns with their types; values of small string columns, ranges of numbers."""
        view = self.view()
        cached = self._columns
        if cached and cached[0] == view.version:
            return cached[1]
        columns = list(view.filterable.values())
        stats = _column_stats(view.table, columns)
        described = [{"name": c.name, "type": str(c.type), "kind": c.kind, "filter": c.family,
                      **stats.get(c.name, {})} for c in columns]
        self._columns = (view.version, described)
        return described

    def model_name(self) -> str:
        """The model as the API names it: a hub name as it is; a folder or URI by its last
        component, unless the server shows URIs."""
        label = self.model.label
        if self.show_uris:
            return storage.redact(label)
        if label.startswith(("/", ".", "~")) or "://" in label:
            return label.rstrip("/").rsplit("/", 1)[-1]
        return label

    def info(self) -> dict:
        view = self.view()
        return {"table": self.table_name, "rows": view.table.count_rows(), "version": view.version,
                "model": self.model_name(), "dtype": self.dtype, "dim": self.model.dim,
                "against": sorted(SEARCH_COLUMNS)}

    # queries

    def embed_text(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise ConfigError("text: give a non-empty query")
        if len(text) > MAX_TEXT_CHARS:
            raise ConfigError(f"text: at most {MAX_TEXT_CHARS} characters")
        return self.query.embed_text(text)

    def embed_image(self, data: bytes) -> np.ndarray:
        """An uploaded image through the embed job's own decode and preprocessing."""
        if not data:
            raise ConfigError("image: the upload is empty")
        return self.query.embed_image(data, self.policy, max_pixels=MAX_UPLOAD_PIXELS)

    def row_vector(self, row_id: str, against: str) -> np.ndarray:
        column = SEARCH_COLUMNS[against]
        rows = (self.view().table.search().where(sql_equals(ID, [row_id]))
                .select([column]).limit(1).to_list())
        if not rows:
            raise ServeError(404, f"no row with id {row_id!r}")
        if rows[0][column] is None:
            raise ServeError(404, f"row {row_id!r} has no {column}")
        return np.asarray(rows[0][column], dtype=np.float32)

    def search(self, vector: np.ndarray, k: int, against: str, filters: Filters) -> dict:
        column = SEARCH_COLUMNS[against]
        view = self.view()
        user_where = filters.where(view.filterable)
        shown = [ID, CAPTION, IMAGE, WIDTH, HEIGHT, *view.metadata]
        started = time.perf_counter()
        rows = nearest(view.table, vector, column, k, user_where, [c for c in shown if c in view.names])
        hits = [_hit(row, view.metadata, self.show_uris) for row in rows]
        return {"hits": hits, "count": len(hits), "k": k, "against": against,
                "where": user_where, "search_ms": round((time.perf_counter() - started) * 1000, 1)}

    # thumbnails

    def thumbnail(self, row_id: str, size: int) -> tuple[bytes, str]:
        """JPEG bytes of the row's image, fitted in size x size, and an ETag."""
        view = self.view()
        # A row's image changes only with the table's version: a thumbnail made at this version
        # is answered without looking the row up again.
        key = (view.version, row_id, size)
        cached = self._thumbnails.get(key)
        if cached is not None:
            return cached
        rows = (view.table.search().where(sql_equals(ID, [row_id]))
                .select([IMAGE, IMAGE_SHA256, IMAGE_ERROR]).limit(1).to_list())
        if not rows:
            raise ServeError(404, f"no row with id {row_id!r}")
        uri, sha, failed = rows[0][IMAGE], rows[0].get(IMAGE_SHA256), rows[0].get(IMAGE_ERROR)
        if failed:
            # What the embed job could not or would not read (a local file named by a remote
            # manifest, a private URL, a damaged file) the server does not read either.
            raise ServeError(404, f"row {row_id!r} has no image ({failed.split(':', 1)[0]})")
        if not uri:
            raise ServeError(404, f"row {row_id!r} has no image URI (its image was inline)")
        host = self._fetches.take(uri)
        if host is None:
            raise ServeError(503, f"row {row_id!r}: too many images are being read from its host; "
                             "try again shortly", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            data = read_bytes(uri, self.policy)
        except ImageError as exc:
            kind = str(exc).split(":", 1)[0]
            status = 404 if kind == "not_found" else 502
            raise ServeError(status, f"row {row_id!r}: cannot read its image ({kind})") from None
        finally:
            self._fetches.give_back(host)
        jpeg = make_thumbnails([data], size)[0]
        if isinstance(jpeg, str):
            raise ServeError(502, f"row {row_id!r}: cannot make its thumbnail ({jpeg.split(':', 1)[0]})")
        digest = sha or hashlib.sha256(data).hexdigest()
        entry = (jpeg, f'"{digest[:20]}-{size}"')
        self._thumbnails.put(key, entry)
        return entry


@dataclass(frozen=True)
class TableView:
    """One version of the table and what requests need of its schema."""

    table: object
    version: int
    names: frozenset  # every column
    metadata: list  # the manifest's own columns, shown with each hit
    filterable: dict  # name -> Column: metadata and FILTERABLE_CONTRACT_COLUMNS of scalar types

    @classmethod
    def of(cls, table) -> "TableView":
        hidden = set(VECTOR_COLUMNS) | {IMAGE_BYTES}
        contract = contract_column_names()
        schema = table.schema
        columns = [Column(f.name, f.type, "contract" if f.name in contract else "metadata")
                   for f in schema if f.name not in hidden]
        return cls(table=table, version=table.version, names=frozenset(schema.names),
                   metadata=[c.name for c in columns if c.kind == "metadata"],
                   filterable={c.name: c for c in columns
                               if c.family and "`" not in c.name
                               and (c.kind == "metadata" or c.name in FILTERABLE_CONTRACT_COLUMNS)})


def _column_stats(table, columns: list[Column]) -> dict[str, dict]:
    """One pass over the filterable columns: distinct values (few) or min/max (numbers)."""
    wanted = [c for c in columns if c.family in ("string", "integer", "number")]
    if not wanted:
        return {}
    distinct = {c.name: set() for c in wanted if c.family == "string"}
    bounds: dict[str, list] = {}
    nulls = {c.name: 0 for c in wanted}
    for batch in table.search().select([c.name for c in wanted]).limit(None).to_batches():
        for column in wanted:
            array = batch.column(column.name)
            nulls[column.name] += array.null_count
            if column.name in distinct:
                seen = distinct[column.name]
                if seen is not None:
                    seen.update(v for v in pc.unique(array).to_pylist() if v is not None)
                    if len(seen) > MAX_LISTED_VALUES:
                        distinct[column.name] = None
            else:
                lo_hi = pc.min_max(array).as_py()
                if lo_hi["min"] is not None:
                    old = bounds.get(column.name)
                    bounds[column.name] = [lo_hi["min"], lo_hi["max"]] if old is None else [
                        min(old[0], lo_hi["min"]), max(old[1], lo_hi["max"])]
    stats = {}
    for column in wanted:
        entry = {}
        if column.name in distinct:
            values = distinct[column.name]
            entry["values"] = sorted(values) if values is not None else None
        elif column.name in bounds:
            lo, hi = bounds[column.name]
            entry["min"], entry["max"] = _json_number(lo), _json_number(hi)
        if nulls[column.name]:
            entry["nulls"] = nulls[column.name]
        stats[column.name] = entry
    return stats


def _hit(row: dict, metadata: list[str], show_uris: bool) -> dict:
    image = row.get(IMAGE)
    thumbnail = "/api/thumbnail/" + urllib.parse.quote(row[ID], safe="")
    return {
        "id": row[ID],
        "score": row["score"],
        "caption": row.get(CAPTION),
        # The stored URI (redacted) only when the server was started to show it; else the
        # image's reference on this server. The browser loads `thumbnail` either way.
        "image": (storage.redact(image) if show_uris else thumbnail) if image else None,
        "width": row.get(WIDTH),
        "height": row.get(HEIGHT),
        "thumbnail": thumbnail,
        "metadata": {name: _json_value(row.get(name)) for name in metadata},
    }


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_value(value):
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)  # dates, timestamps, decimals
