"""A run's outputs in clip-retrieval's layout: float16 .npy vectors beside row-aligned Parquet metadata."""

from __future__ import annotations

import collections
import io
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.write.shards import count_kinds, output_totals, outputs_dataset
from schemas.embeddings import (
    HEIGHT,
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    PROVENANCE_KEY,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    WIDTH,
    contract_column_names,
    error_kind,
)
from schemas.manifest import CAPTION, ID, IMAGE

FORMATS = ("embedding-reader",)
# side -> its vector column, its error column, and its folder (and file prefix) in clip-retrieval's
# layout: img_emb/img_emb_0.npy, text_emb/text_emb_0.npy beside metadata/metadata_0.parquet.
SIDES = {"image": (IMAGE_EMBEDDING, IMAGE_ERROR, "img_emb"),
         "text": (TEXT_EMBEDDING, TEXT_ERROR, "text_emb")}
METADATA_FOLDER = "metadata"
# What clip-retrieval's back end reads by default (`columns_to_return`: url, image_path, caption):
# it shows `image_path` from its own disk (base64 in the answer's `image`, so no column of ours
# may be named `image`) and hands `url` to the browser.
IMAGE_PATH = "image_path"
URL = "url"
NPY_DTYPE = np.float16  # clip-retrieval's inference writes float16 vectors


def export_embedding_reader(out: str, dest: str, sides: tuple[str, ...] | None = None,
                            overwrite: bool = False, storage_options: dict | None = None) -> dict:
    """Write OUT's rows to DEST as clip-retrieval's inference does: per published shard, in
    order, `img_emb/img_emb_N.npy` and `text_emb/text_emb_N.npy` (float16, one row per vector)
    and `metadata/metadata_N.parquet`, row i of each the same row of OUT.

    `sides` (None: every side OUT holds vectors for) are the vectors exported; a row lacking one
    of them cannot be aligned in all three files and is left out, counted by side and error kind.
    Of an id published more than once the newest copy is exported. Memory is bounded by one
    shard, plus one pass holding every id (as Arrow strings) to find repeated ones.
    """
    started = time.perf_counter()
    dataset = outputs_dataset(out, storage_options)
    if dataset is None:
        raise ConfigError(f"{storage.redact(out)} holds no embeddings (no part-*.parquet): embed "
                          "into it first")
    sides = _sides(out, output_totals(out, storage_options), sides)
    fs, root = storage.filesystem(dest, storage_options)
    root = root.rstrip("/")
    _prepare_destination(dest, fs, root, sides, overwrite, storage_options)
    dim = dataset.schema.field(IMAGE_EMBEDDING).type.list_size
    tally = _write_shards(dataset, sides, dim, fs, root, dest)
    return {
        "dest": storage.redact(storage.unstrip(fs, root)),
        "format": "embedding-reader",
        "sides": list(sides),
        "folders": [SIDES[s][2] for s in sides] + [METADATA_FOLDER],
        "dimension": dim,
        "files": tally.files,
        "rows_in": tally.rows_in,
        "rows_exported": tally.exported,
        # Rows lacking a vector of an exported side; why, by `side.kind` (a row lacking both
        # counts under each; `not_embedded`: no error on that side, the tower did not run).
        "rows_skipped": tally.rows_in - tally.older_copies - tally.exported,
        "missing_vectors": dict(sorted(tally.missing.items())),
        "missing_examples": dict(sorted(tally.examples.items())),
        "older_copies": tally.older_copies,
        "seconds": round(time.perf_counter() - started, 3),
    }


@dataclass
class _Tally:
    """What an export did, for its report."""

    files: int = 0
    rows_in: int = 0
    exported: int = 0
    older_copies: int = 0
    missing: collections.Counter = field(default_factory=collections.Counter)  # `side.kind` -> rows
    examples: dict = field(default_factory=dict)  # `side.kind` -> its first few ids


