"""The LanceDB table: load Parquet outputs (upsert on `id`), keep its indexes, open it for search."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.table.bulk_load import (
    create_table,
    on_ray,
    shard_batches,
    shard_name,
    shards_to_load,
    table_uri,
    takes_type,
)
from pipeline.table.sql_text import sql_equals
from pipeline.write.shards import list_shards, shards_dataset
from schemas.embeddings import VECTOR_COLUMNS, provenance_of, vector_dtype_of
from schemas.table import (
    ANN_INDEX_MIN_ROWS,
    FULL_TEXT_COLUMN,
    FULL_TEXT_NGRAM_LENGTHS,
    KEY,
    ROWS_PER_PARTITION,
)

# See index_table: an ANN index takes rows added after it was built as segments of their own,
# until they are this share of the rows it was trained on, or this many segments were added.
RETRAIN_SHARE = 0.2
MAX_ADDED_SEGMENTS = 7
# On Ray, an ANN index over more rows than this is built as segments of about this many rows
# each (fewer on small nodes: see segment_rows), one Ray task per segment (see
# _index_on_workers): 585 per column at LAION-5B's 5.85e9.
ROWS_PER_INDEX_SEGMENT = 10_000_000
# What building an IVF_HNSW_SQ segment holds (lance 14, measured: 1.3x the float32 vectors at
# 768-d, 1.1x at 64-d, and a few hundred MiB besides): a segment task asks Ray for this much
# memory, and a segment holds at most what half of the largest node's memory builds.
INDEX_BYTES_PER_VALUE = 6
INDEX_TASK_BASE_BYTES = 512 * 2**20

# How captions are cut for the full-text index, in lance's names. The grams span spaces; the one
# stop word is the space alone, which every spaced caption holds (a query between spaces, see
# full_text_query, would otherwise match them all). Stemming and the language's stop words are
# rules for whole words, not grams.
FULL_TEXT_PARAMS = {"base_tokenizer": "ngram", "min_ngram_length": FULL_TEXT_NGRAM_LENGTHS[0],
                    "max_ngram_length": FULL_TEXT_NGRAM_LENGTHS[1], "stem": False,
                    "remove_stop_words": True, "custom_stop_words": [" "]}
# A full-text build keeps postings in memory up to about this many MiB, then writes them out
# as one more shard of the segment and goes on (lance's `memory_limit`; its default is 2 GiB
# for each of the machine's cores). Measured over 5 million captions on one core, the build
# held 1,474 MiB at 1,024 and 852 MiB at 512: on Ray each segment's task asks for 1.25x the
# limit and INDEX_TASK_BASE_BYTES.
FULL_TEXT_BUILD_MIB = 1024
FULL_TEXT_TASK_BYTES = INDEX_TASK_BASE_BYTES + FULL_TEXT_BUILD_MIB * 2**20 * 5 // 4
FULL_TEXT_INDEX = f"{FULL_TEXT_COLUMN}_idx"

# The columns `altclip dedup` marks near-duplicates with, per side (pipeline/table/dedup.py): the id of
# the kept row a row duplicates, the cosine to it, and whether the row was checked. Named here
# because an upsert must clear them (see `_with_dedup_cleared`).
DEDUP_COLUMNS = {"image": ("dup_of", "dup_score", "dup_checked"),
                 "text": ("caption_dup_of", "caption_dup_score", "caption_dup_checked")}


def connect(db_uri: str, storage_options: dict | None = None):
    # Imported here, not with the module: LanceDB's runtime warns at every fork after it loads,
    # and an embed job starts Ray (forking its processes) before it ever touches a table.
    import lancedb

    try:
        return lancedb.connect(db_uri, storage_options=storage.lance_storage_options(db_uri, storage_options))
    except Exception as exc:  # an unreachable store: said in one line (exit 75), not a traceback
        if not storage.is_unavailable(exc):
            raise
        raise storage.StorageUnavailable(
            f"{storage.redact(db_uri)}: storage unavailable ({storage.describe(exc)[:200]})") from None


def open_table(db_uri: str, name: str, storage_options: dict | None = None):
    """An existing table, for reading: a local path without a database is an error, never a
    new empty folder."""
    if storage.is_local(db_uri) and not os.path.isdir(storage.filesystem(db_uri)[1]):
        raise ConfigError(f"{db_uri}: no database there (a LanceDB database is a folder made by "
                          f"an embed run given {named('db')}, or a load)")
    db = connect(db_uri, storage_options)
    if name not in db.table_names():
        raise ConfigError(
            f"{db_uri} has no table '{name}' (tables: {', '.join(db.table_names()) or 'none'}); "
            f"load embeddings into it first, or name another with {named('table_name')}"
        )
    return db.open_table(name)


def open_dataset(db_uri: str, name: str, storage_options: dict | None = None):
    """An existing table as a Lance dataset, to read, without LanceDB's client (whose import
    alone takes seconds: `sql` answers in under a second); open_table says what is missing."""
    import lance

    try:
        return lance.dataset(table_uri(db_uri, name),
                             storage_options=storage.lance_storage_options(db_uri, storage_options))
    except (ValueError, OSError, RuntimeError):
        return open_table(db_uri, name, storage_options).to_lance()


def table_provenance(table) -> dict | None:
    return provenance_of(table.schema)


def check_vector_dtype(table, vector_dtype: str, brought_by: str = "vector_dtype") -> None:
    """Refuse vectors of one `vector_dtype` for a table of the other (`brought_by`: the setting,
    or "outputs" for outputs being loaded).

    LanceDB would take them, cast to the table's type without a word (both ways, measured), so
    a run asked for float16 would go on storing float32, and the rows it writes to --out would
    differ from the table's. Refused rather than cast: the type was asked for by name, and
    changing a table's type is a decision about the whole table, never a side effect of an
    upsert.
    """
    held = vector_dtype_of(table.schema)
    if held == vector_dtype:
        return
    if brought_by == "outputs":
        raise ConfigError(f"table '{table.name}' holds {held} vectors, the outputs {vector_dtype} "
                          "ones (a table holds one vector type): load them into another table "
                          f"with {named('table_name')}")
    raise ConfigError(f"{named(brought_by)} {vector_dtype}: table '{table.name}' holds {held} vectors (a "
                      f"table holds one vector type): rerun with {named(brought_by)} {held}, or embed "
                      f"into another table with {named('table_name')}")


def check_column_types(held: pa.Schema, name: str, fields, brought_by: str = "outputs") -> None:
    """Refuse `fields` (of the outputs being loaded, or of the manifest an embed will load) that
    table `name`, of schema `held`, holds with a type its column does not take (see
    bulk_load.takes_type). Columns the table lacks are no obstacle: a load adds them; nor is a
    column of nulls only, which takes any type (see _add_columns)."""
    for field in fields:
        if field.name not in held.names:
            continue
        kind = held.field(field.name).type
        if pa.types.is_null(kind) or takes_type(kind, field.type):
            continue
        if brought_by == "manifest":
            raise ConfigError(f"metadata column '{field.name}' is {field.type} in the manifest, {kind} in "
                              f"table '{name}' (a column holds one type): rename the column in the "
                              f"manifest, or embed into another table with {named('table_name')}")
        raise ConfigError(f"column '{field.name}' is {field.type} in the outputs, {kind} in table "
                          f"'{name}' (a column holds one type): load them into another table with "
                          f"{named('table_name')}")


def check_manifest_columns(db_uri: str | None, name: str, metadata_fields,
                           storage_options: dict | None = None) -> None:
    """Before an embed that loads into table `name` of `db_uri` (None: it loads nowhere), refuse
    the manifest's metadata columns the table holds with another type (check_column_types):
    found at the load, that would come after all the embedding. Called once Ray has started:
    LanceDB's runtime warns at every fork after it loads (see connect)."""
    if db_uri is None or storage.is_local(db_uri) and not os.path.isdir(storage.filesystem(db_uri)[1]):
        return  # no database yet: the first load makes the table with the manifest's columns
    table = open_table_if_exists(db_uri, name, storage_options)
    if table is not None:
        check_column_types(table.schema, name, metadata_fields, "manifest")


