"""Read and validate a manifest: find its files, check its columns, stream its rows."""

from __future__ import annotations

import dataclasses
import glob as globlib
import posixpath
import re
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from pipeline import storage
from pipeline.config import ConfigError, EmbedConfig, named
from pipeline.read import image_folder, webdataset
from pipeline.read.formats import (
    csv_options,
    csv_schema,
    flatten_webdataset,
    id_text,
    is_binary,
    json_schema,
    metadata_values,
    parse_json_lines,
    value_text,
    webdataset_schema,
)
from pipeline.read.partitions import FileSlices, partition_key
from schemas.embeddings import IMAGE_ERROR, TEXT_ERROR, error, is_reserved
from schemas.manifest import (
    CAPTION,
    FORMATS_BY_SUFFIX,
    ID,
    IMAGE,
    IMAGE_BYTES,
    IMAGE_FILE_SUFFIXES,
    INLINE_IMAGE,
    INLINE_IMAGE_URI,
    INTERNAL_PREFIX,
    PARTITION,
)

# A metadata column whose name an output column already has is kept under this prefix.
RENAMED_METADATA_PREFIX = "manifest_"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: where its files are and how its columns map onto the contract."""

    uri: str
    files: tuple[str, ...]  # paths inside `fs`
    sizes: tuple[int, ...]  # bytes of each file, as listed
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

    def partition_keys(self) -> tuple[str, ...]:
        """Each file's partition key (see partitions.partition_key)."""
        return tuple(partition_key(p, n) for p, n in zip(self.files, self.sizes))

    def uris(self) -> tuple[str, ...]:
        fs = self.filesystem()
        return tuple(storage.unstrip(fs, p) for p in self.files)

    def file_slices(self) -> tuple[FileSlices, ...]:
        """How to read every file whole."""
        return tuple(FileSlices(k, u) for k, u in zip(self.partition_keys(), self.uris()))

    def only(self, files: list[int]) -> "Manifest":
        """The same manifest, reading only the files at these positions."""
        return dataclasses.replace(self, files=tuple(self.files[i] for i in files),
                                   sizes=tuple(self.sizes[i] for i in files))


def open_manifest(config: EmbedConfig, listing_dest: str | None = None) -> Manifest:
    """Find the manifest's files and check its columns against the options, before any work.
    A folder of image files is listed into `listing_dest` (see image_folder) and read as that
    listing."""
    fs, path = storage.filesystem(config.manifest, config.storage_options)
    try:
        listed = _list_files(fs, path, config.manifest, _output_inside(config, path))
    except ConfigError:
        raise
    except Exception as exc:  # unreachable endpoint, no such bucket, access denied, ...
        raise ConfigError(
            f"cannot list manifest {storage.redact(config.manifest)}: {storage.describe(exc)}"
        ) from None
    if listed.images:
        return _image_folder(config, fs, listed, listing_dest)
    files, sizes = listed.files, listed.sizes
    formats = {FORMATS_BY_SUFFIX[_suffix(f)] for f in files}
    if len(formats) > 1:
        raise ConfigError(
            f"manifest {config.manifest} mixes formats ({', '.join(sorted(formats))}): "
            "point it at files of one format"
        )
    fmt = formats.pop()
    # The columns are the first file's; a file without any (a JSON Lines file without rows)
    # says nothing of them, and the next one is asked.
    for path in files:
        try:
            schema = _read_schema(fs, path, fmt)
        except Exception as exc:  # any reader error means the same thing to the user
            raise ConfigError(f"cannot read manifest file {path} as {fmt}: {exc}") from exc
        if len(schema):
            break
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:
        raise ConfigError(f"manifest file {storage.redact(path)} has more than one column named "
                          f"{', '.join(repeated)}: rename or drop the copies")
    return _map_columns(config, schema, files, sizes, fmt, storage.unstrip(fs, listed.root))


