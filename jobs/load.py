"""The load job: Parquet outputs of `embed` -> the LanceDB table (upsert on `id`)."""

from __future__ import annotations

from pipeline.config import LoadConfig
from pipeline.table import load_outputs


def run_load(config: LoadConfig) -> dict:
    return load_outputs(config.outputs, config.db, config.table_name, config.storage_options)
