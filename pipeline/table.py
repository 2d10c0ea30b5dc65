"""The LanceDB table: load Parquet outputs (upsert on `id`), keep its indexes, open it for search."""

from __future__ import annotations

import lancedb
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.writer import list_shards
from schemas.embeddings import VECTOR_COLUMNS, provenance_of
from schemas.table import ANN_INDEX_MIN_ROWS, FULL_TEXT_COLUMN, KEY


def connect(db_uri: str, storage_options: dict | None = None):
    return lancedb.connect(db_uri, storage_options=storage.lance_storage_options(db_uri, storage_options))


def open_table(db_uri: str, name: str, storage_options: dict | None = None):
    db = connect(db_uri, storage_options)
    if name not in db.table_names():
        raise ConfigError(
            f"{db_uri} has no table '{name}' (tables: {', '.join(db.table_names()) or 'none'}); "
            "load embeddings with `altclip load OUT --table DB` or name another with --name"
        )
    return db.open_table(name)


def table_provenance(table) -> dict | None:
    return provenance_of(table.schema)


def load_outputs(out: str, db_uri: str, name: str, storage_options: dict | None = None) -> dict:
    """Upsert every output row into the table by `id` (created on first load), then index it."""
    shards = list_shards(out, storage_options)
    if not shards:
        raise ConfigError(f"{out} holds no embeddings (no part-*.parquet): run `altclip embed` first")
    fs, _ = storage.filesystem(shards[0], storage_options)
    paths = [storage.filesystem(s, storage_options)[1] for s in shards]
    dataset = pads.dataset(paths, format="parquet", filesystem=storage.arrow_filesystem(fs))
    db = connect(db_uri, storage_options)
    if name in db.table_names():
        table = db.open_table(name)
        existing, incoming = table_provenance(table), provenance_of(dataset.schema)
        if existing and incoming and _model_of(existing) != _model_of(incoming):
            raise ConfigError(
                f"table '{name}' holds vectors of {_model_of(existing)}, the outputs are from "
                f"{_model_of(incoming)}: load them into another table with --name"
            )
        # Vectors of failed rows are null: keep the row ("null"), never drop it.
        result = (
            table.merge_insert(KEY).when_matched_update_all().when_not_matched_insert_all()
            .execute(dataset.scanner().to_reader(), on_bad_vectors="null")
        )
        inserted, updated = result.num_inserted_rows, result.num_updated_rows
    else:
        table = db.create_table(name, data=dataset.scanner().to_reader(), on_bad_vectors="null")
        inserted, updated = table.count_rows(), 0
    index_table(table)
    return {"uri": db_uri, "name": name, "rows": table.count_rows(), "inserted": inserted,
            "updated": updated, "version": table.version}


def _model_of(provenance: dict) -> tuple:
    return provenance.get("model"), provenance.get("revision"), provenance.get("dim")


def index_table(table) -> None:
    """Full-text index on captions; an ANN index per vector column once exact search gets slow."""
    table.create_fts_index(FULL_TEXT_COLUMN, replace=True)
    rows = table.count_rows()
    if rows < ANN_INDEX_MIN_ROWS:
        return  # exact search: every row is compared, which is fast at this size
    for column in VECTOR_COLUMNS:
        if table.count_rows(f"{column} IS NOT NULL") >= ANN_INDEX_MIN_ROWS:
            table.create_index(metric="cosine", vector_column_name=column,
                               index_type="IVF_HNSW_SQ", replace=True)
