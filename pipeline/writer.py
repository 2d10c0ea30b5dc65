"""Write Parquet shards (each published whole by a rename) and the run's summary."""

from __future__ import annotations

import collections
import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline import storage
from pipeline.timing import pop_stage_seconds
from schemas.embeddings import (
    IMAGE_EMBEDDING,
    IMAGE_ERROR,
    MODEL,
    TEXT_EMBEDDING,
    TEXT_ERROR,
    error_kind,
    provenance_of,
)

SHARD_PREFIX = "part-"
SUMMARY_NAME = "summary.json"


def conform(table: pa.Table, schema: pa.Schema, model_label: str) -> pa.Table:
    """The table in the output schema: columns in order and type; absent ones null."""
    columns = []
    for field in schema:
        if field.name == MODEL:
            columns.append(pa.array([model_label] * table.num_rows, pa.string()))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def shard_counts(table: pa.Table) -> dict:
    """Rows, vectors and errors by kind in one shard: what the summary adds up."""
    errors = collections.Counter()
    for column in (IMAGE_ERROR, TEXT_ERROR):
        side = column.split("_")[0]
        for value in table.column(column).drop_null().to_pylist():
            errors[f"{side}.{error_kind(value)}"] += 1
    return {
        "rows": table.num_rows,
        "image_ok": table.num_rows - table.column(IMAGE_EMBEDDING).null_count,
        "text_ok": table.num_rows - table.column(TEXT_EMBEDDING).null_count,
        "errors": dict(errors),
    }


class ParquetShardSink(Datasink):
    """Each write task writes one shard under a temporary name and renames it into place, so a
    reader listing `part-*.parquet` never sees half a shard."""

    def __init__(self, out: str, schema: pa.Schema, model_label: str, rows_per_shard: int,
                 storage_options: dict | None = None):
        self.out = out.rstrip("/")
        self.schema = schema
        self.model_label = model_label
        self.rows_per_shard = rows_per_shard
        self.storage_options = storage_options or {}
        self.shards: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "image_ok": 0, "text_ok": 0, "errors": {}, "seconds": {}}
        table, seconds = pop_stage_seconds(pa.concat_tables(tables, promote_options="default"))
        started = time.perf_counter()
        table = conform(table, self.schema, self.model_label)
        fs, path = storage.filesystem(self.out, self.storage_options)
        name = f"{SHARD_PREFIX}{uuid.uuid4().hex}.parquet"
        temporary = f"{path}/.{name}.tmp"
        with fs.open(temporary, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        fs.mv(temporary, f"{path}/{name}")
        seconds["write"] = time.perf_counter() - started
        return {**shard_counts(table), "seconds": seconds, "shard": name}

    def on_write_complete(self, write_result) -> None:
        self.shards = [r for r in write_result.write_returns if r["rows"]]


def list_shards(out: str, storage_options: dict | None = None) -> list[str]:
    """Published shard paths under an output URI (temporary files are hidden)."""
    fs, path = storage.filesystem(out, storage_options)
    if not fs.exists(path):
        return []
    return sorted(storage.unstrip(fs, p) for p in fs.glob(f"{path.rstrip('/')}/{SHARD_PREFIX}*.parquet"))


def read_output_provenance(out: str, storage_options: dict | None = None) -> dict | None:
    shards = list_shards(out, storage_options)
    if not shards:
        return None
    fs, path = storage.filesystem(shards[0], storage_options)
    with fs.open(path, "rb") as f:
        return provenance_of(pq.read_schema(f))


def summarize(shards: list[dict], rows_in: int, seconds_total: float, provenance: dict) -> dict:
    """The run's summary: counts that add up to the rows in, busy seconds per stage, rows/s."""
    errors = collections.Counter()
    stage_seconds = collections.Counter()
    for shard in shards:
        errors.update(shard["errors"])
        stage_seconds.update(shard["seconds"])
    rows_out = sum(s["rows"] for s in shards)
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "image_ok": sum(s["image_ok"] for s in shards),
        "text_ok": sum(s["text_ok"] for s in shards),
        "errors_by_kind": dict(sorted(errors.items())),
        "seconds_total": round(seconds_total, 3),
        "stage_busy_seconds": {k: round(v, 3) for k, v in sorted(stage_seconds.items())},
        "rows_per_second": round(rows_out / seconds_total, 2) if seconds_total else None,
        "shards": sorted(s["shard"] for s in shards),
        "provenance": provenance,
    }


def write_summary(out: str, summary: dict, storage_options: dict | None = None) -> str:
    fs, path = storage.filesystem(out, storage_options)
    target = f"{path.rstrip('/')}/{SUMMARY_NAME}"
    with fs.open(target, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return storage.unstrip(fs, target)
