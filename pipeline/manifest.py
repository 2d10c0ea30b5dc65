"""Read and validate a manifest: find its files, check its columns, stream its rows."""

from __future__ import annotations

import glob as globlib
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
    storage_options: dict

    def filesystem(self):
        return storage.filesystem(self.uri, self.storage_options)[0]


def open_manifest(config: EmbedConfig) -> Manifest:
    """Find the manifest's files and check its columns against the options, before any work."""
    try:
        fs, path = storage.filesystem(config.manifest, config.storage_options)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open manifest {config.manifest}: {exc}") from exc
    files, root = _list_files(fs, path, config.manifest)
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


def _list_files(fs, path: str, uri: str) -> tuple[list[str], str]:
    if globlib.has_magic(path):
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
        return pajson.open_json(f).schema


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
