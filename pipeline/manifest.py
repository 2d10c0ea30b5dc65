"""Read and validate a manifest: find its files, check its columns, stream its rows."""

from __future__ import annotations

import glob as globlib
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage, webdataset
from pipeline.config import ConfigError, EmbedConfig
from schemas.embeddings import IMAGE_ERROR, TEXT_ERROR, error, is_reserved
from schemas.manifest import (CAPTION, FORMATS_BY_SUFFIX, ID, IMAGE, IMAGE_BYTES, INLINE_IMAGE,
                              INLINE_IMAGE_URI, INTERNAL_PREFIX)

# A metadata column whose name an output column already has is kept under this prefix.
RENAMED_METADATA_PREFIX = "manifest_"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where its files are and how its columns map onto the contract."""

    uri: str
    files: tuple[str, ...]  # paths inside `fs`
    format: str  # parquet | csv | json
    root: str  # URI that relative image paths are resolved against
    id_col: str
    image_col: str | None  # the manifest's column holding image URIs or inline bytes
    image_is_bytes: bool
    caption_col: str | None
    metadata_fields: tuple[pa.Field, ...]  # as they appear in the output
    metadata_sources: tuple[str, ...]  # the manifest column behind each metadata field
    schema: pa.Schema  # of the manifest's first file, as read
    storage_options: dict

    def filesystem(self):
        return storage.filesystem(self.uri, self.storage_options)[0]


def open_manifest(config: EmbedConfig) -> Manifest:
    """Find the manifest's files and check its columns against the options, before any work."""
    fs, path = storage.filesystem(config.manifest, config.storage_options)
    try:
        files, root = _list_files(fs, path, config.manifest)
    except ConfigError:
        raise
    except Exception as exc:  # unreachable endpoint, no such bucket, access denied, ...
        raise ConfigError(
            f"cannot list manifest {storage.redact(config.manifest)}: {storage.describe(exc)}"
        ) from None
    formats = {FORMATS_BY_SUFFIX[_suffix(f)] for f in files}
    if len(formats) > 1:
        raise ConfigError(
            f"manifest {config.manifest} mixes formats ({', '.join(sorted(formats))}): "
            "point it at files of one format"
        )
    fmt = formats.pop()
    try:
        schema = _read_schema(fs, files[0], fmt)
    except Exception as exc:  # any reader error means the same thing to the user
        raise ConfigError(f"cannot read manifest file {files[0]} as {fmt}: {exc}") from exc
    return _map_columns(config, schema, files, fmt, storage.unstrip(fs, root))


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def expand_braces(pattern: str) -> list[str]:
    """Shard patterns as WebDataset writes them: `{00000..00099}` (zero-padded) and `{a,b}`."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [p for choice in choices for p in expand_braces(head + choice + tail)]


def _list_files(fs, path: str, uri: str) -> tuple[list[str], str]:
    if "{" in path:
        files = expand_braces(path)
        missing = [f for f in files if not fs.exists(f)]
        if missing:
            raise ConfigError(
                f"manifest {uri}: {len(missing)} of {len(files)} shards do not exist, "
                f"e.g. {storage.unstrip(fs, missing[0])}"
            )
        root = posixpath.dirname(path.split("{")[0])
    elif globlib.has_magic(path):
        files = sorted(fs.glob(path))
        root = path.split("*")[0].split("?")[0].split("[")[0]
        root = root if root.endswith("/") else posixpath.dirname(root)
    elif fs.isdir(path):
        files = sorted(fs.find(path))
        root = path
    elif fs.exists(path):
        if _suffix(path) not in FORMATS_BY_SUFFIX:
            raise ConfigError(
                f"manifest {uri}: unknown format {_suffix(path) or '(no suffix)'}; "
                f"name it with one of {', '.join(sorted(FORMATS_BY_SUFFIX))}"
            )
        return [path], posixpath.dirname(path)
    else:
        raise ConfigError(f"manifest {uri} does not exist: check the path")
    # Hidden and underscore files are markers (_SUCCESS, .crc), not data.
    files = [
        f
        for f in files
        if _suffix(f) in FORMATS_BY_SUFFIX and not posixpath.basename(f).startswith(("_", "."))
    ]
    if not files:
        raise ConfigError(
            f"manifest {uri} holds no {', '.join(sorted(FORMATS_BY_SUFFIX))} files: check the path"
        )
    return files, root.rstrip("/")


def _read_schema(fs, path: str, fmt: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            return pq.read_schema(f)
        if fmt == "csv":
            return _csv_schema(f)
        if fmt == "webdataset":
            return _webdataset_schema(f)
        return _json_schema(f)


# CSV has no types: every column is read as bytes and turned into text per value, so a line in
# another encoding is that row's error, and a column that looks numeric for a million lines and
# then holds "n/a" costs nothing. Quoted values may span lines (captions do).
def _csv_options(names: list[str] | None = None, include: list[str] | None = None, handler=None) -> dict:
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names or ()},
                                   include_columns=include, include_missing_columns=True,
                                   strings_can_be_null=False)
    return {"read_options": pacsv.ReadOptions(use_threads=False),
            "parse_options": pacsv.ParseOptions(newlines_in_values=True,
                                                invalid_row_handler=handler or _skip_line),
            "convert_options": convert}


def _skip_line(row) -> str:
    return "skip"  # the scan before any work refuses files with such lines, naming them


def _csv_schema(f) -> pa.Schema:
    names = pacsv.open_csv(f, **_csv_options()).schema.names
    return pa.schema([pa.field(n, pa.binary()) for n in names])


# JSON Lines are parsed here, line by line, not by Arrow's reader: it fails a whole file when a
# field's type changes between lines ("changed from number to string in row 1").
JSON_SAMPLE_LINES = 1000


def _json_lines(data: bytes):
    """(line number, parsed object or the reason it is not one) per non-blank line."""
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            # Bytes that are not UTF-8 stay recoverable (surrogate escapes) and fail their value.
            value = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError as exc:
            yield number, f"not JSON ({exc})"
            continue
        yield number, value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _json_schema(f) -> pa.Schema:
    """Field names in first-seen order, types inferred from the first lines of the first file;
    fields whose values disagree on a type are text (numbers in them as JSON writes them)."""
    samples: dict[str, list] = {}
    head = f.read(64 << 20)
    for n, (_, row) in enumerate(_json_lines(head)):
        if n >= JSON_SAMPLE_LINES:
            break
        if isinstance(row, dict):
            for name, value in row.items():
                samples.setdefault(name, []).append(value)
    fields = []
    for name, values in samples.items():
        try:
            kind = pa.array([v for v in values if v is not None]).type
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            kind = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def parse_json_lines(data: bytes, schema: pa.Schema, text_fields: tuple[str, ...],
                     id_field: str | None = None) -> pa.Table:
    """One file's lines as rows of `schema`. Fields in `text_fields` (image, caption) hold text:
    strings as they are, numbers and booleans as JSON writes them; values that are not text
    (lists, objects, strings that are not valid Unicode) are null there and explained in
    `__altclip_invalid_<field>`, for the row's error. The id field keeps every value, as text
    (see id_text). A metadata value that does not fit its field's type is null. Lines that are
    not JSON objects are skipped (the scan before any work refuses them, naming the line)."""
    rows = [row for _, row in _json_lines(data) if isinstance(row, dict)]
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if field.name == id_field:
            columns[field.name] = pa.array([_json_id(v) for v in values], pa.string())
        elif field.name in text_fields:
            texts, invalid = zip(*[_json_text(v) for v in values]) if values else ((), ())
            columns[field.name] = pa.array(texts, pa.string())
            columns[INTERNAL_PREFIX + "invalid_" + field.name] = pa.array(invalid, pa.string())
        else:
            columns[field.name] = _typed_values(values, field.type)
    return pa.table(columns)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _json_text(value) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return (value, None) if _is_unicode(value) else (None, "not UTF-8 text (an invalid byte or a lone surrogate)")
    if isinstance(value, (bool, int, float)):
        return json.dumps(value), None
    return None, f"a JSON {'list' if isinstance(value, list) else 'object'}, not text"


def _json_id(value) -> str | None:
    """An id from JSON as text, as id_text makes it from any other format."""
    if value is None or (isinstance(value, str) and _is_unicode(value)):
        return value
    if isinstance(value, str):
        try:  # bytes that were not UTF-8 (kept as surrogate escapes): their hex, as for binary ids
            return "0x" + value.encode("utf-8", "surrogateescape").hex()
        except UnicodeEncodeError:  # a lone surrogate from a `\ud800` escape
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _typed_values(values: list, kind: pa.DataType) -> pa.Array:
    if pa.types.is_string(kind):  # a field of mixed types is text: other values as JSON writes them
        values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
                  for v in values]
    try:
        return pa.array(values, kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
        out = []
        for v in values:
            try:
                out.append(pa.scalar(v, kind).as_py())
            except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeEncodeError):
                out.append(None)
        return pa.array(out, kind)


# WebDataset (img2dataset's layout, see pipeline/webdataset.py): per key, an image, a `.txt`
# caption, a `.json` of metadata whose fields become metadata columns.
_WEBDATASET_OWN_FIELDS = {"key", "caption"}  # also in `.json`, already columns of their own
# The metadata fields are those of the first `.json` member that is a JSON object, looked for
# in this many samples at most.
WEBDATASET_SCHEMA_SAMPLES = 100


def _json_object(data: bytes | None) -> dict | None:
    """A `.json` member's object; None for no member, or one that is not a JSON object."""
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _webdataset_schema(f) -> pa.Schema:
    """The flattened schema of a shard: key, image, caption and the first sample's metadata."""
    metadata, keys = None, set()
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            key, suffix = webdataset.split_name(member.name)
            if not member.isreg() or key is None:
                continue
            keys.add(key)
            if len(keys) > WEBDATASET_SCHEMA_SAMPLES:
                break
            if suffix == webdataset.METADATA_SUFFIX:
                metadata = _json_object(tar.extractfile(member).read())
                if metadata is not None:
                    break
    fields = [pa.field(ID, pa.string()), pa.field(IMAGE_BYTES, pa.binary()),
              pa.field(CAPTION, pa.string())]
    for name, value in (metadata or {}).items():
        if name not in _WEBDATASET_OWN_FIELDS:
            try:
                kind = pa.array([value]).type
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                kind = pa.string()
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def flatten_webdataset(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Samples as webdataset.sample_table gives them -> one column per manifest field, and the
    URI of each image's member. A `.json` that is not a JSON object, or a value that does not
    fit its field's type, leaves that metadata null."""
    captions = [None if t is None else t.decode("utf-8", errors="replace")
                for t in batch.column(webdataset.CAPTION_SUFFIX).to_pylist()]
    metadata = [_json_object(m) or {} for m in batch.column(webdataset.METADATA_SUFFIX).to_pylist()]
    columns = {ID: batch.column(ID), IMAGE_BYTES: batch.column(IMAGE_BYTES),
               CAPTION: pa.array(captions, pa.string())}
    for field in schema:
        if field.name not in columns:
            columns[field.name] = _typed_values([m.get(field.name) for m in metadata], field.type)
    columns[INLINE_IMAGE_URI] = batch.column(INLINE_IMAGE_URI)
    return pa.table(columns)


def _map_columns(config: EmbedConfig, schema: pa.Schema, files, fmt: str, root: str) -> Manifest:
    names = schema.names
    listing = ", ".join(names)

    def require(option: str, column: str) -> str:
        if column not in names:
            raise ConfigError(
                f"{option} {column}: the manifest has no such column (its columns: {listing})"
            )
        return column

    if config.id_col not in names:
        raise ConfigError(
            f"the manifest has no '{config.id_col}' column (its columns: {listing}); "
            "name the column that identifies each row with --id-col"
        )
    if config.image_col is not None:
        image_col = require("--image-col", config.image_col)
    else:
        image_col = next((c for c in (IMAGE, IMAGE_BYTES) if c in names), None)
    if image_col is None and "image" in config.towers:
        raise ConfigError(
            f"the manifest has no '{IMAGE}' or '{IMAGE_BYTES}' column (its columns: {listing}); "
            "name it with --image-col, or embed captions only with --towers text"
        )
    # CSV reads every column as bytes (see _csv_options): its image column holds references.
    image_is_bytes = image_col is not None and fmt != "csv" and _is_binary(schema.field(image_col).type)
    if config.caption_col is not None:
        caption_col = require("--caption-col", config.caption_col)
    else:
        caption_col = CAPTION if CAPTION in names else None
    if caption_col is None and "text" in config.towers:
        raise ConfigError(
            f"the manifest has no '{CAPTION}' column (its columns: {listing}); "
            "name it with --caption-col, or embed images only with --towers image"
        )

    used = {config.id_col, image_col, caption_col}
    names_out = {n for n in names if n not in used}
    fields, sources = [], []
    for f in schema:
        if f.name in used:
            continue
        name = f.name
        # `width` beside `manifest_width` becomes `manifest_manifest_width`: every name stays.
        while name != f.name and name in names_out or is_reserved(name):
            name = RENAMED_METADATA_PREFIX + name
        names_out.add(name)
        # CSV values are read as bytes (see _csv_options) and kept as text.
        kind = pa.string() if fmt == "csv" else f.type
        fields.append(pa.field(name, kind))
        sources.append(f.name)
    return Manifest(
        uri=config.manifest,
        files=tuple(files),
        format=fmt,
        root=root,
        id_col=config.id_col,
        image_col=image_col,
        image_is_bytes=image_is_bytes,
        caption_col=caption_col,
        metadata_fields=tuple(fields),
        metadata_sources=tuple(sources),
        schema=schema,
        storage_options=dict(config.storage_options),
    )


def read_manifest(manifest: Manifest, num_cpus: float = 1.0,
                  shards: tuple[webdataset.ShardPlan, ...] | None = None):
    """The manifest's rows as a Ray Dataset, streamed from its files by tasks that each reserve
    `num_cpus`. WebDataset shards are read as `shards` (one plan per file, from scan_ids) says:
    without plans, every sample is read and a key whose members are not adjacent gives a row
    per run of them."""
    import ray.data

    source_fs = manifest.filesystem()
    fs = storage.arrow_filesystem(source_fs)
    files = list(manifest.files)
    task = {"num_cpus": num_cpus}
    if manifest.format == "parquet":
        return ray.data.read_parquet(files, filesystem=fs, **task)
    if manifest.format == "csv":
        return ray.data.read_csv(files, filesystem=fs, **task, **_csv_options(manifest.schema.names))
    if manifest.format == "webdataset":
        shards = shards or tuple(webdataset.ShardPlan(storage.unstrip(source_fs, f)) for f in files)
        source = webdataset.WebDatasetShardsDatasource(files, dict(zip(files, shards)), filesystem=fs)
        return ray.data.read_datasource(source, **task).map_batches(
            flatten_webdataset, fn_kwargs={"schema": manifest.schema}, batch_format="pyarrow",
            num_cpus=num_cpus)
    return ray.data.read_binary_files(files, filesystem=fs, **task).map_batches(
        _parse_json_files, fn_kwargs={"manifest": manifest}, batch_format="pyarrow", batch_size=1,
        num_cpus=num_cpus)


def _parse_json(data: bytes, manifest: Manifest) -> pa.Table:
    text_fields = tuple(c for c in (manifest.image_col, manifest.caption_col) if c)
    return parse_json_lines(data, manifest.schema, text_fields, manifest.id_col)


def _parse_json_files(batch: pa.Table, manifest: Manifest) -> pa.Table:
    tables = [_parse_json(data, manifest) for data in batch.column("bytes").to_pylist()]
    return pa.concat_tables(tables) if tables else pa.table({})


def to_contract_columns(batch: pa.Table, manifest: Manifest) -> pa.Table:
    """A batch of manifest rows in the contract's columns: ids, captions and image references as
    text, relative image paths as URIs, metadata in its output type. A value that cannot be what
    its column means (a list as a caption, bytes that are not UTF-8) is that row's error."""
    n = batch.num_rows
    columns = {ID: id_text(batch.column(manifest.id_col))}
    images = pa.nulls(n, pa.string())
    image_bytes = pa.nulls(n, pa.binary())
    image_errors: list[str | None] = [None] * n
    if manifest.image_col is not None:
        source = batch.column(manifest.image_col)
        if manifest.image_is_bytes and _is_binary(source.type):
            image_bytes = pc.cast(source, pa.binary())
            if INLINE_IMAGE_URI in batch.column_names:  # the bytes' own URI (a shard's member)
                images = pc.cast(batch.column(INLINE_IMAGE_URI), pa.string())
        else:
            texts, invalid = value_text(source, "image")
            invalid = _merge_invalid(invalid, batch, manifest.image_col)
            uris = []
            for i, text in enumerate(texts):
                try:
                    uris.append(None if text is None else storage.resolve(text, manifest.root))
                except Exception as exc:  # a reference no path can be made of
                    uris.append(None)
                    invalid[i] = invalid[i] or f"{type(exc).__name__}: {exc}"
            images = pa.array(uris, pa.string())
            image_errors = [None if why is None else error("no_image", why) for why in invalid]
    columns[IMAGE] = images
    columns[INLINE_IMAGE] = image_bytes
    captions, caption_errors = pa.nulls(n, pa.string()), [None] * n
    if manifest.caption_col is not None:
        texts, invalid = value_text(batch.column(manifest.caption_col), "caption")
        invalid = _merge_invalid(invalid, batch, manifest.caption_col)
        captions = pa.array(texts, pa.string())
        caption_errors = [None if why is None else error("invalid_caption", why) for why in invalid]
    columns[CAPTION] = captions
    for field, source in zip(manifest.metadata_fields, manifest.metadata_sources):
        if source in batch.column_names:
            columns[field.name] = _metadata(batch.column(source), field.type)
        else:  # a file of a folder manifest without this column
            columns[field.name] = pa.nulls(n, field.type)
    # Errors found here; the decode and tokenize stages add theirs to rows that have none.
    columns[IMAGE_ERROR] = pa.array(image_errors, pa.string())
    columns[TEXT_ERROR] = pa.array(caption_errors, pa.string())
    return pa.table(columns)


def _merge_invalid(invalid: list[str | None], batch: pa.Table, column: str) -> list[str | None]:
    """Reasons a reader already noted (JSON values that are not text) join the converter's."""
    noted = INTERNAL_PREFIX + "invalid_" + column
    if noted not in batch.column_names:
        return invalid
    return [a or b for a, b in zip(invalid, batch.column(noted).to_pylist())]


def _is_binary(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_fixed_size_binary(kind) or pa.types.is_binary_view(kind))


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_scalar(kind: pa.DataType) -> bool:
    return (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind) or pa.types.is_temporal(kind))