def _add_columns(table, schema: pa.Schema) -> list[str]:
    """The columns of `schema` the table lacks, added to it, null in the rows it holds (outputs
    of a manifest with other metadata columns); returns their names. A column of nulls only
    (type `null`, an empty manifest column) gets `schema`'s type: Lance casts no column from
    null, so it is dropped and added again, which loses nothing."""
    held = table.schema
    empty = [f.name for f in schema if f.name in held.names and not pa.types.is_null(f.type)
             and pa.types.is_null(held.field(f.name).type)]
    if empty:
        table.drop_columns(empty)
    added = [f.with_nullable(True) for f in schema if f.name not in held.names or f.name in empty]
    if added:
        table.add_columns(added)
    return [f.name for f in added if f.name not in empty]


def ensure_table(db_uri: str, name: str, schema: pa.Schema, storage_options: dict | None = None) -> dict:
    """The table as it is, or created empty with the outputs' schema (a manifest without rows)."""
    db = connect(db_uri, storage_options)
    table = db.open_table(name) if name in db.table_names() else db.create_table(name, schema=schema)
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "inserted": 0, "updated": 0,
            "version": table.version}


def load_outputs(out: str, db_uri: str, name: str, storage_options: dict | None = None) -> dict:
    """Upsert the output rows into the table by `id` (created on first load), then index it.

    Only shards this table has not taken from `out` before are upserted (see `_loaded_shards`):
    a resumed or extended run loads its new rows, not the whole outputs again, and the rows
    already indexed stay in the index until it is rebuilt. Each id is loaded once, from its
    newest copy (see bulk_load.shards_to_load).

    Columns the table lacks (the metadata of another manifest) are added to it first, null in
    the rows it holds; a row the outputs bring without one of the table's columns is null there
    when it is new, and keeps its value when it replaces a row (an upsert changes the columns it
    carries). A column the table holds with another type is refused before anything is
    written (check_column_types)."""
    shards = list_shards(out, storage_options)
    if not shards:
        raise ConfigError(f"{out} holds no embeddings (no part-*.parquet): embed into it first")
    # The record outlives the command: a relative folder would mean nothing from elsewhere.
    where = os.path.abspath(out) if storage.is_local(out) and "://" not in out else storage.redact(out)
    db = connect(db_uri, storage_options)
    if name in db.table_names():
        table = db.open_table(name)
        loaded = _loaded_shards(db, name, table, where)
        new = [s for s in shards if shard_name(s) not in loaded]
        dataset = shards_dataset(new or shards[:1], storage_options)
        existing, incoming = table_provenance(table), provenance_of(dataset.schema)
        if existing and incoming and _model_of(existing) != _model_of(incoming):
            raise ConfigError(
                f"table '{name}' holds vectors of {_model_of(existing)}, the outputs are from "
                f"{_model_of(incoming)}: load them into another table with {named('table_name')}"
            )
        check_vector_dtype(table, vector_dtype_of(dataset.schema), "outputs")
        if not new:  # nothing new since this table last took these outputs: no new version
            return {"uri": db_uri, "name": name, "rows": table.count_rows(), "inserted": 0,
                    "updated": 0, "version": table.version, "shards_already_loaded": len(shards)}
        reading = shards_to_load(new, storage_options)
        check_column_types(table.schema, name, reading.schema)
        added = _add_columns(table, reading.schema)
        # In the table's types (a narrower number widened), every column now one of the table's.
        held = table.schema
        schema = pa.schema([f.with_type(held.field(f.name).type) for f in reading.schema],
                           metadata=reading.schema.metadata)
        rows = pa.RecordBatchReader.from_batches(
            schema, shard_batches(new, schema, storage_options, reading.left_out))
        # Vectors of failed rows are null: keep the row ("null"), never drop it.
        result = (
            table.merge_insert(KEY).when_matched_update_all().when_not_matched_insert_all()
            .execute(_with_dedup_cleared(table, rows), on_bad_vectors="null")
        )
        inserted, updated = result.num_inserted_rows, result.num_updated_rows
    else:
        new, added = shards, []
        reading = shards_to_load(shards, storage_options)
        inserted, updated = create_table(db_uri, name, reading, storage_options), 0
        table = db.open_table(name)
    index_table(table)
    changes = {"repeated_rows": reading.repeated_rows, "columns_added": added}
    record_run(db, name, table.version, {
        "job": "load", "outputs": where, "inserted": inserted, "updated": updated,
        "version_time": _version_times(table)[table.version], "shards": [shard_name(s) for s in new],
        **{k: v for k, v in changes.items() if v}})
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "inserted": inserted,
            "updated": updated, "version": table.version,
            "shards_already_loaded": len(shards) - len(new), **changes}


