"""The LanceDB table: open it, load Parquet outputs (upsert on `id`), record and restore its versions."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.table.bulk_load import (
    create_table,
    shard_batches,
    shard_name,
    shards_to_load,
    table_uri,
    takes_type,
)
from pipeline.table.indexes import index_table
from pipeline.table.sql_text import sql_equals
from pipeline.write.shards import list_shards, shards_dataset
from schemas.embeddings import provenance_of, vector_dtype_of
from schemas.table import KEY

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
    except Exception as exc:
        raise _unreachable(db_uri, exc) from None


def _unreachable(db_uri: str, exc: Exception) -> Exception:
    """What to raise for `exc`: an unreachable store is said in one line (exit 75), not a
    traceback; anything else is itself."""
    if not storage.is_unavailable(exc):
        return exc
    return storage.StorageUnavailable(
        f"{storage.redact(db_uri)}: storage unavailable ({storage.why_unavailable(exc)})")


def open_table(db_uri: str, name: str, storage_options: dict | None = None):
    """An existing table, for reading: a local path without a database is an error, never a
    new empty folder."""
    _check_database(db_uri)
    conn = connect(db_uri, storage_options)
    if name not in conn.table_names():
        raise no_such_table(db_uri, name, user_tables(conn.table_names()))
    return conn.open_table(name)


def _check_database(db_uri: str) -> None:
    if storage.is_local(db_uri) and not os.path.isdir(storage.filesystem(db_uri)[1]):
        raise ConfigError(f"{db_uri}: no database there (a LanceDB database is a folder made by "
                          f"an embed run given {named('db')}, or a load)")


def no_such_table(db_uri: str, name: str, tables: list[str]) -> ConfigError:
    return ConfigError(f"{db_uri} has no table '{name}' (tables: {', '.join(tables) or 'none'}); "
                       f"load embeddings into it first, or name another with {named('table_name')}")


def user_tables(names) -> list[str]:
    """The tables of `names` a user made: not the run records kept beside each (`NAME__runs`)."""
    return sorted(n for n in names if not n.endswith(RUNS_SUFFIX))


def table_names(db_uri: str, storage_options: dict | None = None) -> list[str]:
    """The user's tables in the database at `db_uri`, from its listing (no LanceDB client: its
    import alone takes seconds, and `sql` answers in under one)."""
    _check_database(db_uri)
    fs, root = storage.filesystem(db_uri, storage_options)
    try:
        listed = fs.ls(root.rstrip("/"), detail=False)
    except FileNotFoundError:
        listed = []
    except Exception as exc:
        raise _unreachable(db_uri, exc) from None
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in listed)
    return user_tables(name.removesuffix(".lance") for name in names if name.endswith(".lance"))


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
    conn = connect(db_uri, storage_options)
    table = conn.open_table(name) if name in conn.table_names() else conn.create_table(name, schema=schema)
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
    where = storage.redact(out) if storage.has_scheme(out) else storage.absolute(out)
    conn = connect(db_uri, storage_options)
    if name in conn.table_names():
        table = conn.open_table(name)
        loaded = _loaded_shards(conn, name, table, where)
        new = [s for s in shards if shard_name(s) not in loaded]
        _check_outputs_fit(table, name, shards_dataset(new or shards[:1], storage_options).schema)
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
        table = conn.open_table(name)
    index_table(table)
    changes = {"repeated_rows": reading.repeated_rows, "columns_added": added}
    record_run(conn, name, table.version, {
        "job": "load", "outputs": where, "inserted": inserted, "updated": updated,
        "version_time": _version_times(table)[table.version], "shards": [shard_name(s) for s in new],
        **{k: v for k, v in changes.items() if v}})
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "inserted": inserted,
            "updated": updated, "version": table.version,
            "shards_already_loaded": len(shards) - len(new), **changes}


def _check_outputs_fit(table, name: str, schema: pa.Schema) -> None:
    """Refuse outputs (of `schema`) whose vectors are another model's, or of another type, than
    those table `name` holds."""
    existing, incoming = table_provenance(table), provenance_of(schema)
    if existing and incoming and _model_of(existing) != _model_of(incoming):
        raise ConfigError(
            f"table '{name}' holds vectors of {_model_of(existing)}, the outputs are from "
            f"{_model_of(incoming)}: load them into another table with {named('table_name')}"
        )
    check_vector_dtype(table, vector_dtype_of(schema), "outputs")


def _loaded_shards(conn, name: str, table, where: str) -> set[str]:
    """The shards of the outputs at `where` whose rows the table holds as loaded, by the runs'
    records: the shards of the loads of `where` since the last job that wrote rows from
    anywhere else (a load of other outputs, a reembed), whose rows may have replaced them.

    Shards are never changed once published (a rewrite publishes a new name), so a shard loaded
    once needs no second load. A record counts only while its version is still the table's,
    with the same time: a `table restore` to before it drops it (and every later record), and so
    does a table dropped and made again under the same name. Changes made by other tools than
    ours are not seen: they are not recorded."""
    if _runs_name(name) not in conn.table_names():
        return set()
    runs = conn.open_table(_runs_name(name)).to_arrow().sort_by("table_version").to_pylist()
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
    conn = connect(db_uri, storage_options)
    return conn.open_table(name) if name in conn.table_names() else None


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
    conn = connect(db_uri, storage_options)
    removed = 0
    if replace:
        table = conn.create_table(name, data=rows, mode="overwrite", on_bad_vectors="null")
    else:
        table = conn.open_table(name)
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
        record_run(conn, name, table.version, record)
    # else nothing changed: no new version, the indexes are still current, nothing to record
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "version": table.version,
            "deleted": removed}


RUNS_SUFFIX = "__runs"


def _runs_name(name: str) -> str:
    return f"{name}{RUNS_SUFFIX}"


def record_run(conn, name: str, version: int, details: dict) -> None:
    """What a job changed, kept in a small table beside the embeddings (local or object storage)."""
    row = pa.table({"table_version": [int(version)], "time": [datetime.now(timezone.utc).isoformat()],
                    "job": [str(details.get("job"))],
                    "details": [json.dumps(details, sort_keys=True, default=str)]})
    if _runs_name(name) in conn.table_names():
        conn.open_table(_runs_name(name)).add(row)
    else:
        conn.create_table(_runs_name(name), data=row)


def table_versions(db_uri: str, name: str, storage_options: dict | None = None) -> list[dict]:
    """The table's versions, oldest first, each with what made it: the job's record where a job
    of ours finished there, else the table format's own record of the change."""
    table = open_table(db_uri, name, storage_options)
    conn = connect(db_uri, storage_options)
    runs = {}
    if _runs_name(name) in conn.table_names():
        for run in conn.open_table(_runs_name(name)).to_arrow().to_pylist():
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