def _plain(column) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def value_text(column, meaning: str) -> tuple[list[str | None], list[str | None]]:
    """A column of captions or image references as text, and why a value is not text: strings
    stay, numbers, booleans and dates take their usual text, bytes must be UTF-8; lists,
    structs and maps are not text."""
    column = _plain(column)
    n = len(column)
    kind = column.type
    if _is_text(kind) or pa.types.is_null(kind):
        return pc.cast(column, pa.string()).to_pylist(), [None] * n
    if _is_scalar(kind):
        return pc.cast(column, pa.string()).to_pylist(), [None] * n
    if _is_binary(kind):
        texts, invalid = [], []
        for value in column.to_pylist():
            try:
                texts.append(None if value is None else value.decode("utf-8"))
                invalid.append(None)
            except UnicodeDecodeError as exc:
                texts.append(None)
                invalid.append(f"the {meaning} is not UTF-8 text (byte 0x{value[exc.start]:02x} "
                               f"at {exc.start})")
        return texts, invalid
    why = f"the {meaning} is a {kind}, not text"
    valid = column.is_valid().to_pylist()
    return [None] * n, [why if ok else None for ok in valid]


def id_text(column) -> pa.Array:
    """Any id column as text, one way everywhere (scan, select, rows): strings stay; numbers,
    booleans and dates take their usual text; bytes their UTF-8 text, or `0x` and their hex
    when they are not UTF-8; lists, structs and maps their JSON."""
    column = _plain(column)
    kind = column.type
    if _is_text(kind) or _is_scalar(kind) or pa.types.is_null(kind):
        return pc.cast(column, pa.string())
    values = column.to_pylist()
    if _is_binary(kind):
        texts = []
        for v in values:
            try:
                texts.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("0x" + v.hex())
        return pa.array(texts, pa.string())
    return pa.array([None if v is None else json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)
                     for v in values], pa.string())


