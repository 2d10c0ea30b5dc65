"""Vector search quality and latency: recall@10 of the ANN index against exact search, and
p50/p99 query latency, on random unit vectors in a LanceDB table built the way `load` builds it.

    python -m bench.query --rows 100000 [--dim 768] [--queries 200] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import lancedb
import numpy as np
import pyarrow as pa

from pipeline.table import SEARCH_NPROBES, SEARCH_REFINE_FACTOR, index_table
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING


def _unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _table(db, rows: int, dim: int, rng):
    def batches():
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            vectors = [pa.FixedSizeListArray.from_arrays(pa.array(_unit(rng, n, dim).reshape(-1)), dim)
                       for _ in range(2)]
            yield pa.RecordBatch.from_pydict({
                "id": [f"r{i}" for i in range(start, start + n)],
                "caption": [f"caption {i}" for i in range(start, start + n)],
                IMAGE_EMBEDDING: vectors[0], TEXT_EMBEDDING: vectors[1]})

    schema = next(batches()).schema
    return db.create_table("embeddings", data=pa.RecordBatchReader.from_batches(schema, batches()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", nargs="*", default=[(8, 1), (24, 1), (8, 10), (24, 10), (48, 20)],
                        type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="NPROBES,REFINE pairs to measure besides the defaults")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    db = lancedb.connect(tempfile.mkdtemp(prefix="bench-query-"))
    started = time.perf_counter()
    table = _table(db, args.rows, args.dim, rng)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    built = index_table(table)
    index_s = time.perf_counter() - started
    queries = _unit(rng, args.queries, args.dim)

    def run(exact: bool, nprobes: int | None = None, refine: int | None = None):
        latencies, results = [], []
        for q in queries:
            query = table.search(q, vector_column_name=IMAGE_EMBEDDING).distance_type("cosine").limit(10)
            if exact:
                query = query.bypass_vector_index()
            else:
                query = query.nprobes(nprobes or SEARCH_NPROBES).refine_factor(refine or SEARCH_REFINE_FACTOR)
            t = time.perf_counter()
            ids = [r["id"] for r in query.select(["id", "_distance"]).to_list()]
            latencies.append(time.perf_counter() - t)
            results.append(ids)
        return np.asarray(latencies) * 1000, results

    exact_ms, truth = run(exact=True)
    ann_ms, found = run(exact=False)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
    # The trade-off around the defaults, measured on the same index and queries.
    sweep = []
    for nprobes, refine in args.sweep:
        ms, got = run(exact=False, nprobes=nprobes, refine=refine)
        sweep.append({"nprobes": nprobes, "refine_factor": refine,
                      "recall_at_10": round(float(np.mean([len(set(a) & set(b)) / 10
                                                           for a, b in zip(got, truth)])), 4),
                      "p50_ms": round(float(np.percentile(ms, 50)), 2),
                      "p99_ms": round(float(np.percentile(ms, 99)), 2)})
    report = {
        "rows": args.rows, "dim": args.dim, "queries": args.queries, "index": built,
        "load_seconds": round(load_s, 1), "index_seconds": round(index_s, 1),
        "recall_at_10": round(recall, 4),
        "ann_ms": {"p50": round(float(np.percentile(ann_ms, 50)), 2),
                   "p99": round(float(np.percentile(ann_ms, 99)), 2)},
        "exact_ms": {"p50": round(float(np.percentile(exact_ms, 50)), 2),
                     "p99": round(float(np.percentile(exact_ms, 99)), 2)},
        "defaults": {"nprobes": SEARCH_NPROBES, "refine_factor": SEARCH_REFINE_FACTOR},
        "sweep": sweep,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