def _write_shards(dataset, sides: tuple[str, ...], dim: int, fs, root: str, dest: str) -> _Tally:
    """Each published shard's complete rows (newest copies only) as one numbered triple of files."""
    schema = dataset.schema
    metadata_names = [n for n in schema.names if n not in contract_column_names()]
    columns = [ID, IMAGE, CAPTION, WIDTH, HEIGHT, *metadata_names,
               *(c for side in sides for c in SIDES[side][:2])]
    provenance = (schema.metadata or {}).get(PROVENANCE_KEY)
    footer = {PROVENANCE_KEY: provenance} if provenance else None
    fragments = list(dataset.get_fragments())
    newest = _newest_copies(fragments, schema)
    # Numbered 0.. and zero-padded to the digits of the shard count, as clip-retrieval pads to its
    # partition count: readers sort names as text (embedding-reader pairs the n-th .npy with the
    # n-th metadata file that way), so text order must be number order.
    width = len(str(len(fragments)))
    tally = _Tally()
    for fragment, keep in zip(fragments, newest):
        rows = fragment.to_table(schema=schema, columns=columns)
        tally.rows_in += rows.num_rows
        if keep is not None:
            tally.older_copies += rows.num_rows - pc.sum(keep).as_py()
            rows = rows.filter(keep)
        complete = _with_every_vector(rows, sides)
        _count_missing(rows.filter(pc.invert(complete)), sides, tally.missing, tally.examples)
        rows = rows.filter(complete)
        if not rows.num_rows:
            continue  # embedding-reader skips an empty .npy but not its metadata: no empty triples
        number = str(tally.files).zfill(width)
        for side in sides:
            column, _, folder = SIDES[side]
            _write(fs, f"{root}/{folder}/{folder}_{number}.npy", _npy(rows.column(column), dim), dest)
        _write(fs, f"{root}/{METADATA_FOLDER}/{METADATA_FOLDER}_{number}.parquet",
               _parquet(_metadata(rows, metadata_names), footer), dest)
        tally.exported += rows.num_rows
        tally.files += 1
    return tally


def _with_every_vector(rows: pa.Table, sides: tuple[str, ...]) -> pa.Array:
    """Which rows hold a vector of every exported side: only they align in all three files."""
    complete = pc.is_valid(rows.column(SIDES[sides[0]][0]))
    for side in sides[1:]:
        complete = pc.and_(complete, pc.is_valid(rows.column(SIDES[side][0])))
    return complete