def _metadata(column, kind: pa.DataType) -> pa.Array:
    """A metadata column in its output type (that of the manifest's first file); values of
    another type in later files or lines are converted where they can be, else null."""
    column = _plain(column)
    if column.type == kind:
        return column
    if pa.types.is_string(kind) and _is_binary(column.type):  # CSV
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in column.to_pylist()],
                        pa.string())
    try:
        return column.cast(kind)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return _typed_values(column.to_pylist(), kind)


@dataclass(frozen=True)
class IdScan:
    """The manifest's ids, read before any work: row count, rejects and duplicates."""

    rows: int
    ids: pa.Array | None  # every valid id once (string)
    missing_ids: int  # rows whose id is null or empty: rejected
    duplicate_rows: int  # rows whose id an earlier row already has: rejected
    duplicated_ids: pa.Array  # ids that more than one row has
    first_of_duplicates: pa.Table | None  # the first row of each duplicated id, manifest columns
    # WebDataset: how to read each shard (in the manifest's order of files). Its read leaves out
    # the later copies of a repeated id itself: no row is read twice, none is held in the driver.
    shards: tuple[webdataset.ShardPlan, ...] | None = None

    @property
    def held_back(self) -> pa.Array:
        """Ids whose every row select_rows is to drop from the read: a table's repeated ids,
        whose first rows join the stream again from first_of_duplicates (none for WebDataset,
        whose shards' plans leave out the later copies only)."""
        return self.duplicated_ids if self.shards is None else pa.array([], pa.string())

    def pending(self, done: pa.Array) -> int | None:
        """How many ids are not done yet (None: unknown)."""
        if self.ids is None:
            return None
        return int(pc.sum(pc.invert(pc.is_in(self.ids, value_set=done))).as_py() or 0)