def _loaded_shards(db, name: str, table, where: str) -> set[str]:
    """The shards of the outputs at `where` whose rows the table holds as loaded, by the runs'
    records: the shards of the loads of `where` since the last job that wrote rows from
    anywhere else (a load of other outputs, a reembed), whose rows may have replaced them.

    Shards are never changed once published (a rewrite publishes a new name), so a shard loaded
    once needs no second load. A record counts only while its version is still the table's,
    with the same time: a `table restore` to before it drops it (and every later record), and so
    does a table dropped and made again under the same name. Changes made by other tools than
    ours are not seen: they are not recorded."""
    if _runs_name(name) not in db.table_names():
        return set()
    runs = db.open_table(_runs_name(name)).to_arrow().sort_by("table_version").to_pylist()
    versions = _version_times(table)
    loads: list[tuple[int, dict]] = []  # loads of `where` since rows last came from elsewhere
    for run in runs:
        version, details = run["table_version"], json.loads(run["details"])
        if details.get("job") == "restore":
            loads = [(v, d) for v, d in loads if v <= details["restored_version"]]
        elif details.get("job") == "load" and details.get("outputs") == where:
            loads.append((version, details))
        elif details.get("job") not in ("classify", "dedup"):  # these write only their own columns
            loads = []
    return {shard for version, details in loads
            if versions.get(version) == details.get("version_time")
            for shard in details.get("shards", ())}


