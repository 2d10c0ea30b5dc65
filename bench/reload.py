"""A load after a run added rows to outputs already in a table: what `load` does now (upsert the
new shards, add their rows to the indexes as a segment) against the baseline of upserting every
row and training the indexes again (what `load` did before), from the same table in the same run.

    python -m bench.reload [--rows 100000] [--added 1000 ...] [--dim 768] [--queries 100]

The outputs are N rows in shards of 10,000 with CLIP-shaped image and text vectors (see
bench/query.py); the table is loaded from them once. Then for each --added K: K more rows in a
new shard, loaded into a copy of that table both ways. Both tables are then asked for recall@10 of
the indexed search against an exact scan (`altclip table index`'s measure) on the same sampled rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from bench.query import Clustered
from pipeline.table.recall import index_recall
from pipeline.table.indexes import index_table
from pipeline.table.store import load_outputs, open_table
from pipeline.write.shards import outputs_dataset, write_shard
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema
from schemas.table import KEY

SHARD_ROWS = 10_000
TABLE = "embeddings"


def _shard(schema: pa.Schema, draw, start: int, rows: int) -> pa.Table:
    columns = {name: pa.nulls(rows, schema.field(name).type) for name in schema.names}
    columns["id"] = pa.array([f"row-{start + i:010d}" for i in range(rows)])
    columns["caption"] = pa.array([f"caption {start + i}" for i in range(rows)])
    dim = schema.field(IMAGE_EMBEDDING).type.list_size
    for column in (IMAGE_EMBEDDING, TEXT_EMBEDDING):
        columns[column] = pa.FixedSizeListArray.from_arrays(
            pa.array(draw(rows).reshape(-1)), dim).cast(schema.field(column).type)
    return pa.table(columns, schema=schema)


def _timed(step) -> float:
    started = time.perf_counter()
    step()
    return round(time.perf_counter() - started, 2)


def _everything_again(out: str, db: str) -> None:
    """The baseline: every output row upserted, every index trained again."""
    table = open_table(db, TABLE)
    rows = outputs_dataset(out).scanner().to_reader()
    table.merge_insert(KEY).when_matched_update_all().when_not_matched_insert_all() \
        .execute(rows, on_bad_vectors="null")
    index_table(table, retrain=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--added", type=int, nargs="+", default=[1_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-reload-")
    try:
        rng = np.random.default_rng(0)
        draw = Clustered(rng, args.rows, args.dim)
        schema = embeddings_schema(args.dim, [], {"model": "bench", "revision": "r", "dim": args.dim,
                                                 "vector_dtype": "float32"})
        out, db = os.path.join(work, "out"), os.path.join(work, "db")
        os.makedirs(out)
        for start in range(0, args.rows, SHARD_ROWS):
            write_shard(out, _shard(schema, draw, start, min(SHARD_ROWS, args.rows - start)))
        report = {"rows": args.rows, "dim": args.dim,
                  "first_load_s": _timed(lambda: load_outputs(out, db, TABLE)), "added": []}
        start = args.rows
        for added in args.added:
            write_shard(out, _shard(schema, draw, start, added))
            start += added
            baseline_db = os.path.join(work, f"db-baseline-{added}")
            shutil.copytree(db, baseline_db)
            now_s = _timed(lambda: load_outputs(out, db, TABLE))
            before_s = _timed(lambda: _everything_again(out, baseline_db))
            recall = {name: index_recall(open_table(where, TABLE), IMAGE_EMBEDDING, args.queries)["recall"]
                      for name, where in (("now", db), ("baseline", baseline_db))}
            report["added"].append({"rows": added, "load_s": now_s, "baseline_s": before_s,
                                    "speedup": round(before_s / now_s, 1),
                                    "recall_at_10": recall["now"], "baseline_recall_at_10": recall["baseline"]})
            shutil.rmtree(baseline_db)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