def scan_ids(manifest: Manifest) -> IdScan:
    """Read only the ids (in manifest order: files as listed, rows in file order) to count rows
    and find bad and repeated ids; of the rows sharing an id the first wins.

    A CSV or JSON line that cannot be read as a row, or a shard that cannot be read as a tar,
    fails the job here, before any work, with a message naming the file (and line). WebDataset
    keys are unique within a shard only (img2dataset numbers each run's samples from 0): shards
    that reuse keys repeat them. Only the shards' member headers are read here (in Ray tasks),
    and their `.json` members where the id is a metadata field.
    """
    fs = manifest.filesystem()
    scattered = None
    if manifest.format == "webdataset":
        per_file, scattered = _shard_ids(manifest)
    else:
        per_file = [_file_ids(manifest, fs, path) for path in manifest.files]
    ids = pa.concat_arrays(per_file) if per_file else pa.array([], pa.string())
    valid = pc.fill_null(pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), "")), False)
    good = ids.filter(valid)
    counts = pc.value_counts(good)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    duplicated = repeated.field("values")
    firsts, laters = [], []
    if len(duplicated):
        is_repeated = pc.fill_null(pc.is_in(ids, value_set=duplicated), False)
        positions = pc.indices_nonzero(is_repeated).to_pylist()
        seen = set()
        for position, row_id in zip(positions, ids.take(positions).to_pylist()):
            (laters if row_id in seen else firsts).append(position)
            seen.add(row_id)
    sizes = [len(file_ids) for file_ids in per_file]
    first_rows, shards = None, None
    if scattered is not None:
        shards = tuple(webdataset.ShardPlan(storage.unstrip(fs, path), frozenset(skipped), keys)
                       for path, skipped, keys in zip(manifest.files, _per_file(laters, sizes), scattered))
    elif firsts:
        # The first row of each repeated id, read again whole from its file.
        parts = [_file_rows(manifest, fs, path).take(local)
                 for path, local in zip(manifest.files, _per_file(firsts, sizes)) if local]
        first_rows = pa.concat_tables(parts, promote_options="default")
    return IdScan(
        rows=len(ids),
        ids=pc.unique(good),
        missing_ids=len(ids) - len(good),
        duplicate_rows=int(pc.sum(repeated.field("counts")).as_py() or 0) - len(duplicated),
        duplicated_ids=duplicated,
        first_of_duplicates=first_rows,
        shards=shards,
    )


