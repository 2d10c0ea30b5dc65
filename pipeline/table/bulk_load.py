"""Tables at the Lance level, without LanceDB's client (whose import alone takes seconds):
where a table lives, the shards a load reads (their columns, each id once), and writing a new
table fragment by fragment.

A new table is written as Lance fragments, a group of Parquet shards at a time, published in
one commit; the driver holds fragment metadata (a few hundred bytes each), never rows. Where a
job runs on Ray (`embed --db`, a job on a cluster) the groups are Ray tasks, written in parallel
where the tasks run; `altclip load` without `--address` writes them one after another in its
own process rather than start Ray for it. (Ray Data's own `write_lance` passes an argument pylance 14's
`write_fragments` does not take, so the tasks call `write_fragments` themselves.)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.write.shards import shards_dataset
from schemas.embeddings import VECTOR_COLUMNS
from schemas.manifest import ID

# Shards per task: enough to fill a fragment, few enough that a cluster's tasks share the work.
SHARDS_PER_TASK = 4
# A task's writer encodes on more than one core (lance's threads kept 1.3-1.5 busy on 2 cores):
# a CPU each. Half a CPU let twice the tasks start at once on a small machine, each a worker
# importing lance, which doubled a first load's time there (8 s against 4.5 s for 300,000
# rows on 2 cores) and bought nothing after.
WRITE_CPUS = 1
# A task reading shards' ids waits on storage more than it computes (as the manifest's id scan,
# pipeline/read/ids.py); MAX_ID_BUCKETS: the repeated-id check's hash partitions.
ID_READ_CPUS = 0.25
MAX_ID_BUCKETS = 64


def on_ray() -> bool:
    """Whether this process is a Ray driver already: then a table's fragments and index segments
    are Ray tasks. Never starts Ray, nor imports it (a plain `altclip load` does not need it)."""
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def table_uri(db_uri: str, name: str) -> str:
    """Where LanceDB keeps table `name` of the database at `db_uri`."""
    return f"{db_uri.rstrip('/')}/{name}.lance"


@dataclass(frozen=True)
class ShardsToLoad:
    """Shards a load is about to read, read first for their columns and ids (shards_to_load)."""

    uris: list[str]
    schema: pa.Schema  # every column of any of them: a column a shard lacks is null in its rows
    left_out: dict[str, np.ndarray]  # per shard, the positions of rows whose id a later row holds

    @property
    def repeated_rows(self) -> int:
        return sum(len(positions) for positions in self.left_out.values())


def shards_to_load(shards: list[str], storage_options: dict | None = None) -> ShardsToLoad:
    """The shards' columns (shards of outputs extended by another manifest differ in their
    metadata columns), and the rows to leave out so that a load takes each id once: of rows
    sharing an id, the last of the newest shard (shards sort by their run's stamp), the copy
    writer.remove_duplicate_rows keeps in the outputs.

    LanceDB inserts every row of an upsert that matches none of the table's, so an id twice in
    the outputs would be two rows of the table, and the next upsert of that id fails
    ('Ambiguous merge inserts'). Where the caller runs on Ray, tasks read the shards' ids and
    hash them into buckets, a task per bucket finds the repeated ones: the driver gets the
    columns and the rows to leave out, never every id (as the manifest's id scan, ids.py).
    Elsewhere (a plain `altclip load`) this process holds the ids while it checks them: 316 MiB
    more at its peak, and 2.1 s, for 2 million ids of 25 characters in 8 shards (2 cores).
    A column of two types among the shards is refused (ConfigError)."""
    groups = [(start, min(start + SHARDS_PER_TASK, len(shards)))
              for start in range(0, len(shards), SHARDS_PER_TASK)]
    if on_ray() and len(groups) > 1:
        import ray

        buckets = min(len(groups), MAX_ID_BUCKETS)
        read = ray.remote(_columns_and_ids).options(num_cpus=ID_READ_CPUS, num_returns=1 + buckets)
        refs = [read.remote(shards[start:stop], start, buckets, storage_options) for start, stop in groups]
        schemas = [s for found in ray.get([r[0] for r in refs]) for s in found]
        find = ray.remote(_later_copies).options(num_cpus=ID_READ_CPUS)
        rows = pa.concat_tables(ray.get([find.remote(*[r[1 + b] for r in refs]) for b in range(buckets)]))
    else:
        schemas, ids = _columns_and_ids(shards, 0, 1, storage_options)
        rows = _later_copies(ids)
    left_out = {}
    for number in pc.unique(rows.column("shard")).to_pylist():
        positions = rows.filter(pc.equal(rows.column("shard"), number)).column("row").to_numpy()
        left_out[shards[number]] = np.sort(positions)
    return ShardsToLoad(list(shards), _every_column(schemas, shards), left_out)


_ID_ROWS = pa.schema([(ID, pa.string()), ("shard", pa.int64()), ("row", pa.int64())])


def _columns_and_ids(shards: list[str], first: int, buckets: int, storage_options: dict | None) -> list:
    """Read task over shards numbered from `first`: each distinct schema among them with the
    number of the first shard holding it, then per bucket their ids with where they are."""
    schemas, pieces = [], [[] for _ in range(buckets)]
    for number, shard in enumerate(shards, first):
        fs, path = storage.filesystem(shard, storage_options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            ids = parquet.read(columns=[ID]).column(ID).combine_chunks()
        # Compared without metadata: each shard's footer holds its own totals.
        if not any(schema.equals(held) for _, held in schemas):
            schemas.append((number, schema))
        rows = pa.table([ids.cast(pa.string()), pa.array(np.full(len(ids), number, np.int64)),
                         pa.array(np.arange(len(ids), dtype=np.int64))], schema=_ID_ROWS)
        if buckets == 1:
            pieces[0].append(rows)
            continue
        bucket = np.fromiter((zlib.crc32(i.encode()) % buckets for i in ids.to_pylist()), np.int64, len(ids))
        for b in range(buckets):
            pieces[b].append(rows.filter(pa.array(bucket == b)))
    return [schemas, *[pa.concat_tables(p) if p else _ID_ROWS.empty_table() for p in pieces]]


def _later_copies(*pieces: pa.Table) -> pa.Table:
    """Bucket task: the rows (shard, row) whose id a later row also has, in shard order."""
    rows = pa.concat_tables(pieces)
    counts = pc.value_counts(rows.column(ID))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    rows = rows.filter(pc.is_in(rows.column(ID), value_set=repeated)).sort_by(
        [(ID, "ascending"), ("shard", "ascending"), ("row", "ascending")])
    if rows.num_rows == 0:
        return rows.select(["shard", "row"])
    ids = rows.column(ID).combine_chunks()
    replaced = pc.equal(ids.slice(0, len(ids) - 1), ids.slice(1))  # the next row has the same id
    return rows.slice(0, len(ids) - 1).filter(replaced).select(["shard", "row"])


def _every_column(schemas: list[tuple[int, pa.Schema]], shards: list[str]) -> pa.Schema:
    """One schema with every column of `schemas` (numbered by their first shard), in order of
    appearance, with the first's metadata (the provenance); a column some shards lack is
    nullable. A column's narrower type gives way to a wider one (see takes_type)."""
    schemas = sorted(schemas, key=lambda found: found[0])
    fields: dict[str, tuple[pa.Field, int]] = {}
    for number, schema in schemas:
        for field in schema:
            held, where = fields.get(field.name, (None, number))
            if held is None or held.type != field.type and takes_type(field.type, held.type):
                fields[field.name] = (field, number)
            elif not takes_type(held.type, field.type):
                raise ConfigError(
                    f"column '{field.name}' is {held.type} in shard {shard_name(shards[where])} and "
                    f"{field.type} in shard {shard_name(shards[number])} (a column holds one type): "
                    "load the shards of each kind from a folder of their own, into a table each")
    everywhere = set.intersection(*(set(schema.names) for _, schema in schemas))
    return pa.schema([field if field.name in everywhere else field.with_nullable(True)
                      for field, _ in fields.values()], metadata=schemas[0][1].metadata)


def shard_name(shard: str) -> str:
    return shard.rsplit("/", 1)[-1]


def takes_type(held: pa.DataType, brought: pa.DataType) -> bool:
    """Whether a column of type `held` takes values of type `brought` as they are: the same type,
    a narrower number of the same kind, text or bytes of the other offset width, or a column of
    nulls only (`null`, what an empty manifest column is read as). Anything else is refused
    where it is found: an upsert casts what it can without a word (numbers into a text column
    as text, text of digits into a number column, measured) and fails half way on the rest."""
    if held == brought or pa.types.is_null(brought):
        return True
    for kind in (pa.types.is_signed_integer, pa.types.is_unsigned_integer, pa.types.is_floating):
        if kind(held) and kind(brought):
            return held.bit_width >= brought.bit_width
    if pa.types.is_signed_integer(held) and pa.types.is_unsigned_integer(brought):
        return held.bit_width > brought.bit_width
    return ({held, brought} <= {pa.string(), pa.large_string()}
            or {held, brought} <= {pa.binary(), pa.large_binary()})


def shard_batches(shards: list[str], schema: pa.Schema, storage_options: dict | None = None,
                  left_out: dict[str, np.ndarray] | None = None) -> Iterator[pa.RecordBatch]:
    """The rows of `shards` in `schema` (a column a shard lacks is null, a narrower type cast),
    without the rows `left_out` names (positions, per shard)."""
    for shard in shards:
        skipped = (left_out or {}).get(shard)
        start = 0
        for batch in shards_dataset([shard], storage_options, schema).to_batches():
            rows = batch.num_rows
            if skipped is not None and len(skipped):
                batch = batch.filter(pa.array(~np.isin(np.arange(start, start + rows), skipped)))
            start += rows
            yield batch


def create_table(db_uri: str, name: str, shards: ShardsToLoad, storage_options: dict | None = None) -> int:
    """Write every row of `shards` (but those it leaves out) as the new table `name`; returns
    the rows written."""
    import lance
    from lance.fragment import FragmentMetadata

    uri = table_uri(db_uri, name)
    schema, uris = shards.schema, shards.uris
    groups = [uris[i:i + SHARDS_PER_TASK] for i in range(0, len(uris), SHARDS_PER_TASK)]
    left_out = [{s: shards.left_out[s] for s in group if s in shards.left_out} for group in groups]
    if on_ray() and len(groups) > 1:
        import ray

        write = ray.remote(_write_fragments).options(num_cpus=WRITE_CPUS)
        results = ray.get([write.remote(uri, group, schema, storage_options, skipped)
                           for group, skipped in zip(groups, left_out)])
    else:
        results = [_write_fragments(uri, group, schema, storage_options, skipped)
                   for group, skipped in zip(groups, left_out)]
    fragments = [FragmentMetadata.from_json(f) for written, _ in results for f in written]
    lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, fragments),
                              storage_options=storage.lance_storage_options(db_uri, storage_options))
    return sum(rows for _, rows in results)


