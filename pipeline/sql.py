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
    visible = []
    if db_uri:
        # A Lance dataset is an Arrow dataset: DuckDB scans it lazily, pushing down
        # projections and filters.
        con.register(table_name, open_table(db_uri, table_name, storage_options).to_lance())
        visible.append(f"{table_name} (the table in {db_uri})")
    if outputs:
        shards = list_shards(outputs, storage_options)
        if not shards:
            raise ConfigError(f"--parquet {outputs} holds no part-*.parquet files")
        fs, _ = storage.filesystem(shards[0], storage_options)
        paths = [storage.filesystem(s, storage_options)[1] for s in shards]
        con.register("outputs", pads.dataset(paths, format="parquet",
                                              filesystem=storage.arrow_filesystem(fs)))
        visible.append(f"outputs (the Parquet under {outputs})")
    try:
        result = con.sql(query).to_arrow_table()
    except duckdb.CatalogException as exc:
        raise ConfigError(f"SQL: {str(exc).splitlines()[0]} The query can name: "
                          f"{'; '.join(visible)}") from None
    except duckdb.Error as exc:
        raise ConfigError(f"SQL: {str(exc).splitlines()[0]}") from None
    return result.rename_columns(unique_names(result.column_names))


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