def _per_file(positions: list[int], sizes: list[int]) -> list[list[int]]:
    """Ascending positions in the manifest -> positions within each file (files of `sizes` rows)."""
    out, start, n = [], 0, 0
    for size in sizes:
        local = []
        while n < len(positions) and positions[n] < start + size:
            local.append(positions[n] - start)
            n += 1
        out.append(local)
        start += size
    return out


# Each shard's scan is a Ray task reserving this much CPU: it waits on storage (as
# plan.READ_CPUS for the reads of the job).
SHARD_SCAN_CPUS = 0.25


def _shard_ids(manifest: Manifest) -> tuple[list[pa.Array], list[frozenset[str]]]:
    """Each shard's ids in reading order, and its keys whose members are not adjacent."""
    import ray

    scan = ray.remote(_one_shard_ids).options(num_cpus=SHARD_SCAN_CPUS)
    results = ray.get([scan.remote(manifest, path) for path in manifest.files])
    failed = next((r for r in results if isinstance(r, str)), None)
    if failed is not None:
        raise ConfigError(failed)
    return [ids for ids, _ in results], [keys for _, keys in results]


def _one_shard_ids(manifest: Manifest, path: str) -> tuple[pa.Array, frozenset[str]] | str:
    """One shard's ids and scattered keys, or why it cannot be read (a message)."""
    fs = manifest.filesystem()
    shown = storage.unstrip(fs, path)
    read = () if manifest.id_col == ID else (webdataset.METADATA_SUFFIX,)
    try:
        with fs.open(path, "rb") as f:
            index = webdataset.index_shard(f, read)
    except Exception as exc:  # a damaged or truncated tar, an unreadable object: say which
        return f"cannot read manifest shard {shown} as a tar: {storage.describe(exc)}"
    # The ids as the job's read makes them (a metadata field's as flatten_webdataset types it).
    rows = flatten_webdataset(webdataset.sample_table(index.samples, shown), manifest.schema)
    return id_text(rows.column(manifest.id_col)), index.scattered