def _image_folder(config: EmbedConfig, fs, listed: "_Listed", listing_dest: str | None) -> Manifest:
    """The manifest of a folder of image files: its listing, read as a Parquet manifest whose
    relative paths are the folder's."""
    table = image_folder.listing_table(fs, listed.images, listed.others, listed.root)
    uri = image_folder.write_listing(table, config.manifest, listing_dest, config.storage_options)
    manifest = open_manifest(dataclasses.replace(config, manifest=uri, id_col=ID, image_col=None, caption_col=None))
    return dataclasses.replace(manifest, root=storage.unstrip(fs, listed.root))


def _output_inside(config: EmbedConfig, path: str) -> str | None:
    """OUT's path where it lies inside the manifest's folder: its files are not the manifest's."""
    if not config.out or storage.scheme(config.out) != storage.scheme(config.manifest):
        return None
    out = storage.filesystem(config.out, config.storage_options)[1].rstrip("/")
    return out if out.startswith(path.rstrip("/") + "/") else None


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


@dataclass(frozen=True)
class _Listed:
    files: list[str]  # the manifest's files, in order
    sizes: list[int]  # their bytes, from the listing itself
    root: str
    images: list[str] = dataclasses.field(default_factory=list)  # image files, where no manifest file is
    others: frozenset[str] = frozenset()  # every file listed beside them (their captions among them)


def _list_files(fs, path: str, uri: str, excluded: str | None = None) -> _Listed:
    """The manifest's files, or where there are none the image files, under `path`, less those
    under `excluded`."""
    if "{" in path:
        infos = {}
        for f in expand_braces(path):
            try:
                infos[f] = fs.info(f)
            except FileNotFoundError:
                infos[f] = None
        missing = [f for f, info in infos.items() if info is None]
        if missing:
            raise ConfigError(
                f"manifest {uri}: {len(missing)} of {len(infos)} shards do not exist, "
                f"e.g. {storage.unstrip(fs, missing[0])}"
            )
        root = posixpath.dirname(path.split("{")[0])
    elif globlib.has_magic(path):
        infos = fs.glob(path, detail=True)
        root = path.split("*")[0].split("?")[0].split("[")[0]
        root = root if root.endswith("/") else posixpath.dirname(root)
    elif fs.isdir(path):
        infos = fs.find(path, detail=True)
        root = path
    elif fs.exists(path):
        if _suffix(path) not in FORMATS_BY_SUFFIX:
            raise ConfigError(
                f"manifest {uri}: unknown format {_suffix(path) or '(no suffix)'}; "
                f"name it with one of {', '.join(sorted(FORMATS_BY_SUFFIX))}"
            )
        return _Listed([path], [fs.size(path)], posixpath.dirname(path))
    else:
        raise ConfigError(f"manifest {uri} does not exist: check the path")
    # Hidden and underscore files are markers (_SUCCESS, .crc), not data.
    listed = [
        f
        for f in (infos if "{" in path else sorted(infos))
        if not posixpath.basename(f).startswith(("_", ".")) and infos[f].get("type", "file") != "directory"
        and not (excluded and f.startswith(excluded + "/"))
    ]
    files = [f for f in listed if _suffix(f) in FORMATS_BY_SUFFIX]
    root = root.rstrip("/")
    # Images (those in hidden folders, .thumbnails, are not the corpus), and whether the files of
    # manifest formats are only what describes them: then the folder is a folder of images.
    images = [f for f in listed if image_folder.is_image_file(f)
              and not any(part.startswith(".") for part in posixpath.relpath(f, root).split("/"))]
    if images and all(map(image_folder.ImageNames(images).describe, files)):
        return _Listed([], [], root, images, frozenset(listed))
    if not files:
        raise ConfigError(
            f"manifest {uri} holds no {', '.join(sorted(FORMATS_BY_SUFFIX))} files and no images "
            f"({', '.join(IMAGE_FILE_SUFFIXES)}): check the path"
        )
    return _Listed(files, [int(infos[f].get("size") or 0) for f in files], root)


