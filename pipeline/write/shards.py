"""Write Parquet shards (each published whole by a rename), each with its own totals; read
them back."""

from __future__ import annotations

import collections
import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.write.summary import SUMMARY_NAME
from schemas.embeddings import (
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    MODEL,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    error_kind,
    provenance_of,
    vector_type,
)
from schemas.manifest import ID, IMAGE

SHARD_PREFIX = "part-"
# Key of a shard's own totals (rows, vectors, errors by kind) in its Parquet footer.
TOTALS_KEY = b"altclip.totals"
ERROR_EXAMPLES = 5  # ids kept per error kind in the summary


def conform(table: pa.Table, schema: pa.Schema, model_label: str) -> pa.Table:
    """The table in the output schema: columns in order and type; absent ones null."""
    columns = []
    for field in schema:
        if field.name == MODEL:
            columns.append(pa.array([model_label] * table.num_rows, pa.string()))
        elif field.name == IMAGE and IMAGE in table.column_names:
            # Signed URLs carry credentials in their query string: outputs keep the rest.
            columns.append(pa.array(
                [storage.redact(v) if v and storage.is_url(v) else v
                 for v in table.column(IMAGE).to_pylist()], pa.string()))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def errors_by_kind(table: pa.Table) -> collections.Counter:
    """Errors by `side.kind` in a table with the two error columns."""
    errors = collections.Counter()
    for column in (IMAGE_ERROR, TEXT_ERROR):
        side = column.split("_")[0]
        for value in table.column(column).drop_null().to_pylist():
            errors[f"{side}.{error_kind(value)}"] += 1
    return errors


def run_stamp() -> str:
    """Names the shards of one run so that a later run's sort after an earlier run's (the
    driver's clock: the workers' clocks may differ)."""
    return f"{time.time_ns():020d}"


def write_shard(out: str, table: pa.Table, storage_options: dict | None = None,
                patience_s: float = storage.DEFAULT_PATIENCE_S, stamp: str | None = None,
                partition: str | None = None) -> str:
    """Write one shard under a temporary name, then rename it into place; returns its name
    (`part-<run stamp>-<partition key>-<uuid>.parquet`, or `part-<run stamp>-<uuid>.parquet` for
    rows of no partition).

    While the store is unreachable the whole write is retried (see storage.patiently); a
    rename that went through but was not acknowledged can publish the rows twice, which
    remove_duplicate_rows undoes.
    """
    fs, path = storage.filesystem(out, storage_options)
    path = path.rstrip("/")
    stamp = stamp or run_stamp()

    def write() -> str:
        name = f"{SHARD_PREFIX}{stamp}-{f'{partition}-' if partition else ''}{uuid.uuid4().hex}.parquet"
        temporary = f"{path}/.{name}.tmp"
        with fs.open(temporary, "wb") as f:
            pq.write_table(_with_totals(table), f, compression="zstd")
        fs.mv(temporary, f"{path}/{name}")
        return name

    return storage.patiently(write, out, patience_s)


def shard_partition(name: str) -> str | None:
    """The partition key in a shard's name (None: a shard of no partition)."""
    parts = name[len(SHARD_PREFIX):].removesuffix(".parquet").split("-")
    return parts[1] if len(parts) == 3 else None


def list_shards(out: str, storage_options: dict | None = None) -> list[str]:
    """Published shard paths under an output URI (temporary files are hidden)."""
    fs, path = storage.filesystem(out, storage_options)
    if not fs.exists(path):
        return []
    return sorted(storage.unstrip(fs, p) for p in fs.glob(f"{path.rstrip('/')}/{SHARD_PREFIX}*.parquet"))


def read_output_provenance(out: str, storage_options: dict | None = None) -> dict | None:
    shards = list_shards(out, storage_options)
    if not shards:
        return None
    fs, path = storage.filesystem(shards[0], storage_options)
    with fs.open(path, "rb") as f:
        return provenance_of(pq.read_schema(f))


def check_output_vector_dtype(out: str, vector_dtype: str, storage_options: dict | None = None) -> None:
    """Refuse to add vectors of one `--vector-dtype` to an output holding the other: the shards of
    one output are read as one dataset, of one type."""
    previous = read_output_provenance(out, storage_options)
    if previous is not None and previous["vector_dtype"] != vector_dtype:
        held = previous["vector_dtype"]
        raise ConfigError(
            f"{named('vector_dtype')} {vector_dtype}: {named('out')} {out} holds {held} vectors; rerun with "
            f"{named('vector_dtype')} {held}, choose another {named('out')}, or pass {named('overwrite')} to replace them"
        )


def outputs_dataset(out: str, storage_options: dict | None = None) -> pads.Dataset | None:
    """The published shards under OUT as one Arrow dataset (None: there are none)."""
    shards = list_shards(out, storage_options)
    return shards_dataset(shards, storage_options) if shards else None


