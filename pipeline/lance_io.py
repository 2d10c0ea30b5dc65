"""Tables at the Lance level, without LanceDB's client (whose import alone takes seconds):
where a table lives, and writing a new one fragment by fragment.

A new table is written as Lance fragments, a group of Parquet shards at a time, published in
one commit; the driver holds fragment metadata (a few hundred bytes each), never rows. Where a
job runs on Ray (`embed --db`, a job on a cluster) the groups are Ray tasks, written in parallel
where the tasks run; `altclip load` without `--address` writes them one after another in its
own process rather than start Ray for it. (Ray Data's own `write_lance` passes an argument pylance 14's
`write_fragments` does not take, so the tasks call `write_fragments` themselves.)
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.writer import shards_dataset
from schemas.embeddings import VECTOR_COLUMNS

# Shards per task: enough to fill a fragment, few enough that a cluster's tasks share the work.
SHARDS_PER_TASK = 4
# A task's writer encodes on more than one core (lance's threads kept 1.3-1.5 busy on 2 cores):
# a CPU each. Half a CPU let twice the tasks start at once on a small machine, each a worker
# importing lance, which doubled a first load's time there (8 s against 4.5 s for 300,000
# rows on 2 cores) and bought nothing after.
WRITE_CPUS = 1


def on_ray() -> bool:
    """Whether this process is a Ray driver already: then a table's fragments and index segments
    are Ray tasks. Never starts Ray, nor imports it (a plain `altclip load` does not need it)."""
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def table_uri(db_uri: str, name: str) -> str:
    """Where LanceDB keeps table `name` of the database at `db_uri`."""
    return f"{db_uri.rstrip('/')}/{name}.lance"


def create_table(db_uri: str, name: str, shards: list[str], schema: pa.Schema,
                 storage_options: dict | None = None) -> int:
    """Write every row of `shards` (Parquet URIs, all of `schema`) as the new table `name`;
    returns the rows written."""
    import lance
    from lance.fragment import FragmentMetadata

    uri = table_uri(db_uri, name)
    groups = [shards[i:i + SHARDS_PER_TASK] for i in range(0, len(shards), SHARDS_PER_TASK)]
    if on_ray() and len(groups) > 1:
        import ray

        write = ray.remote(_write_fragments).options(num_cpus=WRITE_CPUS)
        results = ray.get([write.remote(uri, group, schema, storage_options) for group in groups])
    else:
        results = [_write_fragments(uri, group, schema, storage_options) for group in groups]
    fragments = [FragmentMetadata.from_json(f) for written, _ in results for f in written]
    lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, fragments),
                              storage_options=storage.lance_storage_options(db_uri, storage_options))
    return sum(rows for _, rows in results)


def _write_fragments(uri: str, shards: list[str], schema: pa.Schema,
                     storage_options: dict | None) -> tuple[list[str], int]:
    """One group of shards -> fragments under the table (not yet part of it), as JSON."""
    from lance.fragment import write_fragments

    dataset = shards_dataset(shards, storage_options, schema)
    rows = dataset.count_rows()
    batches = (_without_nan_vectors(batch) for batch in dataset.to_batches())
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
