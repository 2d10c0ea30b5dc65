"""`altclip serve`: a web page and a JSON API over a table, on the standard library's HTTP server.

The model the table was built with is loaded once, both towers kept warm; queries are embedded
through the same stages the embed job runs. Filters never reach LanceDB as user text: each names
one of the table's own scalar columns, each value is converted to that column's Arrow type, and
the SQL is written here from those validated pieces (identifiers in backticks, strings in single
quotes with quotes doubled). Thumbnails are read server-side (with the server's storage options)
and re-encoded as JPEG, so the browser never sees a storage URI, a credential or a signed URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mimetypes
import os
import re
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.embedders import ImageEmbedder, TextEmbedder
from pipeline.fetch import FetchPolicy, ImageError, read_bytes
from pipeline.images import decode, preprocess_images, to_rgb
from pipeline.model import resolve_model
from pipeline.table import open_table, table_provenance
from pipeline.text import tokenize_captions
from schemas.embeddings import (
    CAPTION_TRUNCATED,
    HEIGHT,
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    IMAGE_SHA256,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    VECTOR_COLUMNS,
    WIDTH,
    contract_column_names,
)
from schemas.manifest import CAPTION, ID, IMAGE, IMAGE_BYTES, INLINE_IMAGE
from schemas.table import SEARCH_COLUMNS, SEARCH_NPROBES, SEARCH_REFINE_FACTOR

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
DEFAULT_K = 24
MAX_K = 200
MAX_TEXT_CHARS = 4000
# An uploaded query image may have at most this many pixels (a 40 MP photo), read from its header
# before it is decoded: a 160 KB PNG of 13000x13000 would otherwise cost 0.8 GB and seconds.
MAX_UPLOAD_PIXELS = 40_000_000
MAX_FILTER_VALUES = 100
MAX_UPLOAD_BYTES = 32 << 20
# A string column with at most this many distinct values is offered as a choice of values.
MAX_LISTED_VALUES = 50
THUMBNAIL_SIZES = (96, 128, 192, 256, 384, 512)
DEFAULT_THUMBNAIL_SIZE = 256
THUMBNAIL_CACHE_ENTRIES = 1024
# How often an open table looks for versions written since (a nightly reembed, a load).
REFRESH_SECONDS = 10.0
FILTERABLE_CONTRACT_COLUMNS = (WIDTH, HEIGHT, CAPTION_TRUNCATED)


class ServeError(Exception):
    """An answer other than 200, with a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    kind: str  # "metadata" (the manifest's own) or "contract" (id, caption, width, ...)

    @property
    def family(self) -> str | None:
        """What a filter on it takes: string, integer, number, boolean; None: not filterable."""
        t = self.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return "string"
        if pa.types.is_integer(t):
            return "integer"
        if pa.types.is_floating(t):
            return "number"
        if pa.types.is_boolean(t):
            return "boolean"
        return None


# --------------------------------------------------------------------------------------- filters


def sql_identifier(name: str) -> str:
    if "`" in name:  # never filterable (see `filterable_columns`); a guard, not a path taken
        raise ServeError(400, f"column name {name!r} cannot be filtered on")
    return f"`{name}`"