def shards_dataset(shards: list[str], storage_options: dict | None = None,
                   schema: pa.Schema | None = None) -> pads.Dataset:
    """Some shards (URIs, as list_shards gives them) as one Arrow dataset."""
    fs, _ = storage.filesystem(shards[0], storage_options)
    paths = [storage.filesystem(s, storage_options)[1] for s in shards]
    return pads.dataset(paths, format="parquet", schema=schema, filesystem=storage.arrow_filesystem(fs))


def read_ids(out: str, storage_options: dict | None = None) -> pa.Array:
    """The distinct ids already published under OUT: the rows a rerun does not embed again."""
    dataset = outputs_dataset(out, storage_options)
    if dataset is None:
        return pa.array([], pa.string())
    # A shard published twice (see remove_duplicate_rows) must not count its rows twice.
    return pc.unique(dataset.to_table(columns=[ID]).column(0).combine_chunks())


def remove_outputs(out: str, storage_options: dict | None = None) -> None:
    """Delete published shards, leftovers of killed writes and the summary (for --overwrite)."""
    fs, path = storage.filesystem(out, storage_options)
    for pattern in (f"{SHARD_PREFIX}*.parquet", f".{SHARD_PREFIX}*.tmp", SUMMARY_NAME):
        for found in fs.glob(f"{path.rstrip('/')}/{pattern}"):
            fs.rm_file(found)


def remove_unpublished(out: str, storage_options: dict | None = None) -> int:
    """Delete shards a killed run left half-written (one job writes an output at a time)."""
    fs, path = storage.filesystem(out, storage_options)
    leftovers = fs.glob(f"{path.rstrip('/')}/.{SHARD_PREFIX}*.tmp")
    for found in leftovers:
        fs.rm_file(found)
    return len(leftovers)


def remove_duplicate_rows(out: str, storage_options: dict | None = None,
                          patience_s: float = storage.DEFAULT_PATIENCE_S,
                          shards: list[str] | None = None) -> tuple[int, list[str]]:
    """Keep one row per id across the published shards (or the `shards` named, URIs), the one
    of the latest run; returns how many rows were removed and the names of the shards left.

    A write task that Ray retries after its shard was published, or a worker of a killed run
    that finished its shard late, can publish rows a second time: identical copies (same
    inputs, same provenance). `--retry-errors` publishes new versions of failed rows on purpose.
    Shards sort by their run's stamp, so the newest copy is kept and older shards are rewritten
    without theirs (write, then rename, as always, keeping their stamp and partition).
    """
    seen: set[str] = set()
    removed, left = 0, []
    for shard in sorted(shards if shards is not None else list_shards(out, storage_options),
                        key=lambda s: s.rsplit("/", 1)[-1], reverse=True):
        fs, path = storage.filesystem(shard, storage_options)
        name = path.rsplit("/", 1)[-1]
        with fs.open(path, "rb") as f:
            ids = pq.read_table(f, columns=[ID]).column(ID).to_pylist()
        repeated = [i for i in ids if i in seen]
        seen.update(ids)
        if not repeated:
            left.append(name)
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keep = pc.invert(pc.is_in(table.column(ID), value_set=pa.array(repeated, pa.string())))
        kept = table.filter(keep)
        removed += table.num_rows - kept.num_rows
        if kept.num_rows:
            left.append(write_shard(out, kept, storage_options, patience_s, _stamp_of(path),
                                    shard_partition(name)))
        fs.rm_file(path)
    return removed, sorted(left)


def _stamp_of(path: str) -> str | None:
    """The run stamp in a shard's name (None for shards named before stamps)."""
    name = path.rsplit("/", 1)[-1][len(SHARD_PREFIX):]
    stamp = name.split("-", 1)[0]
    return stamp if "-" in name and stamp.isdigit() else None


def failed_ids(out: str, kinds: tuple[str, ...], storage_options: dict | None = None) -> pa.Array:
    """Ids of OUT's rows with an image or text error of one of `kinds`."""
    dataset = outputs_dataset(out, storage_options)
    if dataset is None:
        return pa.array([], pa.string())
    # Only rows with an error are read into memory.
    failed = pads.field(IMAGE_ERROR).is_valid() | pads.field(TEXT_ERROR).is_valid()
    table = dataset.to_table(columns=[ID, IMAGE_ERROR, TEXT_ERROR], filter=failed)
    return pc.unique(table.column(ID).combine_chunks().filter(has_error(table, kinds)))


def has_error(table: pa.Table, kinds: tuple[str, ...]) -> pa.BooleanArray:
    """Which rows of a table with the two error columns have an error of one of `kinds`."""
    wanted = set(kinds)
    return pa.array([any(v is not None and error_kind(v) in wanted for v in values)
                     for values in zip(table.column(IMAGE_ERROR).to_pylist(),
                                       table.column(TEXT_ERROR).to_pylist())], pa.bool_())


