"""Vector search quality and latency: recall@10 of the ANN index against exact search, and
p50/p99 query latency, in a LanceDB table built the way `load` builds it, for two vector sets:

- `random`: unit vectors drawn uniformly: no neighbourhood structure at all, the worst case for
  any index (every pair has cosine 0 +- 0.04; the true top 10 stand out by a few hundredths).
- `clustered`, shaped like real CLIP embeddings: a direction all vectors share, one of
  rows/100 topics, and an item's own part, weighted 0.6 / 0.6 / 0.5, so that unrelated items
  have cosine ~0.37, items of a topic ~0.74 (CLIP image vectors: ~0.4-0.5 and 0.7-0.9).
  Queries are new items of existing topics.

`--segments 1 4 16` measures the same vectors and queries with the index built as that many
segments, the way a load on Ray builds an index over more than ROWS_PER_INDEX_SEGMENT rows (a
Ray task per group of fragments, over centroids trained once): what segments cost a query.

    python -m bench.query --rows 100000 [--vectors random clustered] [--dim 768] [--queries 200]
                          [--json OUT.json] [--rows-per-partition N] [--sweep NPROBES,REFINE[,EF] ...]
                          [--segments N ...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import lancedb
import numpy as np
import pyarrow as pa

from pipeline.table import indexes as table_module
from pipeline.table.indexes import index_table
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING
from schemas.table import ROWS_PER_PARTITION, SEARCH_NPROBES, SEARCH_REFINE_FACTOR


def _unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Clustered:
    """Vectors with CLIP-like structure (see the module's docstring)."""

    def __init__(self, rng, rows: int, dim: int):
        self.rng, self.dim = rng, dim
        self.shared = _unit(rng, 1, dim)[0]
        self.topics = _unit(rng, max(1, rows // 100), dim)

    def __call__(self, n: int) -> np.ndarray:
        topic = self.topics[self.rng.integers(0, len(self.topics), n)]
        v = 0.6 * self.shared + 0.6 * topic + 0.5 * _unit(self.rng, n, self.dim)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _table(db, name: str, rows: int, dim: int, draw, fragments: int = 1):
    """The table, written in `fragments` appends of equal size (a fragment each, at least)."""
    per_fragment = math.ceil(rows / fragments)

    def batches(first: int, last: int):
        for start in range(first, last, 50_000):
            n = min(50_000, last - start)
            # Only the image column is searched here; an empty text column gets no index, which
            # would double the build time and change nothing measured.
            yield pa.RecordBatch.from_pydict({
                "id": [f"r{i}" for i in range(start, start + n)],
                "caption": [f"caption {i}" for i in range(start, start + n)],
                IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(draw(n).reshape(-1)), dim),
                TEXT_EMBEDDING: pa.nulls(n, pa.list_(pa.float32(), dim))})

    schema = next(batches(0, 1)).schema
    table = None
    for first in range(0, rows, per_fragment):
        data = pa.RecordBatchReader.from_batches(schema, batches(first, min(rows, first + per_fragment)))
        if table is None:
            table = db.create_table(name, data=data, on_bad_vectors="null")
        else:
            table.add(data, on_bad_vectors="null")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--vectors", nargs="+", choices=["random", "clustered"], default=["random", "clustered"])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", nargs="*", default=[(8, 1), (24, 1), (8, 10), (24, 10), (48, 20)],
                        type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="NPROBES,REFINE[,EF] to measure besides the defaults (EF: HNSW candidates)")
    parser.add_argument("--rows-per-partition", type=int, default=ROWS_PER_PARTITION,
                        help="IVF partition size to build the index with [the pipeline's]")
    parser.add_argument("--segments", nargs="+", type=int, default=[1],
                        help="build the index as this many segments, on Ray (each count measured)")
    args = parser.parse_args()
    if max(args.segments) > 1:
        import ray

        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    db = lancedb.connect(tempfile.mkdtemp(prefix="bench-query-"))
    reports = [_measure(db, shape, segments, args) for shape in args.vectors for segments in args.segments]
    print(json.dumps(reports, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=2)


def _measure(db, shape: str, segments: int, args) -> dict:
    rng = np.random.default_rng(0)  # the same vectors and queries for every segment count
    draw = (lambda n: _unit(rng, n, args.dim)) if shape == "random" else Clustered(rng, args.rows, args.dim)
    started = time.perf_counter()
    table = _table(db, f"{shape}-{segments}", args.rows, args.dim, draw, segments)
    load_s = time.perf_counter() - started
    # One segment per fragment group of this many rows, where there is more than one group.
    table_module.ROWS_PER_INDEX_SEGMENT = math.ceil(args.rows / segments) if segments > 1 else args.rows + 1
    started = time.perf_counter()
    built = index_table(table, args.rows_per_partition)
    index_s = time.perf_counter() - started
    queries = draw(args.queries)

    def run(exact: bool, nprobes: int | None = None, refine: int | None = None, ef: int | None = None):
        latencies, results = [], []
        for q in queries:
            query = table.search(q, vector_column_name=IMAGE_EMBEDDING).distance_type("cosine").limit(10)
            if exact:
                query = query.bypass_vector_index()
            else:
                query = query.nprobes(nprobes or SEARCH_NPROBES).refine_factor(refine or SEARCH_REFINE_FACTOR)
                if ef:
                    query = query.ef(ef)
            t = time.perf_counter()
            ids = [r["id"] for r in query.select(["id", "_distance"]).to_list()]
            latencies.append(time.perf_counter() - t)
            results.append(ids)
        return np.asarray(latencies) * 1000, results

    def recall(found):
        return round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])), 4)

    exact_ms, truth = run(exact=True)
    ann_ms, found = run(exact=False)
    # The trade-off around the defaults, measured on the same index and queries.
    sweep = []
    for nprobes, refine, *ef in args.sweep:
        ms, got = run(exact=False, nprobes=nprobes, refine=refine, ef=ef[0] if ef else None)
        sweep.append({"nprobes": nprobes, "refine_factor": refine, "ef": ef[0] if ef else None,
                      "recall_at_10": recall(got),
                      "p50_ms": round(float(np.percentile(ms, 50)), 2),
                      "p99_ms": round(float(np.percentile(ms, 99)), 2)})
    return {
        "vectors": shape, "rows": args.rows, "dim": args.dim, "queries": args.queries, "index": built,
        "segments": segments,
        "rows_per_partition": args.rows_per_partition,
        "load_seconds": round(load_s, 1), "index_seconds": round(index_s, 1),
        "recall_at_10": recall(found),
        "ann_ms": {"p50": round(float(np.percentile(ann_ms, 50)), 2),
                   "p99": round(float(np.percentile(ann_ms, 99)), 2)},
        "exact_ms": {"p50": round(float(np.percentile(exact_ms, 50)), 2),
                     "p99": round(float(np.percentile(exact_ms, 99)), 2)},
        "defaults": {"nprobes": SEARCH_NPROBES, "refine_factor": SEARCH_REFINE_FACTOR},
        "sweep": sweep,
    }


if __name__ == "__main__":
    main()