def _version_times(table) -> dict[int, str]:
    """When each version of the table was made: with its number, a time names a version even
    after the table is dropped and made again (numbers restart, times do not)."""
    return {v["version"]: v["timestamp"].isoformat() for v in table.list_versions()}


def _with_dedup_cleared(table, rows: pa.Table | pa.RecordBatchReader):
    """Upserted rows with null near-duplicate marks, so that the next `altclip dedup` checks them
    again: an upsert leaves the columns it does not carry as they were, and marks made from the
    old vectors would stay (a changed image still named a duplicate of another)."""
    cleared = [f for f in table.schema
               if f.name in {c for side in DEDUP_COLUMNS.values() for c in side}
               and f.name not in rows.schema.names]
    if not cleared:
        return rows
    schema = pa.schema(list(rows.schema) + cleared, metadata=rows.schema.metadata)
    batches = rows.to_batches() if isinstance(rows, pa.Table) else rows
    return pa.RecordBatchReader.from_batches(schema, (
        pa.RecordBatch.from_arrays(batch.columns + [pa.nulls(batch.num_rows, f.type) for f in cleared],
                                   schema=schema) for batch in batches))


def open_table_if_exists(db_uri: str, name: str, storage_options: dict | None = None):
    db = connect(db_uri, storage_options)
    return db.open_table(name) if name in db.table_names() else None


def read_columns(table, columns: list[str], where: str | None = None) -> pa.Table:
    """Some columns of the rows matching a SQL filter (LanceDB's own filter language)."""
    query = table.search()
    if where:
        query = query.where(where)
    return query.select(columns).limit(None).to_arrow()