def _sides(out: str, totals: dict, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The sides to export: those asked for, each of which OUT must hold vectors for."""
    held = tuple(side for side in SIDES if totals[f"{side}_ok"])
    errors = ", ".join(f"{k} {v}" for k, v in totals["errors"].items()) or "none"
    if not held:
        raise ConfigError(f"{storage.redact(out)} holds no vectors to export: none of its "
                          f"{totals['rows']} rows has one (errors: {errors})")
    if wanted is None:
        return held
    unknown = [side for side in wanted if side not in SIDES]
    if unknown or not wanted:
        raise ConfigError(f"sides {', '.join(wanted) or '(none)'}: choose among {', '.join(SIDES)}")
    lacking = [side for side in wanted if side not in held]
    if lacking:
        raise ConfigError(f"{storage.redact(out)} holds no {lacking[0]} vectors (of its "
                          f"{totals['rows']} rows; errors: {errors}): export {' and '.join(held)} only")
    return tuple(side for side in SIDES if side in wanted)


def _prepare_destination(dest: str, fs, root: str, sides: tuple[str, ...], overwrite: bool,
                         storage_options: dict | None) -> None:
    """Refuse a DEST that holds anything unless overwriting; then the layout's folders are
    removed (only they: other files in DEST are the user's) and those of `sides` made again."""
    storage.check_writable(dest, storage_options, "dest")
    try:
        held = sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(root, detail=False))
    except FileNotFoundError:
        held = []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(f"{named('dest')} {storage.redact(dest)} is not empty (it holds {shown}): choose "
                          f"another {named('dest')}, or pass {named('overwrite')} to replace its "
                          f"{', '.join(f'{s[2]}/' for s in SIDES.values())} and {METADATA_FOLDER}/")
    for folder in [side[2] for side in SIDES.values()] + [METADATA_FOLDER]:
        if fs.exists(f"{root}/{folder}"):
            fs.rm(f"{root}/{folder}", recursive=True)
    for folder in [SIDES[side][2] for side in sides] + [METADATA_FOLDER]:
        fs.makedirs(f"{root}/{folder}", exist_ok=True)


def _newest_copies(fragments: list, schema: pa.Schema) -> list[pa.BooleanArray | None]:
    """Per shard, the rows holding the newest copy of their id (None: all of them).

    An id is published more than once by `reembed --out` (each run adds the rows it changed) and
    by a killed embed until its rerun removes the copies; shards sort by their run's stamp, so
    the later shard holds the newer copy, the one `embed` itself keeps.
    """
    ids = [fragment.to_table(schema=schema, columns=[ID]).column(ID) for fragment in fragments]
    counts = [len(column) for column in ids]
    every = pa.chunked_array([chunk for column in ids for chunk in column.chunks], pa.string())
    if pc.count_distinct(every).as_py() == len(every):
        return [None] * len(fragments)
    places = pa.table({ID: every, "at": pa.array(np.arange(len(every)))})
    keep = np.zeros(len(every), dtype=bool)
    keep[places.group_by(ID).aggregate([("at", "max")]).column("at_max").to_numpy()] = True
    bounds = np.cumsum([0, *counts])
    return [None if keep[a:b].all() else pa.array(keep[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _count_missing(rows: pa.Table, sides: tuple[str, ...], missing: collections.Counter,
                   examples: dict) -> None:
    """Count the left-out rows by the side whose vector they lack and its error kind."""
    for side in sides:
        column, error_column, _ = SIDES[side]
        lacking = rows.filter(pc.is_null(rows.column(column)))
        count_kinds(lacking.column(ID).to_pylist(),
                    [f"{side}.{error_kind(value) if value else 'not_embedded'}"
                     for value in lacking.column(error_column).to_pylist()], missing, examples)


def _metadata(rows: pa.Table, metadata_names: list[str]) -> pa.Table:
    """The metadata file's columns: clip-retrieval's `image_path`, `caption` and `url`, then ours
    (`id`, `width`, `height`) and the manifest's metadata columns; no vectors, no errors."""
    image = rows.column(IMAGE)
    # A manifest's own `url` column (img2dataset's, the source of a WebDataset shard's image) is
    # the image's web address; else the image reference where a browser can open it.
    web = pc.match_substring_regex(image, r"^https?://", ignore_case=True)
    url = rows.column(URL) if URL in metadata_names else pc.if_else(web, image, pa.scalar(None, pa.string()))
    columns = {
        IMAGE_PATH: image,
        CAPTION: rows.column(CAPTION),
        URL: url,
        ID: rows.column(ID),
        WIDTH: rows.column(WIDTH),
        HEIGHT: rows.column(HEIGHT),
    }
    for name in metadata_names:
        if name == URL:
            continue
        kept = name
        while kept in columns:  # a manifest's own `image_path`: kept, as the outputs keep theirs
            kept = f"manifest_{kept}"
        columns[kept] = rows.column(name)
    return pa.table(columns)


def _npy(vectors: pa.ChunkedArray, dim: int) -> bytes:
    matrix = pc.list_flatten(vectors).to_numpy().astype(NPY_DTYPE, copy=False).reshape(-1, dim)
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    return buffer.getvalue()


def _parquet(table: pa.Table, footer: dict | None) -> bytes:
    buffer = io.BytesIO()
    # The footer keeps the provenance (model, revision, dtype): the vectors' origin travels along.
    pq.write_table(table.replace_schema_metadata(footer), buffer)
    return buffer.getvalue()


def _write(fs, path: str, data: bytes, dest: str) -> None:
    storage.patiently(lambda: fs.pipe_file(path, data), dest)
