"""SQL over a database's tables and the Parquet outputs with DuckDB, reading them in place (no
copy into Python): each table is visible by its name, the outputs as `outputs`, and nothing
else."""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config import ConfigError, named
from pipeline.table.store import no_such_table, open_dataset, table_names
from pipeline.write.shards import outputs_dataset


def run_sql(query: str, db_uri: str | None, table_name: str | None, outputs: str | None,
            storage_options: dict | None = None, allow_file_access: bool = False) -> pa.Table:
    """The query's result. Every table of the database is visible by its name (not the run
    records kept beside each); `table_name`, when given, must be one of them. Vector columns
    are DuckDB arrays: `array_cosine_similarity`, `array_inner_product` and `array_distance`
    work on them.

    Unless `allow_file_access`, the query can read only the tables and the outputs: reading or
    writing files (`read_csv`, `COPY`, `ATTACH` of a file), `INSTALL`/`LOAD` of an extension and
    any `SET` are refused (see lock_out_external_access)."""
    con = duckdb.connect()
    # DuckDB's Python client would otherwise read any Python variable a query names (`outputs`
    # without --parquet was this function's own None): the query sees what is registered.
    con.execute("SET python_enable_replacements = false")
    visible = []
    if db_uri:
        tables = table_names(db_uri, storage_options)
        if table_name is not None and table_name not in tables:
            raise no_such_table(db_uri, table_name, tables)
        for name in tables:
            # A Lance dataset is an Arrow dataset: DuckDB scans it lazily, pushing down
            # projections and filters; opening one reads only its manifest.
            con.register(name, readable_by_duckdb(open_dataset(db_uri, name, storage_options)))
        visible.append(f"{', '.join(tables)} (the table{'s' if len(tables) > 1 else ''} in {db_uri})"
                       if tables else f"no table ({db_uri} holds none)")
    if outputs:
        dataset = outputs_dataset(outputs, storage_options)
        if dataset is None:
            raise ConfigError(f"{named('parquet')} {outputs} holds no part-*.parquet files")
        con.register("outputs", readable_by_duckdb(dataset))
        visible.append(f"outputs (the Parquet under {outputs})")
    if not allow_file_access:
        # After registering: the table and outputs are Arrow datasets, read by Python, not by
        # DuckDB's file system, so they stay readable with the lock on.
        lock_out_external_access(con)
    try:
        result = con.sql(query).to_arrow_table()
    except duckdb.CatalogException as exc:
        hint = (f"; add {named('parquet')} OUT for the outputs of an embed run"
                if not outputs and "name outputs does not exist" in str(exc) else "")
        raise ConfigError(f"SQL: {str(exc).splitlines()[0]} The query can name: "
                          f"{'; '.join(visible) or 'nothing'}{hint}") from None
    except duckdb.Error as exc:
        refused = None if allow_file_access else refused_by_lock(exc)
        if refused:
            raise ConfigError(f"SQL: {refused}, which is refused unless "
                              f"{named('allow_file_access')}") from None
        raise ConfigError(f"SQL: {str(exc).splitlines()[0]}") from None
    return result.rename_columns(unique_names(result.column_names))


def lock_out_external_access(con: duckdb.DuckDBPyConnection) -> None:
    """Leave the connection only what is already registered in it: no file read or written
    (`read_csv`, `COPY ... TO`, `ATTACH 'file'`, `EXPORT DATABASE`; DuckDB's own spilling to its
    temp folder still works), no URL, no extension installed or loaded, no secret stored. Then
    lock every setting: enable_external_access cannot be turned back on once off, but other
    settings would reach the file system again (`temp_directory` spills into any folder), so no
    `SET` or `PRAGMA` setting is left to the query."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def refused_by_lock(exc: duckdb.Error) -> str | None:
    """What the query tried that lock_out_external_access refused (None: something else failed)."""
    message = str(exc).splitlines()[0]
    if isinstance(exc, duckdb.PermissionException):
        # "Permission Error: Cannot access file "/etc/passwd" - file system operations are
        # disabled by configuration": the file, without DuckDB's words for the lock.
        return (f"the query tried to read or write files or load extensions "
                f"({message.split(': ', 1)[-1].split(' - ')[0]})")
    setting = re.search(r'option "([^"]+)" - the configuration has been locked', message)
    if setting:
        return (f"the query tried to change the DuckDB setting {setting[1]} (settings are locked "
                f"so that no query can read or write files or load extensions)")
    return None


def readable_by_duckdb(dataset: pads.Dataset) -> pads.Dataset:
    """The dataset as DuckDB can read it, still lazily: half floats (vectors of
    `--vector-dtype float16`), which DuckDB cannot read at all ("Unsupported Internal Arrow Type
    e"), shown as float32, so vectors of either type are `FLOAT[D]` to DuckDB; and a filter on
    a vector column (`WHERE image_embedding IS NOT NULL`), which a Lance dataset refuses ("No
    match for FieldRef"), evaluated on the batches instead of pushed down."""
    schema = pa.schema([f.with_type(_without_half_floats(f.type)) for f in dataset.schema],
                       metadata=dataset.schema.metadata)
    return _ScanForDuckDB(dataset, schema)


def _without_half_floats(arrow_type: pa.DataType) -> pa.DataType:
    if pa.types.is_float16(arrow_type):
        return pa.float32()
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.list_(_without_half_floats(arrow_type.value_type), arrow_type.list_size)
    if pa.types.is_list(arrow_type):
        return pa.list_(_without_half_floats(arrow_type.value_type))
    if pa.types.is_large_list(arrow_type):
        return pa.large_list(_without_half_floats(arrow_type.value_type))
    return arrow_type


class _ScanForDuckDB(pads.Dataset):
    """A dataset scanned through the one beneath it, batch by batch (see readable_by_duckdb).

    DuckDB asks a registered dataset for its schema, then for a scanner of the columns and rows
    a query needs, once per scan: a query that reads it twice (a self-join, a UNION) gets two
    scans, which a one-shot RecordBatchReader could not give. Projections and filters go down
    to the dataset beneath; nothing is read whole into memory.
    """

    def __init__(self, dataset: pads.Dataset, schema: pa.Schema):
        # Not the base's constructor, which no subclass calls (lance.LanceDataset neither).
        self._dataset = dataset
        self._schema = schema
        self._lists = [f.name for f in dataset.schema if pa.types.is_fixed_size_list(f.type)
                       or pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def scanner(self, columns: list[str] | None = None, filter=None, **options) -> pads.Scanner:
        names = list(columns) if columns is not None else self._schema.names
        wanted = pa.schema([self._schema.field(name) for name in names])
        # The columns the filter may name (a name inside a string literal only adds a column
        # to the read); one of them a list: the filter is evaluated here, on those columns.
        named = [name for name in self._dataset.schema.names
                 if filter is not None and name in str(filter)]
        here = any(name in self._lists for name in named)
        read = names + [name for name in named if name not in names] if here else names
        batches = self._dataset.scanner(columns=read, filter=None if here else filter,
                                        **options).to_reader()

        def widened():
            for batch in batches:
                if here:
                    batch = batch.filter(filter).select(names)
                yield batch.cast(wanted)

        return pads.Scanner.from_batches(widened(), schema=wanted)


def unique_names(names: list[str]) -> list[str]:
    """Column names made unique as DuckDB's own client shows them (`id`, `id_1`, ...), never
    taking a name another column already has."""
    taken, seen, out = set(names), set(), []
    for name in names:
        unique, n = name, 0
        while unique in seen or (unique != name and unique in taken):
            n += 1
            unique = f"{name}_{n}"
        seen.add(unique)
        out.append(unique)
    return out