def sql_literal(value) -> str:
    """A validated Python value (already of the column's type) as a SQL literal."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise ServeError(400, f"unsupported filter value {value!r}")  # unreachable with _convert


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _convert(column: Column, value, what: str):
    """A user's value as the column's Arrow type, or a 400 that says why not."""
    family = column.family
    try:
        if family == "string":
            if not isinstance(value, str):
                raise ValueError("expected a string")
            converted = value
        elif family == "boolean":
            if isinstance(value, bool):
                converted = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                converted = value.strip().lower() in _TRUE
            else:
                raise ValueError("expected true or false")
        elif family == "integer":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError("expected an integer")
            converted = int(value.strip()) if isinstance(value, str) else int(value)
        elif family == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            converted = float(value.strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(converted):
                raise ValueError("expected a finite number")
        else:
            raise ValueError(f"{column.type} columns cannot be filtered on")
        # The column's own type decides the range (int8, uint32, ...) and the precision.
        return pa.scalar(converted, type=column.type).as_py()
    except (ValueError, TypeError, OverflowError, pa.ArrowInvalid) as exc:
        raise ServeError(400, f"{what}: {value!r} is not a valid {column.type} value "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


@dataclass
class Filters:
    """column -> {"eq": [values], "min": value, "max": value}, as the user gave them (unvalidated)."""

    terms: dict

    @classmethod
    def from_query(cls, pairs: list[tuple[str, str]]) -> "Filters":
        """`filter.<column>=v` (repeat for any of several), `min.<column>=v`, `max.<column>=v`."""
        terms: dict = {}
        for key, value in pairs:
            for prefix, op in (("filter.", "eq"), ("min.", "min"), ("max.", "max")):
                if key.startswith(prefix) and len(key) > len(prefix):
                    term = terms.setdefault(key[len(prefix):], {})
                    if op == "eq":
                        term.setdefault("eq", []).append(value)
                    elif value != "":
                        term[op] = value
        return cls(terms)

    @classmethod
    def from_json(cls, filters) -> "Filters":
        """{"lang": "de"} or {"lang": ["de", "es"]} or {"rank": {"min": 1, "max": 5}}."""
        if filters is None:
            return cls({})
        if not isinstance(filters, dict):
            raise ServeError(400, "filters: expected an object of column -> value")
        terms = {}
        for name, spec in filters.items():
            if isinstance(spec, dict):
                unknown = set(spec) - {"eq", "min", "max"}
                if unknown:
                    raise ServeError(400, f"filters.{name}: unknown keys {sorted(unknown)} "
                                          "(use eq, min, max)")
                eq = spec.get("eq")
                term = {k: spec[k] for k in ("min", "max") if spec.get(k) is not None}
                if eq is not None:
                    term["eq"] = eq if isinstance(eq, list) else [eq]
            else:
                term = {"eq": spec if isinstance(spec, list) else [spec]}
            terms[str(name)] = term
        return cls(terms)

    def where(self, columns: dict[str, Column]) -> str | None:
        """The SQL filter, from validated pieces only; unknown columns and bad values are a 400."""
        clauses = []
        for name, term in self.terms.items():
            column = columns.get(name)
            if column is None:
                known = ", ".join(sorted(columns)) or "none"
                raise ServeError(400, f"unknown filter column {name!r} (filterable: {known})")
            ident = sql_identifier(column.name)
            values = term.get("eq") or []
            if len(values) > MAX_FILTER_VALUES:
                raise ServeError(400, f"filter.{name}: at most {MAX_FILTER_VALUES} values")
            if values:
                literals = [sql_literal(_convert(column, v, f"filter.{name}")) for v in values]
                clauses.append(f"{ident} = {literals[0]}" if len(literals) == 1
                               else f"{ident} IN ({', '.join(literals)})")
            for op, sign in (("min", ">="), ("max", "<=")):
                if op in term:
                    if column.family not in ("integer", "number"):
                        raise ServeError(400, f"{op}.{name}: ranges apply to numeric columns only")
                    clauses.append(f"{ident} {sign} "
                                   f"{sql_literal(_convert(column, term[op], f'{op}.{name}'))}")
        return " AND ".join(f"({c})" for c in clauses) if clauses else None


# -------------------------------------------------------------------------------------- searcher


class Searcher:
    """One table, its model (both towers loaded once), and what the API answers with."""

    def __init__(self, db: str, table_name: str, model: str | None = None,
                 storage_options: dict | None = None, allow_private_urls: bool = False,
                 log=None):
        self.db, self.table_name = db, table_name
        self.storage_options = dict(storage_options or {})
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.table = open_table(db, table_name, self.storage_options)
        origin = table_provenance(self.table) or {}
        if model is None and "model" not in origin:
            raise ConfigError("the table does not record its model: name it with --model")
        self.model = resolve_model(model or origin["model"], self.storage_options)
        if origin.get("revision") not in (None, self.model.revision):
            self.log(f"warning: the table was built with {origin['model']}@{origin['revision']}, "
                     f"queries use {self.model.label}: scores may not be comparable")
        if self.model.dim != origin.get("dim", self.model.dim):
            raise ConfigError(f"--model {self.model.ref} makes {self.model.dim}-d vectors, "
                              f"the table holds {origin['dim']}-d ones")
        self.dtype = origin.get("dtype", "float32")
        self.preprocess_mode = (origin.get("preprocessing") or {}).get("mode", "exact")
        self.text_embedder = TextEmbedder(self.model, self.dtype)
        self.image_embedder = ImageEmbedder(self.model, self.dtype)
        self.policy = FetchPolicy(self.storage_options, allow_local_paths=True,
                                  allow_private_urls=allow_private_urls)
        self._model_lock = threading.Lock()  # one query through a tower at a time
        self._table_lock = threading.Lock()
        self._checked = time.monotonic()
        self._columns: tuple[int, list[dict]] | None = None
        self._thumbs: OrderedDict = OrderedDict()
        self._thumbs_lock = threading.Lock()

    # table state

    def _fresh_table(self):
        """The table, at its latest version at most REFRESH_SECONDS old."""
        with self._table_lock:
            if time.monotonic() - self._checked > REFRESH_SECONDS:
                try:
                    self.table.checkout_latest()
                except Exception as exc:  # keep serving the version we have
                    self.log(f"warning: could not look for a newer table version "
                             f"({storage.describe(exc)})")
                self._checked = time.monotonic()
            return self.table

    def schema_columns(self) -> list[Column]:
        hidden = set(VECTOR_COLUMNS) | {IMAGE_BYTES}
        contract = contract_column_names()
        return [Column(f.name, f.type, "contract" if f.name in contract else "metadata")
                for f in self._fresh_table().schema if f.name not in hidden]

    def filterable_columns(self) -> dict[str, Column]:
        """The manifest's metadata columns, and width, height, caption_truncated; scalar types."""
        return {c.name: c for c in self.schema_columns()
                if c.family and "`" not in c.name
                and (c.kind == "metadata" or c.name in FILTERABLE_CONTRACT_COLUMNS)}

    def metadata_names(self) -> list[str]:
        return [c.name for c in self.schema_columns() if c.kind == "metadata"]

    def columns(self) -> list[dict]:
        """Filterable columns with their types; values of small string columns, ranges of numbers."""
        table = self._fresh_table()
        version = table.version
        cached = self._columns
        if cached and cached[0] == version:
            return cached[1]
        columns = list(self.filterable_columns().values())
        stats = self._column_stats(table, columns)
        described = []
        for column in columns:
            entry = {"name": column.name, "type": str(column.type), "kind": column.kind,
                     "filter": column.family, **stats.get(column.name, {})}
            described.append(entry)
        self._columns = (version, described)
        return described

    def _column_stats(self, table, columns: list[Column]) -> dict[str, dict]:
        """One pass over the filterable columns: distinct values (few) or min/max (numbers)."""
        import pyarrow.compute as pc

        wanted = [c for c in columns if c.family in ("string", "integer", "number")]
        if not wanted:
            return {}
        distinct = {c.name: set() for c in wanted if c.family == "string"}
        bounds: dict[str, list] = {}
        nulls = {c.name: 0 for c in wanted}
        reader = table.search().select([c.name for c in wanted]).limit(None).to_batches()
        for batch in reader:
            for column in wanted:
                array = batch.column(column.name)
                nulls[column.name] += array.null_count
                if column.name in distinct:
                    seen = distinct[column.name]
                    if seen is not None:
                        seen.update(v for v in pc.unique(array).to_pylist() if v is not None)
                        if len(seen) > MAX_LISTED_VALUES:
                            distinct[column.name] = None
                elif column.family in ("integer", "number"):
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

    def info(self) -> dict:
        table = self._fresh_table()
        return {"table": self.table_name, "rows": table.count_rows(), "version": table.version,
                "model": storage.redact(self.model.label), "dtype": self.dtype, "dim": self.model.dim,
                "against": sorted(SEARCH_COLUMNS)}

    # queries

    def embed_text(self, text: str) -> np.ndarray:
        if not isinstance(text, str) or not text.strip():
            raise ServeError(400, "text: give a non-empty query")
        if len(text) > MAX_TEXT_CHARS:
            raise ServeError(400, f"text: at most {MAX_TEXT_CHARS} characters")
        batch = tokenize_captions(pa.table({CAPTION: [text]}), self.model)
        if batch.column(TEXT_ERROR)[0].is_valid:
            raise ServeError(400, f"text: {batch.column(TEXT_ERROR)[0]}")
        with self._model_lock:
            out = self.text_embedder(batch)
        return np.asarray(out.column(TEXT_EMBEDDING)[0].as_py(), dtype=np.float32)

    def embed_image(self, data: bytes) -> np.ndarray:
        """An uploaded image through the embed job's own decode and preprocessing."""
        if not data:
            raise ServeError(400, "image: the upload is empty")
        batch = pa.table({IMAGE: pa.nulls(1, pa.string()), INLINE_IMAGE: pa.array([data], pa.binary())})
        # The table's own preprocessing mode (exact, or fast: JPEG draft decode), as it was embedded.
        batch = preprocess_images(batch, self.model.preprocessing, self.policy, self.preprocess_mode,
                                  max_pixels=MAX_UPLOAD_PIXELS)
        if batch.column(IMAGE_ERROR)[0].is_valid:
            raise ServeError(400, f"image: {batch.column(IMAGE_ERROR)[0]}")
        with self._model_lock:
            out = self.image_embedder(batch)
        return np.asarray(out.column(IMAGE_EMBEDDING)[0].as_py(), dtype=np.float32)

    def row_vector(self, row_id: str, against: str) -> np.ndarray:
        column = SEARCH_COLUMNS[against]
        rows = (self._fresh_table().search().where(f"{sql_identifier(ID)} = {sql_literal(row_id)}")
                .select([column]).limit(1).to_list())
        if not rows:
            raise ServeError(404, f"no row with id {row_id!r}")
        if rows[0][column] is None:
            raise ServeError(404, f"row {row_id!r} has no {column}")
        return np.asarray(rows[0][column], dtype=np.float32)

    def search(self, vector: np.ndarray, k: int, against: str, filters: Filters) -> dict:
        column = SEARCH_COLUMNS[against]
        user_where = filters.where(self.filterable_columns())
        where = f"{column} IS NOT NULL" + (f" AND {user_where}" if user_where else "")
        metadata = self.metadata_names()
        shown = [ID, CAPTION, IMAGE, WIDTH, HEIGHT, *metadata]
        names = set(self._fresh_table().schema.names)
        started = time.perf_counter()
        # With an ANN index, refining re-ranks by the exact distance: the index's own is a
        # quantized squared L2, not the cosine a score is made from.
        rows = (self._fresh_table().search(vector, vector_column_name=column)
                .distance_type("cosine").nprobes(SEARCH_NPROBES).refine_factor(SEARCH_REFINE_FACTOR)
                .where(where, prefilter=True)
                .select([c for c in shown if c in names] + ["_distance"]).limit(k).to_list())
        hits = [self._hit(row, metadata) for row in rows]
        return {"hits": hits, "count": len(hits), "k": k, "against": against,
                "where": user_where, "search_ms": round((time.perf_counter() - started) * 1000, 1)}

    @staticmethod
    def _hit(row: dict, metadata: list[str]) -> dict:
        image = row.get(IMAGE)
        return {
            "id": row[ID],
            "score": round(1.0 - float(row["_distance"]), 6),
            "caption": row.get(CAPTION),
            # The stored URI, redacted, as information only: the browser loads `thumbnail`.
            "image": storage.redact(image) if image else None,
            "width": row.get(WIDTH),
            "height": row.get(HEIGHT),
            "thumbnail": "/api/thumbnail/" + urllib.parse.quote(row[ID], safe=""),
            "metadata": {name: _json_value(row.get(name)) for name in metadata},
        }

    # thumbnails

    def thumbnail(self, row_id: str, size: int) -> tuple[bytes, str]:
        """JPEG bytes of the row's image, fitted in size x size, and an ETag."""
        rows = (self._fresh_table().search().where(f"{sql_identifier(ID)} = {sql_literal(row_id)}")
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
        key = (row_id, uri, sha, size)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            data = read_bytes(uri, self.policy)
            # A JPEG is decoded at a reduced scale that still covers the thumbnail.
            image, _ = decode(data, draft_short_side=size)
        except ImageError as exc:
            kind = str(exc).split(":", 1)[0]
            status = 404 if kind == "not_found" else 502
            raise ServeError(status, f"row {row_id!r}: cannot read its image ({kind})") from None
        try:
            image = ImageOps.exif_transpose(image)  # as a viewer shows it
        except Exception:  # a broken EXIF block: show it unrotated
            pass
        image = _display_rgb(image)
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85, optimize=True, progressive=True)
        digest = sha or hashlib.sha256(data).hexdigest()
        entry = (out.getvalue(), f'"{digest[:20]}-{size}"')
        with self._thumbs_lock:
            self._thumbs[key] = entry
            while len(self._thumbs) > THUMBNAIL_CACHE_ENTRIES:
                self._thumbs.popitem(last=False)
        return entry


