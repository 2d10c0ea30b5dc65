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
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, EmbedConfig
from schemas.embeddings import contract_column_names
from schemas.manifest import CAPTION, FORMATS_BY_SUFFIX, ID, IMAGE, IMAGE_BYTES

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
            return pacsv.open_csv(f).schema
        if fmt == "webdataset":
            return _webdataset_schema(f)
        return pajson.open_json(f).schema


# WebDataset (img2dataset's layout): per key, an image file, a `.txt` caption, a `.json` of metadata.
WEBDATASET_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_WEBDATASET_OWN_FIELDS = {"key", "caption"}  # also in `.json`, already columns of their own


def _webdataset_schema(f) -> pa.Schema:
    """The flattened schema of a shard, from its first sample's files."""
    sample, key = {}, None
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name, _, suffix = posixpath.basename(member.name).partition(".")
            if key is not None and name != key:
                break
            key = name
            sample[suffix.lower()] = tar.extractfile(member).read()
    fields = [pa.field(ID, pa.string()), pa.field(IMAGE_BYTES, pa.binary()),
              pa.field(CAPTION, pa.string())]
    for name, value in json.loads(sample.get("json") or b"{}").items():
        if name not in _WEBDATASET_OWN_FIELDS:
            kind = pa.array([value]).type
            fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def flatten_webdataset(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Ray's WebDataset rows (a column per file suffix) -> one column per manifest field."""
    n = batch.num_rows
    images = [None] * n
    for suffix in WEBDATASET_IMAGE_SUFFIXES:
        if suffix in batch.column_names:
            for i, data in enumerate(batch.column(suffix).to_pylist()):
                images[i] = images[i] if images[i] is not None else data
    captions = (
        [None if t is None else t.decode("utf-8", errors="replace") for t in batch.column("txt").to_pylist()]
        if "txt" in batch.column_names else [None] * n
    )
    metadata = [json.loads(m) if m else {} for m in
                (batch.column("json").to_pylist() if "json" in batch.column_names else [None] * n)]
    columns = {ID: pc.cast(batch.column("__key__"), pa.string()),
               IMAGE_BYTES: pa.array(images, pa.binary()), CAPTION: pa.array(captions, pa.string())}
    for field in schema:
        if field.name not in columns:
            columns[field.name] = pa.array([m.get(field.name) for m in metadata]).cast(field.type)
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
    image_is_bytes = image_col is not None and (
        pa.types.is_binary(schema.field(image_col).type)
        or pa.types.is_large_binary(schema.field(image_col).type)
    )
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
    taken = contract_column_names()
    fields, sources = [], []
    for f in schema:
        if f.name in used:
            continue
        name = RENAMED_METADATA_PREFIX + f.name if f.name in taken else f.name
        fields.append(pa.field(name, f.type))
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


def read_manifest(manifest: Manifest):
    """The manifest's rows as a Ray Dataset, streamed from its files."""
    import ray.data

    fs = storage.arrow_filesystem(manifest.filesystem())
    files = list(manifest.files)
    if manifest.format == "parquet":
        return ray.data.read_parquet(files, filesystem=fs)
    if manifest.format == "csv":
        return ray.data.read_csv(files, filesystem=fs)
    if manifest.format == "webdataset":
        return ray.data.read_webdataset(files, filesystem=fs, decoder=None).map_batches(
            flatten_webdataset, fn_kwargs={"schema": manifest.schema}, batch_format="pyarrow"
        )
    return ray.data.read_json(files, filesystem=fs)


def to_contract_columns(batch: pa.Table, manifest: Manifest) -> pa.Table:
    """Rename a batch of manifest rows onto the contract's columns; relative image paths -> URIs."""
    n = batch.num_rows
    ids = pc.cast(batch.column(manifest.id_col), pa.string())
    columns = {ID: ids}
    images = pa.nulls(n, pa.string())
    image_bytes = pa.nulls(n, pa.binary())
    if manifest.image_col is not None:
        source = batch.column(manifest.image_col)
        if manifest.image_is_bytes:
            image_bytes = pc.cast(source, pa.binary())
        else:
            images = pa.array(
                [None if v is None else storage.resolve(v, manifest.root) for v in
                 pc.cast(source, pa.string()).to_pylist()],
                pa.string(),
            )
    columns[IMAGE] = images
    columns[IMAGE_BYTES] = image_bytes
    captions = (
        pc.cast(batch.column(manifest.caption_col), pa.string())
        if manifest.caption_col is not None
        else pa.nulls(n, pa.string())
    )
    columns[CAPTION] = captions
    for field, source in zip(manifest.metadata_fields, manifest.metadata_sources):
        if source in batch.column_names:
            columns[field.name] = batch.column(source).cast(field.type)
        else:  # a file of a folder manifest without this column
            columns[field.name] = pa.nulls(n, field.type)
    return pa.table(columns)


@dataclass(frozen=True)
class IdScan:
    """The manifest's ids, read before any work: row count, rejects and duplicates."""

    rows: int
    ids: pa.Array | None  # every valid id once (string); None for WebDataset
    missing_ids: int  # rows whose id is null or empty: rejected
    duplicate_rows: int  # rows whose id an earlier row already has: rejected
    duplicated_ids: pa.Array  # ids that more than one row has
    first_of_duplicates: pa.Table | None  # the first row of each duplicated id, manifest columns

    def pending(self, done: pa.Array) -> int | None:
        """How many ids are not done yet (None: unknown without reading the shards)."""
        if self.ids is None:
            return None
        return int(pc.sum(pc.invert(pc.is_in(self.ids, value_set=done))).as_py() or 0)


def scan_ids(manifest: Manifest) -> IdScan:
    """Read only the id column (in manifest order) to count rows and find bad and repeated ids.

    WebDataset keys are unique by construction and are not read twice: the shards are counted.
    """
    if manifest.format == "webdataset":
        rows = read_manifest(manifest).count()
        return IdScan(rows, None, 0, 0, pa.array([], pa.string()), None)
    fs = storage.arrow_filesystem(manifest.filesystem())
    dataset = pads.dataset(list(manifest.files), format=manifest.format, filesystem=fs)
    ids = pc.cast(dataset.to_table(columns=[manifest.id_col]).column(0).combine_chunks(), pa.string())
    valid = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    valid = pc.fill_null(valid, False)
    good = ids.filter(valid)
    counts = pc.value_counts(good)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    duplicated = repeated.field("values")
    first_rows = None
    if len(duplicated):
        matching = dataset.to_table(filter=pc.field(manifest.id_col).cast(pa.string()).isin(duplicated))
        seen, keep = set(), []
        for i, row_id in enumerate(pc.cast(matching.column(manifest.id_col), pa.string()).to_pylist()):
            if row_id not in seen:
                seen.add(row_id)
                keep.append(i)
        first_rows = matching.take(keep)
    return IdScan(
        rows=len(ids),
        ids=pc.unique(good),
        missing_ids=len(ids) - len(good),
        duplicate_rows=int(pc.sum(repeated.field("counts")).as_py() or 0) - len(duplicated),
        duplicated_ids=duplicated,
        first_of_duplicates=first_rows,
    )


def select_rows(batch: pa.Table, id_col: str, excluded: pa.Array) -> pa.Table:
    """Ray Data stage: drop rows without an id and rows whose id is excluded (done, duplicated)."""
    ids = pc.cast(batch.column(id_col), pa.string())
    keep = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    if len(excluded):
        keep = pc.and_(keep, pc.invert(pc.is_in(ids, value_set=excluded)))
    return batch.filter(pc.fill_null(keep, False))
