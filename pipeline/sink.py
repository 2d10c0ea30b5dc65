"""The write stage of the Ray Data plan: each write task publishes one Parquet shard and
reports its rows and timing."""

from __future__ import annotations

import time

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline import storage
from pipeline.timing import pop_figures
from pipeline.writer import conform, run_stamp, write_shard


class ParquetShardSink(Datasink):
    """Each write task writes one shard under a temporary name and renames it into place, so a
    reader listing `part-*.parquet` never sees half a shard."""

    def __init__(self, out: str, schema: pa.Schema, model_label: str, rows_per_shard: int,
                 storage_options: dict | None = None, patience_s: float = storage.DEFAULT_PATIENCE_S,
                 counter=None):
        self.out = out.rstrip("/")
        self.patience_s = patience_s
        self.counter = counter  # progress.RowCounter: the live log shows the write stage too
        self.schema = schema
        self.model_label = model_label
        self.rows_per_shard = rows_per_shard
        self.storage_options = storage_options or {}
        self.stamp = run_stamp()
        self.shards: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0}
        table, figures = pop_figures(pa.concat_tables(tables, promote_options="default"))
        started = time.perf_counter()
        name = write_shard(self.out, conform(table, self.schema, self.model_label),
                           self.storage_options, self.patience_s, self.stamp)
        figures["seconds"]["write"] = time.perf_counter() - started
        figures["nodes"]["write"] = [ray.get_runtime_context().get_node_id()]
        figures["timeline"]["write"] = [[time.time(), table.num_rows]]
        if self.counter is not None:
            self.counter.add_stages.remote(table.num_rows, {"write": figures["seconds"]["write"]})
        return {"rows": table.num_rows, "shard": name, **figures}

    def on_write_complete(self, write_result) -> None:
        self.shards = [r for r in write_result.write_returns if r["rows"]]