def _read_schema(fs, path: str, fmt: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            return pq.read_schema(f)
        if fmt == "csv":
            return csv_schema(f)
        if fmt == "webdataset":
            return webdataset_schema(f)
        return json_schema(f)


def _map_columns(config: EmbedConfig, schema: pa.Schema, files, sizes, fmt: str, root: str) -> Manifest:
    names = schema.names
    if config.id_col not in names:
        raise ConfigError(
            f"the manifest has no '{config.id_col}' column (its columns: {', '.join(names)}); "
            f"name the column that identifies each row with {named('id_col')}"
        )
    image_col = _image_column(config, names)
    # CSV reads every column as bytes (see csv_options): its image column holds references.
    image_is_bytes = image_col is not None and fmt != "csv" and is_binary(schema.field(image_col).type)
    caption_col = _caption_column(config, names)
    if image_col is None and caption_col is None:
        raise ConfigError(
            f"the manifest has no '{IMAGE}' or '{IMAGE_BYTES}' column and no '{CAPTION}' column (its columns: "
            f"{', '.join(names)}); name them with {named('image_col')} and {named('caption_col')}"
        )
    fields, sources = _metadata_columns(schema, {config.id_col, image_col, caption_col}, fmt)
    return Manifest(uri=config.manifest, files=tuple(files), sizes=tuple(sizes), format=fmt, root=root,
                    id_col=config.id_col, image_col=image_col, image_is_bytes=image_is_bytes,
                    caption_col=caption_col, metadata_fields=tuple(fields), metadata_sources=tuple(sources),
                    schema=schema, storage_options=dict(config.storage_options))


def _required(setting: str, column: str, names: list[str]) -> str:
    """A column the options name, which the manifest must have."""
    if column not in names:
        raise ConfigError(f"{named(setting)} {column}: the manifest has no such column "
                          f"(its columns: {', '.join(names)})")
    return column


def _image_column(config: EmbedConfig, names: list[str]) -> str | None:
    """The column named by image_col, else the contract's. A manifest without one is a corpus
    of captions (see prepare.prepare_run), unless the image tower alone is asked for."""
    if config.image_col is not None:
        image_col = _required("image_col", config.image_col, names)
    else:
        image_col = next((c for c in (IMAGE, IMAGE_BYTES) if c in names), None)
    if image_col is None and config.towers == ("image",):
        raise ConfigError(
            f"the manifest has no '{IMAGE}' or '{IMAGE_BYTES}' column (its columns: {', '.join(names)}); "
            f"name it with {named('image_col')}, or embed captions only with {named('towers')} text"
        )
    return image_col


def _caption_column(config: EmbedConfig, names: list[str]) -> str | None:
    """The column named by caption_col, else the contract's. A manifest without one is a corpus
    of images (see prepare.prepare_run), unless the text tower alone is asked for."""
    if config.caption_col is not None:
        caption_col = _required("caption_col", config.caption_col, names)
    else:
        caption_col = CAPTION if CAPTION in names else None
    if caption_col is None and config.towers == ("text",):
        raise ConfigError(
            f"the manifest has no '{CAPTION}' column (its columns: {', '.join(names)}); "
            f"name it with {named('caption_col')}, or embed images only with {named('towers')} image"
        )
    return caption_col


def _metadata_columns(schema: pa.Schema, used: set, fmt: str) -> tuple[list[pa.Field], list[str]]:
    """The other columns as the outputs' metadata fields (renamed where taken), and their sources."""
    names_out = {n for n in schema.names if n not in used}
    fields, sources = [], []
    for f in schema:
        if f.name in used:
            continue
        name = f.name
        # `width` beside `manifest_width` becomes `manifest_manifest_width`: every name stays.
        while name != f.name and name in names_out or is_reserved(name):
            name = RENAMED_METADATA_PREFIX + name
        names_out.add(name)
        # CSV values are read as bytes (see csv_options) and kept as text.
        kind = pa.string() if fmt == "csv" else f.type
        fields.append(pa.field(name, kind))
        sources.append(f.name)
    return fields, sources


def read_manifest(manifest: Manifest, num_cpus: float = 1.0, file_slices: tuple[FileSlices, ...] | None = None):
    """The manifest's rows as a Ray Dataset, streamed from its files by tasks that each reserve
    `num_cpus`, each row tagged with its partition's key (PARTITION). Each file is
    read as its slices (from scan_ids, in the order of manifest.files) say; without them, whole."""
    import ray.data

    fs = storage.arrow_filesystem(manifest.filesystem())
    files = list(manifest.files)
    by_path = dict(zip(files, file_slices or manifest.file_slices()))
    task = {"num_cpus": num_cpus}
    if manifest.format == "webdataset":
        source = webdataset.WebDatasetShardsDatasource(files, by_path, filesystem=fs)
        return ray.data.read_datasource(source, **task).map_batches(
            flatten_webdataset, fn_kwargs={"schema": manifest.schema}, batch_format="pyarrow",
            num_cpus=num_cpus)
    return ray.data.read_datasource(TableFilesDatasource(files, manifest, by_path, filesystem=fs), **task)


# Rows per block a read task yields from a Parquet or CSV file.
ROWS_PER_READ_BLOCK = 4096


class TableFilesDatasource(FileBasedDatasource):
    """Ray Data source: each Parquet, CSV or JSON Lines file streamed once, in the order and
    with the row positions the id scan saw, less the rows its slices leave out."""

    def __init__(self, paths: list[str], manifest: Manifest, file_slices: dict[str, FileSlices],
                 **file_based_kwargs):
        super().__init__(paths, **file_based_kwargs)
        self._manifest = manifest
        # Read tasks serialize the source: the slices (a set of positions per file) travel once.
        self._slices_ref = ray.put(file_slices)

    def _open_input_source(self, filesystem, path: str, **open_args):
        if self._manifest.format == "parquet":  # its footer comes first: random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        slices = ray.get(self._slices_ref)[path]
        for position, table in _file_blocks(self._manifest, f, slices):
            table = slices.rows_to_read(table, position)
            if table.num_rows:
                yield table


def _file_blocks(manifest: Manifest, f, slices: FileSlices) -> Iterator[tuple[int, pa.Table]]:
    """A file's rows in reading order, a block at a time (a JSON Lines file at once), each with
    the position of its first row; a Parquet file's row groups of partitions done are skipped."""
    if manifest.format == "parquet":
        parquet = pq.ParquetFile(f)
        groups = [parquet.metadata.row_group(n).num_rows for n in range(parquet.num_row_groups)]
        for first, stop in slices.groups_to_read(groups):
            position = sum(groups[:first])
            for batch in parquet.iter_batches(batch_size=ROWS_PER_READ_BLOCK, row_groups=list(range(first, stop))):
                yield position, pa.Table.from_batches([batch])
                position += batch.num_rows
    elif manifest.format == "csv":
        position = 0
        for batch in pacsv.open_csv(f, **csv_options(manifest.schema.names)):
            yield position, pa.Table.from_batches([batch])
            position += batch.num_rows
    else:
        yield 0, parse_json_file(f.read(), manifest)


def parse_json_file(data: bytes, manifest: Manifest) -> pa.Table:
    text_fields = tuple(c for c in (manifest.image_col, manifest.caption_col) if c)
    return parse_json_lines(data, manifest.schema, text_fields, manifest.id_col)


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
        if manifest.image_is_bytes and is_binary(source.type):
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
            columns[field.name] = metadata_values(batch.column(source), field.type)
        else:  # a file of a folder manifest without this column
            columns[field.name] = pa.nulls(n, field.type)
    # Errors found here; the decode and tokenize stages add theirs to rows that have none.
    columns[IMAGE_ERROR] = pa.array(image_errors, pa.string())
    columns[TEXT_ERROR] = pa.array(caption_errors, pa.string())
    if PARTITION in batch.column_names:
        columns[PARTITION] = batch.column(PARTITION)
    return pa.table(columns)


def _merge_invalid(invalid: list[str | None], batch: pa.Table, column: str) -> list[str | None]:
    """Reasons a reader already noted (JSON values that are not text) join the converter's."""
    noted = INTERNAL_PREFIX + "invalid_" + column
    if noted not in batch.column_names:
        return invalid
    return [a or b for a, b in zip(invalid, batch.column(noted).to_pylist())]