def _file_ids(manifest: Manifest, fs, path: str) -> pa.Array:
    """One file's ids as text, in order."""
    shown = storage.unstrip(fs, path)
    try:
        with fs.open(path, "rb") as f:
            if manifest.format == "parquet":
                parquet = pq.ParquetFile(f)
                if manifest.id_col not in parquet.schema_arrow.names:
                    return pa.nulls(parquet.metadata.num_rows, pa.string())
                return id_text(parquet.read(columns=[manifest.id_col]).column(0))
            if manifest.format == "csv":
                bad = []
                table = pacsv.read_csv(f, **_csv_options(manifest.schema.names, [manifest.id_col],
                                                         lambda row: bad.append(row) or "skip"))
                if bad:
                    row = bad[0]
                    raise ConfigError(
                        f"manifest {shown}, line {row.number}: expected {row.expected_columns} "
                        f"fields, found {row.actual_columns} ({row.text[:80]!r}); fix or remove the "
                        f"line{f' (and {len(bad) - 1} more like it)' if len(bad) > 1 else ''}")
                return id_text(table.column(0))
            data = f.read()
    except ConfigError:
        raise
    except Exception as exc:  # a damaged file: say which
        raise ConfigError(f"cannot read manifest file {shown}: {storage.describe(exc)}") from None
    bad = [(number, why) for number, why in _json_lines(data) if isinstance(why, str)]
    if bad:
        number, why = bad[0]
        more = f" (and {len(bad) - 1} more like it)" if len(bad) > 1 else ""
        raise ConfigError(f"manifest {shown}, line {number}: {why}; fix or remove the line{more}")
    return id_text(_parse_json(data, manifest).column(manifest.id_col))


def _file_rows(manifest: Manifest, fs, path: str) -> pa.Table:
    """One file's rows as read_manifest yields them."""
    with fs.open(path, "rb") as f:
        if manifest.format == "parquet":
            return pq.read_table(f)
        if manifest.format == "csv":
            return pacsv.read_csv(f, **_csv_options(manifest.schema.names))
        return _parse_json(f.read(), manifest)


def select_rows(batch: pa.Table, id_col: str, excluded: pa.Array,
                included: pa.Array | None = None) -> pa.Table:
    """Ray Data stage: drop rows without an id, rows whose id is excluded (done, duplicated)
    and, when `included` is given, rows whose id is not in it (the rows to retry)."""
    ids = id_text(batch.column(id_col))
    keep = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    if len(excluded):
        keep = pc.and_(keep, pc.invert(pc.is_in(ids, value_set=excluded)))
    if included is not None:
        keep = pc.and_(keep, pc.is_in(ids, value_set=included))
    return batch.filter(pc.fill_null(keep, False))