def apply_changes(db_uri: str, name: str, rows: pa.Table, deleted: pa.Array | None, replace: bool,
                  storage_options: dict | None, record: dict) -> dict:
    """Upsert `rows` by id and delete the `deleted` ids (or replace the whole table), re-index,
    and record what the run changed beside the version it made."""
    db = connect(db_uri, storage_options)
    removed = 0
    if replace:
        table = db.create_table(name, data=rows, mode="overwrite", on_bad_vectors="null")
    else:
        table = db.open_table(name)
        check_vector_dtype(table, vector_dtype_of(rows.schema))
        if rows.num_rows:
            (table.merge_insert(KEY).when_matched_update_all().when_not_matched_insert_all()
             .execute(_with_dedup_cleared(table, rows), on_bad_vectors="null"))
        ids = deleted.to_pylist() if deleted is not None else []
        for start in range(0, len(ids), 1000):
            table.delete(sql_equals(KEY, ids[start:start + 1000]))
        removed = len(ids)
    if replace or rows.num_rows or removed:
        index_table(table)
        record_run(db, name, table.version, record)
    # else nothing changed: no new version, the indexes are still current, nothing to record
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "version": table.version,
            "deleted": removed}


def _runs_name(name: str) -> str:
    return f"{name}__runs"


def record_run(db, name: str, version: int, details: dict) -> None:
    """What a job changed, kept in a small table beside the embeddings (local or object storage)."""
    row = pa.table({"table_version": [int(version)], "time": [datetime.now(timezone.utc).isoformat()],
                    "job": [str(details.get("job"))],
                    "details": [json.dumps(details, sort_keys=True, default=str)]})
    if _runs_name(name) in db.table_names():
        db.open_table(_runs_name(name)).add(row)
    else:
        db.create_table(_runs_name(name), data=row)


def table_versions(db_uri: str, name: str, storage_options: dict | None = None) -> list[dict]:
    """The table's versions, oldest first, each with what made it: the job's record where a job
    of ours finished there, else the table format's own record of the change."""
    table = open_table(db_uri, name, storage_options)
    db = connect(db_uri, storage_options)
    runs = {}
    if _runs_name(name) in db.table_names():
        for run in db.open_table(_runs_name(name)).to_arrow().to_pylist():
            runs[run["table_version"]] = json.loads(run["details"])
    dataset = table.to_lance()
    versions = []
    for v in table.list_versions():
        run = runs.get(v["version"])
        versions.append({"version": v["version"], "timestamp": v["timestamp"].isoformat(),
                         "rows": int(v["metadata"].get("total_rows", 0)), "run": run,
                         "made_by": _described_run(run) if run else _described_change(dataset, v["version"])})
    return versions


def _described_run(run: dict) -> str:
    # A load's shard names (for the next load, see _loaded_shards) are listed by their count.
    details = ", ".join(f"{k} {len(v) if isinstance(v, list) else v}" for k, v in run.items()
                        if k not in ("job", "version_time"))
    return f"{run.get('job')}: {details}" if details else str(run.get("job"))


def _described_change(dataset, version: int) -> str:
    """What the table format recorded for a version no job of ours describes (an index built,
    a table created, or a change made by another tool)."""
    try:
        transaction = dataset.read_transaction(version)
    except Exception:  # a format without transaction files: say so rather than fail the listing
        transaction = None
    if transaction is None:
        return "(no record)"
    operation = transaction.operation
    kind = type(operation).__name__
    if kind == "CreateIndex":
        names = sorted({index.name for index in getattr(operation, "new_indices", [])})
        return f"index {', '.join(names)}" if names else "index"
    return {"Overwrite": "table created", "Append": "rows appended", "Delete": "rows deleted",
            "Update": "rows updated", "Merge": "columns changed", "Restore": "restored",
            "Project": "columns dropped"}.get(kind, kind)


def restore_version(db_uri: str, name: str, version: int, storage_options: dict | None = None) -> dict:
    """Make `version`'s rows the latest again (a new version; the history stays)."""
    table = open_table(db_uri, name, storage_options)
    known = [v["version"] for v in table.list_versions()]
    if version not in known:
        raise ConfigError(f"table '{name}' has no version {version} (versions: {known[0]}..{known[-1]})")
    table.restore(version)
    record_run(connect(db_uri, storage_options), name, table.version,
               {"job": "restore", "restored_version": version})
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "version": table.version}


