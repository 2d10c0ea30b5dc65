"""What an ANN index costs in quality: recall@k of indexed search against exact search, on a
sample of the table's own vectors as queries, with both searches' latency."""

from __future__ import annotations

import time

import numpy as np

from schemas.manifest import ID
from schemas.table import SEARCH_NPROBES, SEARCH_REFINE_FACTOR


def sample_vectors(table, column: str, n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Up to `n` (id, vector) pairs of rows spread over the table (rows without a vector on
    `column` skipped)."""
    dataset = table.to_lance()
    rows = dataset.count_rows()
    rng = np.random.default_rng(seed)
    # Draw a few times more rows than wanted: some may lack a vector on this side.
    picks = np.sort(rng.choice(rows, size=min(rows, 4 * n), replace=False)) if rows else []
    taken = dataset.take(list(map(int, picks)), columns=[ID, column]).to_pylist()
    return [(r[ID], np.asarray(r[column], dtype=np.float32)) for r in taken if r[column] is not None][:n]


def index_recall(table, column: str, queries: int = 100, k: int = 10,
                 nprobes: int = SEARCH_NPROBES, refine_factor: int = SEARCH_REFINE_FACTOR) -> dict:
    """recall@k of `search`'s indexed query (same nprobes and refine factor) against an exact
    scan, averaged over sampled rows' vectors; each query's own row is left out of both lists
    (it is always found, and would lift the figure by 1/k)."""
    found, truth, ann_ms, exact_ms = [], [], [], []
    for own_id, vector in sample_vectors(table, column, queries):
        for exact, ids, ms in ((False, found, ann_ms), (True, truth, exact_ms)):
            query = (table.search(vector, vector_column_name=column).distance_type("cosine")
                     .limit(k + 1).select([ID, "_distance"]))
            query = query.bypass_vector_index() if exact else query.nprobes(nprobes).refine_factor(refine_factor)
            started = time.perf_counter()
            hits = [row[ID] for row in query.to_list()]
            ms.append((time.perf_counter() - started) * 1000)
            ids.append([h for h in hits if h != own_id][:k])
    if not truth:
        return {"queries": 0, "recall": None, "k": k}
    recall = np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(found, truth)])
    return {"queries": len(truth), "k": k, "recall": round(float(recall), 4),
            "ann_p50_ms": round(float(np.percentile(ann_ms, 50)), 2),
            "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 2)}