def count_kinds(ids: list, kinds: list[str], counts: collections.Counter, examples: dict) -> None:
    """Count each row's kind, keeping the first few ids of each kind (ERROR_EXAMPLES)."""
    for row_id, kind in zip(ids, kinds):
        counts[kind] += 1
        if len(examples.setdefault(kind, [])) < ERROR_EXAMPLES:
            examples[kind].append(row_id)


def shard_totals(table: pa.Table) -> dict:
    """A shard's own counts: rows, vectors per side, errors by kind with a few example ids."""
    errors, examples = collections.Counter(), {}
    for column in (IMAGE_ERROR, TEXT_ERROR):
        side = column.split("_")[0]
        failed = table.filter(pc.is_valid(table.column(column)))
        count_kinds(failed.column(ID).to_pylist(),
                    [f"{side}.{error_kind(value)}" for value in failed.column(column).to_pylist()], errors, examples)
    return {"rows": table.num_rows,
            "image_ok": table.num_rows - table.column(IMAGE_EMBEDDING).null_count,
            "text_ok": table.num_rows - table.column(TEXT_EMBEDDING).null_count,
            "errors": dict(errors), "error_examples": examples}


def _with_totals(table: pa.Table) -> pa.Table:
    """The table with its totals in its schema's metadata: the Parquet footer carries them."""
    metadata = {**(table.schema.metadata or {}), TOTALS_KEY: json.dumps(shard_totals(table))}
    return table.replace_schema_metadata(metadata)


def _totals_from_rows(parquet: pq.ParquetFile) -> dict:
    """shard_totals of a shard without them in its footer: errors from its error columns,
    vectors from the null counts of the vector columns' statistics (not read)."""
    metadata = parquet.metadata
    vectors = {column: 0 for column in (IMAGE_EMBEDDING, TEXT_EMBEDDING)}
    leaves = {metadata.schema.column(i).path.split(".")[0]: i for i in range(metadata.num_columns)}
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for column in vectors:  # a fixed-size list column is one leaf: its nulls are rows without one
            vectors[column] += group.num_rows - group.column(leaves[column]).statistics.null_count
    columns = parquet.read(columns=[ID, IMAGE_ERROR, TEXT_ERROR])
    placeholder = pa.nulls(columns.num_rows, vector_type(1))
    totals = shard_totals(columns.append_column(IMAGE_EMBEDDING, placeholder)
                          .append_column(TEXT_EMBEDDING, placeholder))
    return {**totals, "image_ok": vectors[IMAGE_EMBEDDING], "text_ok": vectors[TEXT_EMBEDDING]}


def empty_totals() -> dict:
    return {"rows": 0, "image_ok": 0, "text_ok": 0, "errors": collections.Counter(),
            "error_examples": {}}


def add_totals(totals: dict, part: dict) -> None:
    """Add one shard's (or partition's) totals to `totals` (from empty_totals)."""
    for key in ("rows", "image_ok", "text_ok"):
        totals[key] += part[key]
    totals["errors"].update(part["errors"])
    for kind, ids in part["error_examples"].items():
        examples = totals["error_examples"].setdefault(kind, [])
        examples.extend(ids[:ERROR_EXAMPLES - len(examples)])


def shard_footer_totals(shard: str, storage_options: dict | None = None) -> dict:
    """A shard's totals from its footer (where its writer put them); a shard written before
    footers held them is counted from its rows."""
    fs, path = storage.filesystem(shard, storage_options)
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowInvalid as exc:  # a file named like a shard that is none
            raise ConfigError(f"{storage.redact(shard)} is named as an output shard but is not one "
                              f"({str(exc).splitlines()[0]}): move it out of the output folder") from None
        raw = (parquet.schema_arrow.metadata or {}).get(TOTALS_KEY)
        return json.loads(raw) if raw else _totals_from_rows(parquet)


def shards_totals(shards: list[str], storage_options: dict | None = None,
                  parts: list[dict] = ()) -> dict:
    """Rows, vectors and errors by kind over some shards (URIs), from their footers, plus
    `parts`: totals already added up elsewhere (a partition's record)."""
    totals = empty_totals()
    for part in parts:
        add_totals(totals, part)
    for shard in shards:
        add_totals(totals, shard_footer_totals(shard, storage_options))
    totals["errors"] = dict(sorted(totals["errors"].items()))
    return totals


def output_totals(out: str, storage_options: dict | None = None) -> dict:
    """Rows, vectors and errors by kind over every published shard, from the shards' footers."""
    return shards_totals(list_shards(out, storage_options), storage_options)