def _model_of(provenance: dict) -> tuple:
    return provenance.get("model"), provenance.get("revision"), provenance.get("dim")


def full_text_index(table):
    """The table's full-text index on captions, or None."""
    for index in table.list_indices():
        if index.index_type == "FTS" and list(index.columns) == [FULL_TEXT_COLUMN]:
            return index
    return None


def full_text_index_is_current(index) -> bool:
    """Whether a full-text index cuts captions the way `index_table` does today (tables indexed
    before n-grams split on spaces: a Chinese or Japanese query matched nothing)."""
    return all(index.index_details.get(key) == value for key, value in FULL_TEXT_PARAMS.items())


def full_text_query(text: str) -> str:
    """The text a full-text search asks the index for: the query between spaces.

    A word standing alone in a caption has grams at its edges (" ca", "at ") that the same
    letters inside a longer word lack, so asking for them ranks "a photo of a cat" above
    "scattered catalogues" for `cat` (on 10,000 synthetic captions, the share of captions with
    the whole word in an English word's top 10 went from 0.80 to 1.00, at about the same speed); text
    without spaces (猫 in 猫的绿色眼睛特写) still matches by its inner grams.
    """
    return f" {text} "


def index_table(table, rows_per_partition: int = ROWS_PER_PARTITION, retrain: bool = False) -> dict:
    """Full-text index on captions; an ANN index per vector column once exact search gets slow.

    Captions are indexed as character n-grams (see FULL_TEXT_PARAMS); a table indexed another
    way (an older whitespace-split index) gets a new index.
    Below ANN_INDEX_MIN_ROWS vectors a search compares every row: exact, and fast at that size.
    Above it, IVF partitions of about 4,096 vectors each (sqrt-like growth keeps both the
    partition scan and the centroid search small), HNSW inside each partition, cosine.

    Where the caller runs on Ray (`embed --db`, `reembed`, a job on a cluster) every index is
    built, and every vector counted, in Ray tasks, so that the driver's memory does not grow
    with the table (an ANN build holds about 1.3x the vectors it indexes; a full-text build in
    one process grew 1.6 GiB at 5 million captions). Each index is built as segments over groups
    of fragments, a task each, committed by the driver as one index: the ANN index trained once
    (see _index_on_workers), the full-text index over ROWS_PER_INDEX_SEGMENT captions a segment
    (see _full_text_on_workers). Elsewhere, in this process.

    Rows a load or reembed added since an index was built go into it as they are: a new segment
    (over the partitions it trained, for the ANN index), which takes seconds where training
    takes minutes at scale. Once those rows pass RETRAIN_SHARE of the trained ones, or
    MAX_ADDED_SEGMENTS segments were added, or with `retrain`, the ANN index is built again from
    all the vectors.
    """
    fts = full_text_index(table)
    if fts is not None and full_text_index_is_current(fts) and not retrain:
        _add_to_index(table, fts.name)
    elif on_ray():
        _full_text_on_workers(table)
    else:
        _full_text_segment(table.to_lance(), None)
        table.checkout_latest()  # the index was made through another handle
    built = {}
    counts = _where_the_index_is_built(_vector_counts, table.to_lance())
    for column in VECTOR_COLUMNS:
        vectors = counts[column]
        if vectors < ANN_INDEX_MIN_ROWS:
            continue
        segments = None if retrain else _ann_segments(table, column)
        if segments and segments["added"] <= RETRAIN_SHARE * segments["trained"] \
                and segments["added_segments"] < MAX_ADDED_SEGMENTS:
            _add_to_index(table, segments["name"])
            built[column] = {"vectors": vectors, "partitions": segments["partitions"],
                             "added": segments["added"]}
            continue
        partitions = max(1, min(4096, vectors // rows_per_partition))
        if on_ray():
            segments = _index_on_workers(table, column, partitions)
        else:
            segments = 1
            table.create_index(metric="cosine", vector_column_name=column, index_type="IVF_HNSW_SQ",
                               num_partitions=partitions, replace=True)
        built[column] = {"vectors": vectors, "partitions": partitions, "segments": segments}
    return built


def _where_the_index_is_built(function, dataset, *args):
    """`function(dataset, *args)` in a Ray task on Ray (what it reads never reaches the driver),
    in this process elsewhere."""
    if not on_ray():
        return function(dataset, *args)
    import ray

    return ray.get(ray.remote(function).options(num_cpus=1).remote(dataset, *args))


def _vector_counts(dataset) -> dict[str, int]:
    """Rows with a vector, per vector column (lance reads the column to see its nulls: 600 MiB
    held at 5 million 64-d rows, measured)."""
    return {column: dataset.count_rows(f"{column} IS NOT NULL") for column in VECTOR_COLUMNS}


def segment_rows(dim: int, node_memory: int) -> int:
    """Rows per index segment: ROWS_PER_INDEX_SEGMENT, or fewer where building that many
    `dim`-d vectors would take more than half of `node_memory` bytes (0: not known)."""
    if node_memory <= 0:
        return ROWS_PER_INDEX_SEGMENT
    fit = (node_memory // 2 - INDEX_TASK_BASE_BYTES) // (dim * INDEX_BYTES_PER_VALUE)
    return max(1, min(ROWS_PER_INDEX_SEGMENT, fit))  # a fragment is never split: a segment holds one at least


def _largest_node_memory() -> int:
    """The `memory` resource of the cluster's largest live node, in bytes."""
    import ray

    return int(max(node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]))


def _fragment_rows(dataset) -> dict[int, int]:
    """Rows by fragment id, in the dataset's order, from the fragments' metadata: no row is read."""
    return {f.fragment_id: f.metadata.num_rows for f in dataset.get_fragments()}


def _fragment_groups(fragment_rows: dict[int, int], rows_per_group: int) -> list[list[int]]:
    """Fragment ids (rows by id, in the dataset's order) in runs of about `rows_per_group` rows:
    a fragment is never split."""
    groups, rows = [[]], 0
    for fragment_id, rows_in_fragment in fragment_rows.items():
        if rows >= rows_per_group:
            groups.append([])
            rows = 0
        groups[-1].append(fragment_id)
        rows += rows_in_fragment
    return [g for g in groups if g]


def _index_on_workers(table, column: str, partitions: int) -> int:
    """The ANN index on `column` as one segment per group of fragments (see segment_rows), each
    built by a Ray task where it runs, over IVF centroids trained once (a Ray task too: lance
    trains on a sample of the vectors, 256 per partition); the driver commits the segments'
    metadata in one commit, as one index that a search reads whole. The segments are not
    merged: lance's merge rebuilds every partition, which costs as much as building the index
    in one process. Returns the segments built."""
    import ray

    dataset = table.to_lance()  # pickles as its URI, version and storage options
    name = f"{column}_idx"
    dim, largest = table.schema.field(column).type.list_size, _largest_node_memory()
    fragment_rows = _fragment_rows(dataset)
    groups = _fragment_groups(fragment_rows, segment_rows(dim, largest))
    train = ray.remote(_train_centroids).options(num_cpus=1)
    centroids = train.remote(dataset, column, partitions)
    build = ray.remote(_index_segment)

    def memory(group: list[int]) -> int:  # never more than a node has: that task would wait for ever
        needed = INDEX_TASK_BASE_BYTES + sum(fragment_rows[f] for f in group) * dim * INDEX_BYTES_PER_VALUE
        return min(largest, needed)

    segments = ray.get([build.options(num_cpus=1, memory=memory(group))
                        .remote(dataset, column, name, partitions, centroids, group) for group in groups])
    dataset.commit_existing_index_segments(name, column, segments)
    table.checkout_latest()  # the commit was made through another handle
    return len(segments)


def _train_centroids(dataset, column: str, partitions: int) -> pa.FixedSizeListArray:
    from lance.indices import IndicesBuilder

    return IndicesBuilder(dataset, column).train_ivf(partitions, distance_type="cosine").centroids


def _index_segment(dataset, column: str, name: str, partitions: int, centroids, fragment_ids: list[int]):
    """One segment of the index: the vectors of `fragment_ids`, written under the table's
    _indices/, not yet part of it (the driver commits it)."""
    return dataset.create_index_uncommitted(
        column, "IVF_HNSW_SQ", name=name, metric="cosine", num_partitions=partitions,
        ivf_centroids=centroids, fragment_ids=fragment_ids, replace=True)


def _ann_segments(table, column: str) -> dict | None:
    """The ANN index on `column` as segments: the rows it was trained on (those of the segments
    its build made, all of one table version), the segments and rows added since (later segments
    and rows in none), and its partitions. Rows are counted as lance counts unindexed ones: every
    row of a fragment, with a vector or without."""
    # Statistics without each segment's centroids (up to 4,096 x dim floats each).
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    dataset = table.to_lance()
    for index in table.list_indices():
        if list(index.columns) == [column] and index.index_type != "FTS":
            fragment_rows = _fragment_rows(dataset)
            segments = [(i["version"], sum(fragment_rows.get(f, 0) for f in i["fragment_ids"]))
                        for i in dataset.list_indices() if i["name"] == index.name]
            first = min(version for version, _ in segments)
            stats = dataset.stats.index_stats(index.name)
            return {"name": index.name, "trained": sum(n for v, n in segments if v == first),
                    "added_segments": sum(1 for v, _ in segments if v != first),
                    "added": sum(n for v, n in segments if v != first) + stats["num_unindexed_rows"],
                    "partitions": stats["segments"][0]["num_partitions"]}
    return None


def _add_to_index(table, name: str) -> None:
    """The rows an index lacks, indexed as a segment of their own (in a Ray task on Ray)."""
    _where_the_index_is_built(_index_added_rows, table.to_lance(), name)
    table.checkout_latest()  # the change was made through another handle


def _index_added_rows(dataset, name: str) -> None:
    # num_indices_to_merge=0: merging segments rebuilds every partition, and left an IVF index
    # of one partition.
    dataset.optimize.optimize_indices(index_names=[name], num_indices_to_merge=0)


def _full_text_on_workers(table) -> None:
    """The full-text index as one segment per ROWS_PER_INDEX_SEGMENT captions (whole fragments),
    each built by a Ray task, committed by the driver as one index (a search reads every
    segment, with the whole table's term statistics: its scores equal a one-segment index's)."""
    import ray

    dataset = table.to_lance()
    fragment_rows = _fragment_rows(dataset)
    groups = _fragment_groups(fragment_rows, ROWS_PER_INDEX_SEGMENT)
    if not groups:  # an empty table: an empty index, built here, holds nothing
        _full_text_segment(dataset, None)
        table.checkout_latest()
        return
    build = ray.remote(_full_text_segment).options(
        num_cpus=1, memory=min(FULL_TEXT_TASK_BYTES, _largest_node_memory()))
    segments = ray.get([build.remote(dataset, group) for group in groups])
    dataset.commit_existing_index_segments(FULL_TEXT_INDEX, FULL_TEXT_COLUMN, segments)
    table.checkout_latest()  # the commit was made through another handle


def _full_text_segment(dataset, fragment_ids: list[int] | None):
    """The full-text index over `fragment_ids`: a segment, written under the table's _indices/
    and not yet part of it (the driver commits it), by one core in FULL_TEXT_BUILD_MIB;
    None: the whole index, committed, built by every core of this machine."""
    if fragment_ids is None:
        return dataset.create_scalar_index(FULL_TEXT_COLUMN, "INVERTED", name=FULL_TEXT_INDEX,
                                           replace=True, **FULL_TEXT_PARAMS)
    return dataset.create_index_uncommitted(
        FULL_TEXT_COLUMN, "INVERTED", name=FULL_TEXT_INDEX, replace=True, fragment_ids=fragment_ids,
        num_workers=1, memory_limit=FULL_TEXT_BUILD_MIB, **FULL_TEXT_PARAMS)
