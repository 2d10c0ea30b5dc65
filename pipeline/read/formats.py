"""Manifest files' formats: how CSV, JSON Lines and WebDataset samples become typed Arrow
columns, and how any column becomes the contract's text (ids, captions, image references)."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.read import webdataset
from schemas.manifest import CAPTION, ID, IMAGE_BYTES, INLINE_IMAGE_URI, INTERNAL_PREFIX, PARTITION


# CSV has no types: every column is read as bytes and turned into text per value, so a line in
# another encoding is that row's error, and a column that looks numeric for a million lines and
# then holds "n/a" costs nothing. Quoted values may span lines (captions do).
def csv_options(names: list[str] | None = None, include: list[str] | None = None, handler=None) -> dict:
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names or ()},
                                   include_columns=include, include_missing_columns=True,
                                   strings_can_be_null=False)
    return {"read_options": pacsv.ReadOptions(use_threads=False),
            "parse_options": pacsv.ParseOptions(newlines_in_values=True,
                                                invalid_row_handler=handler or _skip_line),
            "convert_options": convert}


def _skip_line(row) -> str:
    return "skip"  # the scan before any work refuses files with such lines, naming them


def csv_schema(f) -> pa.Schema:
    names = pacsv.open_csv(f, **csv_options()).schema.names
    return pa.schema([pa.field(n, pa.binary()) for n in names])


# JSON Lines are parsed here, line by line, not by Arrow's reader: it fails a whole file when a
# field's type changes between lines ("changed from number to string in row 1").
JSON_SAMPLE_LINES = 1000


def json_lines(data: bytes):
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


def json_schema(f) -> pa.Schema:
    """Field names in first-seen order, types inferred from the first lines of the first file;
    fields whose values disagree on a type are text (numbers in them as JSON writes them)."""
    samples: dict[str, list] = {}
    head = f.read(64 << 20)
    for n, (_, row) in enumerate(json_lines(head)):
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
    rows = [row for _, row in json_lines(data) if isinstance(row, dict)]
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


# WebDataset (img2dataset's layout, see pipeline/read/webdataset.py): per key, an image, a `.txt`
# caption, a `.json` of metadata whose fields become metadata columns.
_WEBDATASET_OWN_FIELDS = {"key", "caption"}  # also in `.json`, already columns of their own
# The metadata fields are those of the first `.json` member that is a JSON object, and captions
# are there if a `.txt` member is, looked for in this many samples at most.
WEBDATASET_SCHEMA_SAMPLES = 100


def _json_object(data: bytes | None) -> dict | None:
    """A `.json` member's object; None for no member, or one that is not a JSON object."""
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def webdataset_schema(f) -> pa.Schema:
    """The flattened schema of a shard: key, image, the first sample's metadata, and a caption
    where its first samples have `.txt` members (a peer's image-only shards have none: their
    rows are images, not rows of empty captions)."""
    metadata, keys, captioned = None, set(), False
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            key, suffix = webdataset.split_name(member.name)
            if not member.isreg() or key is None:
                continue
            keys.add(key)
            if len(keys) > WEBDATASET_SCHEMA_SAMPLES:
                break
            captioned = captioned or suffix == webdataset.CAPTION_SUFFIX
            if suffix == webdataset.METADATA_SUFFIX and metadata is None:
                metadata = _json_object(tar.extractfile(member).read())
            if metadata is not None and captioned:
                break
    fields = [pa.field(ID, pa.string()), pa.field(IMAGE_BYTES, pa.binary())]
    if captioned:
        fields.append(pa.field(CAPTION, pa.string()))
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
    metadata = [_json_object(m) or {} for m in batch.column(webdataset.METADATA_SUFFIX).to_pylist()]
    columns = {ID: batch.column(ID), IMAGE_BYTES: batch.column(IMAGE_BYTES)}
    if CAPTION in schema.names:
        columns[CAPTION] = pa.array([None if t is None else t.decode("utf-8", errors="replace")
                                     for t in batch.column(webdataset.CAPTION_SUFFIX).to_pylist()], pa.string())
    for field in schema:
        if field.name not in columns:
            columns[field.name] = _typed_values([m.get(field.name) for m in metadata], field.type)
    columns[INLINE_IMAGE_URI] = batch.column(INLINE_IMAGE_URI)
    if PARTITION in batch.column_names:
        columns[PARTITION] = batch.column(PARTITION)
    return pa.table(columns)


def is_binary(kind: pa.DataType) -> bool:
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
    if is_binary(kind):
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
    if is_binary(kind):
        texts = []
        for v in values:
            try:
                texts.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("0x" + v.hex())
        return pa.array(texts, pa.string())
    return pa.array([None if v is None else json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)
                     for v in values], pa.string())


def metadata_values(column, kind: pa.DataType) -> pa.Array:
    """A metadata column in its output type (that of the manifest's first file); values of
    another type in later files or lines are converted where they can be, else null."""
    column = _plain(column)
    if column.type == kind:
        return column
    if pa.types.is_string(kind) and is_binary(column.type):  # CSV
        return pa.array([None if v is None else v.decode("utf-8", "replace") for v in column.to_pylist()],
                        pa.string())
    try:
        return column.cast(kind)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return _typed_values(column.to_pylist(), kind)
