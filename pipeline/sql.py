"""SQL over the table and the Parquet outputs with DuckDB, reading them in place (no copy into
Python): the table is visible by its name, the outputs as `outputs`."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.table import open_table
from pipeline.writer import list_shards


def run_sql(query: str, db_uri: str | None, table_name: str, outputs: str | None,
            storage_options: dict | None = None) -> pa.Table:
    """The query's result. Vector columns are DuckDB arrays: `array_cosine_similarity`,
    `array_inner_product` and `array_distance` work on them."""
    con = duckdb.connect()
    if db_uri:
        # A Lance dataset is an Arrow dataset: DuckDB scans it lazily, pushing down
        # projections and filters.
        con.register(table_name, open_table(db_uri, table_name, storage_options).to_lance())
    if outputs:
        shards = list_shards(outputs, storage_options)
        if not shards:
            raise ConfigError(f"--parquet {outputs} holds no part-*.parquet files")
        fs, _ = storage.filesystem(shards[0], storage_options)
        paths = [storage.filesystem(s, storage_options)[1] for s in shards]
        con.register("outputs", pads.dataset(paths, format="parquet",
                                              filesystem=storage.arrow_filesystem(fs)))
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.Error as exc:
        raise ConfigError(f"SQL: {str(exc).splitlines()[0]}") from None