def _write_fragments(uri: str, shards: list[str], schema: pa.Schema, storage_options: dict | None,
                     left_out: dict[str, np.ndarray]) -> tuple[list[str], int]:
    """One group of shards -> fragments under the table (not yet part of it), as JSON."""
    from lance.fragment import write_fragments

    rows = (shards_dataset(shards, storage_options, schema).count_rows()
            - sum(len(positions) for positions in left_out.values()))
    batches = (_without_nan_vectors(batch)
               for batch in shard_batches(shards, schema, storage_options, left_out))
    fragments = write_fragments(pa.RecordBatchReader.from_batches(schema, batches), uri, schema=schema,
                                storage_options=storage.lance_storage_options(uri, storage_options))
    return [json.dumps(f.to_json()) for f in fragments], rows


def _without_nan_vectors(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A vector holding NaN (a degenerate input normalised) made null, as LanceDB's own writes
    do (`on_bad_vectors="null"`): a NaN would poison every distance computed against it."""
    import numpy as np

    for name in VECTOR_COLUMNS:
        if name not in batch.schema.names or batch.num_rows == 0:
            continue
        column = batch.column(name)
        dim = column.type.list_size
        values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        bad = np.isnan(values.reshape(-1, dim)).any(axis=1) if len(values) else np.zeros(0, bool)
        if not bad.any():
            continue
        valid = np.asarray(column.is_valid())
        full = np.zeros(batch.num_rows, bool)
        full[np.flatnonzero(valid)] = bad  # flatten() skips null vectors
        cleaned = pc.if_else(pa.array(full), pa.nulls(batch.num_rows, column.type), column)
        batch = batch.set_column(batch.schema.get_field_index(name), batch.schema.field(name), cleaned)
    return batch