def _display_rgb(image: Image.Image) -> Image.Image:
    """RGB for a person to look at: 16- and 32-bit greyscale scaled down (not clipped to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    return to_rgb(image)


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


# ------------------------------------------------------------------------------------- request IO


def parse_k(value) -> int:
    if value is None or value == "":
        return DEFAULT_K
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ServeError(400, f"k: {value!r} is not an integer") from None
    if isinstance(value, bool) or not 1 <= k <= MAX_K:
        raise ServeError(400, f"k: {value!r} must be between 1 and {MAX_K}")
    return k


def parse_against(value, default: str = "image") -> str:
    value = value or default
    if value not in SEARCH_COLUMNS:
        raise ServeError(400, f"against: {value!r}; choose image or text")
    return value


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """multipart/form-data -> field name -> (bytes, filename or None)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ServeError(400, "multipart/form-data without a boundary")
    boundary = b"--" + match.group(1).encode("latin-1")
    fields = {}
    for part in body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                disposition = line
        name = re.search(r'[; ]name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (content, filename.group(1) if filename else None)
    return fields


_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_NAMES or host.startswith("127.")


class Handler(BaseHTTPRequestHandler):
    server_version = "altclip-serve"
    protocol_version = "HTTP/1.1"
    searcher: Searcher  # set on the subclass `make_server` builds
    allowed_hosts: set | None = None
    quiet = False

    # routing

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        self._body_read = False
        try:
            self._check_host()
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            query = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
            get = method in ("GET", "HEAD")
            if get and path in ("/", "/index.html"):
                return self._static("index.html")
            if get and path == "/favicon.ico":
                return self._static("favicon.svg")
            if get and path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if get and path == "/openapi.json":
                return self._json(openapi_spec(self.searcher))
            if get and path == "/api/info":
                return self._json(self.searcher.info())
            if get and path == "/api/columns":
                return self._json({"columns": self.searcher.columns()})
            if path == "/api/search" and get:
                return self._search_get(query)
            if path == "/api/search" and method == "POST":
                return self._search_post()
            if path == "/api/search/image" and method == "POST":
                return self._search_image(query)
            if get and path.startswith("/api/similar/"):
                return self._similar(urllib.parse.unquote(path[len("/api/similar/"):]), query)
            if get and path.startswith("/api/thumbnail/"):
                return self._thumbnail(urllib.parse.unquote(path[len("/api/thumbnail/"):]), query)
            known = {"/", "/openapi.json", "/api/info", "/api/columns", "/api/search",
                     "/api/search/image"}
            if path in known or path.startswith(("/api/similar/", "/api/thumbnail/", "/static/")):
                raise ServeError(405, f"{method} is not allowed on {path}")
            raise ServeError(404, f"no such path: {path}")
        except ServeError as exc:
            if method == "POST" and not self._body_read:
                self.close_connection = True  # the unread body would be taken for the next request
            self._json({"error": exc.message}, status=exc.status)
        except Exception as exc:  # a bug or a storage failure: say so without internals
            if method == "POST" and not self._body_read:
                self.close_connection = True
            self.log_message("error on %s: %s", self.path.split("?")[0], storage.describe(exc))
            self._json({"error": f"internal error ({type(exc).__name__})"}, status=500)

    def _check_host(self):
        """Served on loopback, answer only requests addressed to loopback (DNS rebinding)."""
        if self.allowed_hosts is None:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name not in self.allowed_hosts:
            raise ServeError(403, f"Host {host!r} is not served here")

    # endpoints

    def _search_get(self, query):
        params = dict(query)
        filters = Filters.from_query(query)
        k, against = parse_k(params.get("k")), parse_against(params.get("against"))
        if "id" in params:  # "more like this" by a stored row (no model work)
            vector = self.searcher.row_vector(params["id"], against)
        else:
            vector = self.searcher.embed_text(params.get("text", ""))
        self._json(self.searcher.search(vector, k, against, filters))

    def _search_post(self):
        body = self._body(1 << 20)
        try:
            request = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(400, f"the body is not JSON ({exc})") from None
        if not isinstance(request, dict):
            raise ServeError(400, "the body must be a JSON object")
        unknown = set(request) - {"text", "k", "against", "filters"}
        if unknown:
            raise ServeError(400, f"unknown fields {sorted(unknown)} (text, k, against, filters)")
        filters = Filters.from_json(request.get("filters"))
        k, against = parse_k(request.get("k")), parse_against(request.get("against"))
        vector = self.searcher.embed_text(request.get("text"))
        self._json(self.searcher.search(vector, k, against, filters))

    def _search_image(self, query):
        content_type = self.headers.get("Content-Type") or ""
        body = self._body(MAX_UPLOAD_BYTES)
        pairs = list(query)
        if content_type.lower().startswith("multipart/form-data"):
            fields = parse_multipart(body, content_type)
            if "image" not in fields:
                raise ServeError(400, "multipart upload without an 'image' field")
            data = fields.pop("image")[0]
            pairs += [(name, value.decode("utf-8", "replace")) for name, (value, filename)
                      in fields.items() if filename is None]
        else:
            data = body  # the image itself as the body (image/*, application/octet-stream)
        params = dict(pairs)
        filters = Filters.from_query(pairs)
        k, against = parse_k(params.get("k")), parse_against(params.get("against"))
        vector = self.searcher.embed_image(data)
        self._json(self.searcher.search(vector, k, against, filters))

    def _similar(self, row_id: str, query):
        params = dict(query)
        k, against = parse_k(params.get("k")), parse_against(params.get("against"))
        vector = self.searcher.row_vector(row_id, against)
        self._json(self.searcher.search(vector, k, against, Filters.from_query(query)))

    def _thumbnail(self, row_id: str, query):
        size = dict(query).get("size") or str(DEFAULT_THUMBNAIL_SIZE)
        if not size.isdigit() or int(size) not in THUMBNAIL_SIZES:
            raise ServeError(400, f"size: choose one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        data, etag = self.searcher.thumbnail(row_id, int(size))
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if etag in (self.headers.get("If-None-Match") or ""):
            return self._send(304, b"", None, headers)
        self._send(200, data, "image/jpeg", headers)

    def _static(self, name: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]+\.(html|js|css|svg|png)", name):
            raise ServeError(404, f"no such file: {name}")
        path = os.path.join(WEB_DIR, name)
        if not os.path.isfile(path):
            raise ServeError(404, f"no such file: {name}")
        with open(path, "rb") as f:
            data = f.read()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, data, ctype, {"Cache-Control": "no-cache"})

    # plumbing

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ServeError(411, "send a Content-Length")
        try:
            n = int(length)
        except ValueError:
            raise ServeError(400, "a bad Content-Length") from None
        if n > limit:
            raise ServeError(413, f"the body is {n} bytes, at most {limit} are taken")
        self._body_read = True
        return self.rfile.read(n)

    def _json(self, payload, status: int = 200):
        data = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._send(status, data, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _send(self, status: int, data: bytes, content_type: str | None, headers: dict):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                         "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and status != 304:
            self.wfile.write(data)

    def log_message(self, format, *args):
        if not self.quiet:
            # The path's query holds the user's search text; keep only the path in the log.
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def log_request(self, code="-", size="-"):
        if not self.quiet:
            path = self.path.split("?", 1)[0]
            sys.stderr.write(f"{self.address_string()} {self.command} {path} {code}\n")


def make_server(searcher: Searcher | None, host: str = "127.0.0.1", port: int = 8000,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server over `searcher` (or one set later on its RequestHandlerClass);
    call serve_forever() on it."""
    handler = type("BoundHandler", (Handler,), {
        "searcher": searcher,
        "allowed_hosts": set(_LOOPBACK_NAMES) if _is_loopback(host) else None,
        "quiet": quiet,
    })
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


# --------------------------------------------------------------------------------------- OpenAPI


def openapi_spec(searcher: Searcher) -> dict:
    """OpenAPI 3.1 for this server, with one filter parameter per filterable column of the table."""
    columns = searcher.columns()
    filter_params = []
    filter_props = {}
    for column in columns:
        schema = {"string": {"type": "string"}, "integer": {"type": "integer"},
                  "number": {"type": "number"}, "boolean": {"type": "boolean"}}[column["filter"]]
        if column.get("values"):
            schema = {**schema, "enum": column["values"]}
        filter_params.append({
            "name": f"filter.{column['name']}", "in": "query", "required": False,
            "description": f"Only rows whose `{column['name']}` ({column['type']}) equals this; "
                           "repeat the parameter for any of several values.",
            "schema": {"type": "array", "items": schema}, "style": "form", "explode": True,
        })
        if column["filter"] in ("integer", "number"):
            for op, word in (("min", "at least"), ("max", "at most")):
                filter_params.append({
                    "name": f"{op}.{column['name']}", "in": "query", "required": False,
                    "description": f"Only rows whose `{column['name']}` is {word} this.",
                    "schema": {"type": column["filter"]}})
        filter_props[column["name"]] = {"oneOf": [
            schema, {"type": "array", "items": schema},
            {"type": "object", "additionalProperties": False,
             "properties": {"eq": {"oneOf": [schema, {"type": "array", "items": schema}]},
                            **({"min": schema, "max": schema}
                               if column["filter"] in ("integer", "number") else {})}},
        ]}
    k = {"name": "k", "in": "query", "required": False, "description": "How many hits.",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K}}
    against = {"name": "against", "in": "query", "required": False,
               "description": "Which vectors to rank: the images' or the captions'.",
               "schema": {"type": "string", "enum": ["image", "text"], "default": "image"}}
    error = {"description": "A bad request (unknown filter column, a value of the wrong type, ...).",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    results = {"description": "Hits, best first.",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Results"}}}}
    not_found = {"description": "No such row.",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    row_id = {"name": "id", "in": "path", "required": True, "description": "The row's `id`.",
              "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "altclip serve",
            "version": "1",
            "description": (
                f"Search the LanceDB table '{searcher.table_name}' ({storage.redact(searcher.model.label)}, "
                f"{searcher.model.dim}-d, cosine) by text in any language or by image. Scores are "
                "cosine similarities. Filters are exact matches on the table's own columns (see "
                "/api/columns), applied before ranking."),
        },
        "paths": {
            "/api/info": {"get": {
                "summary": "The table and model served", "operationId": "info",
                "responses": {"200": {"description": "Table and model.", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Info"}}}}}}},
            "/api/columns": {"get": {
                "summary": "Filterable columns, their types, and the values of small string columns",
                "operationId": "columns",
                "responses": {"200": {"description": "Columns.", "content": {"application/json": {
                    "schema": {"type": "object", "required": ["columns"], "properties": {
                        "columns": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/Column"}}}}}}}}}},
            "/api/search": {
                "get": {
                    "summary": "Search by text (or by a stored row with `id`)",
                    "operationId": "searchText",
                    "parameters": [
                        {"name": "text", "in": "query", "required": False,
                         "description": "The query, in any language (required unless `id`).",
                         "schema": {"type": "string", "maxLength": MAX_TEXT_CHARS}},
                        {"name": "id", "in": "query", "required": False,
                         "description": "Search with this row's stored vector instead of a text.",
                         "schema": {"type": "string"}},
                        k, against, *filter_params],
                    "responses": {"200": results, "400": error, "404": not_found}},
                "post": {
                    "summary": "Search by text, the query as JSON",
                    "operationId": "searchTextJson",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SearchRequest"}}}},
                    "responses": {"200": results, "400": error}},
            },
            "/api/search/image": {"post": {
                "summary": "Search by an uploaded image",
                "operationId": "searchImage",
                "description": "Send the image as multipart/form-data (field `image`; other "
                               "fields as the query parameters) or as the raw body.",
                "parameters": [k, against, *filter_params],
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"},
                                       "k": {"type": "integer"},
                                       "against": {"type": "string", "enum": ["image", "text"]}},
                        "additionalProperties": {"type": "string"}}},
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                }},
                "responses": {"200": results, "400": error,
                              "413": {"description": f"Over {MAX_UPLOAD_BYTES} bytes."}}}},
            "/api/similar/{id}": {"get": {
                "summary": "Rows like a stored row (its own vector; no model work)",
                "operationId": "similar",
                "parameters": [row_id, k, against, *filter_params],
                "responses": {"200": results, "400": error, "404": not_found}}},
            "/api/thumbnail/{id}": {"get": {
                "summary": "A JPEG thumbnail of the row's image, read by the server",
                "operationId": "thumbnail",
                "parameters": [row_id, {
                    "name": "size", "in": "query", "required": False,
                    "description": "The longest side, in pixels.",
                    "schema": {"type": "integer", "enum": list(THUMBNAIL_SIZES),
                               "default": DEFAULT_THUMBNAIL_SIZE}}],
                "responses": {
                    "200": {"description": "The thumbnail.",
                            "content": {"image/jpeg": {"schema": {"type": "string",
                                                                  "format": "binary"}}}},
                    "304": {"description": "Not modified (ETag)."},
                    "400": error, "404": not_found,
                    "502": {"description": "The image could not be read or decoded.",
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}}}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
            "Info": {"type": "object", "properties": {
                "table": {"type": "string"}, "rows": {"type": "integer"},
                "version": {"type": "integer"}, "model": {"type": "string"},
                "dtype": {"type": "string"}, "dim": {"type": "integer"},
                "against": {"type": "array", "items": {"type": "string"}}}},
            "Column": {"type": "object", "required": ["name", "type", "kind", "filter"],
                       "properties": {
                           "name": {"type": "string"},
                           "type": {"type": "string", "description": "The Arrow type."},
                           "kind": {"type": "string", "enum": ["metadata", "contract"]},
                           "filter": {"type": "string",
                                      "enum": ["string", "integer", "number", "boolean"]},
                           "values": {"type": ["array", "null"],
                                      "description": f"Distinct values of a string column with "
                                                     f"at most {MAX_LISTED_VALUES}; null: more.",
                                      "items": {"type": "string"}},
                           "min": {"type": ["number", "null"]}, "max": {"type": ["number", "null"]},
                           "nulls": {"type": "integer"}}},
            "SearchRequest": {"type": "object", "required": ["text"], "additionalProperties": False,
                              "properties": {
                                  "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
                                  "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                                  "against": {"type": "string", "enum": ["image", "text"]},
                                  "filters": {"type": "object", "properties": filter_props,
                                              "additionalProperties": False}}},
            "Hit": {"type": "object", "required": ["id", "score", "thumbnail"], "properties": {
                "id": {"type": "string"},
                "score": {"type": "number", "description": "Cosine similarity."},
                "caption": {"type": ["string", "null"]},
                "image": {"type": ["string", "null"],
                          "description": "The stored image URI, redacted (information only)."},
                "width": {"type": ["integer", "null"]}, "height": {"type": ["integer", "null"]},
                "thumbnail": {"type": "string", "description": "Path of the row's thumbnail."},
                "metadata": {"type": "object"}}},
            "Results": {"type": "object", "required": ["hits", "count"], "properties": {
                "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
                "count": {"type": "integer"}, "k": {"type": "integer"},
                "against": {"type": "string"},
                "where": {"type": ["string", "null"],
                          "description": "The filter as applied (built from validated values)."},
                "search_ms": {"type": "number"}}},
        }},
    }
