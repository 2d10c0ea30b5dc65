"""Near-duplicates in a table: its image or caption vectors read and grouped SemDeDup-style
(pipeline/table/near_duplicates.py), each row marked with the kept row it duplicates (`dup_of`,
`dup_score`, `dup_checked`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, DedupConfig, named
from pipeline.table.near_duplicates import PRIOR, Clusters, Grouping, cosine_cutoff, group_rows
from pipeline.table.sql_text import sql_equals
from pipeline.table.store import DEDUP_COLUMNS, connect, open_table, record_run, table_provenance
from schemas.embeddings import HEIGHT, WIDTH
from schemas.manifest import CAPTION, ID
from schemas.table import KEY, SEARCH_COLUMNS, SEARCH_NPROBES, SEARCH_REFINE_FACTOR

MARK_TYPES = (pa.string(), pa.float32(), pa.bool_())  # dup_of, dup_score, dup_checked

# Vectors the centroids are trained on, held as float16 (300 MiB at 768-d): better centroids
# split fewer near-copies from their original (`python -m bench.dedup --rows 1000000`, as for
# near_duplicates.py's figures; without its guests: recall 0.927 with 100,000, 0.959 with
# 200,000).
KMEANS_SAMPLE = 200_000
SCAN_ROWS = 16_384  # rows per batch read from the table
ANN_NEIGHBOURS = 10  # nearest rows an incremental run asks the vector index for, per new row
QUERY_BATCH = 256  # new rows per vector search call


def dedup_table(config: DedupConfig) -> dict:
    """Mark the near-duplicates of a table's image or caption vectors; one new table version."""
    table = open_table(config.db, config.table_name, config.storage_options)
    vector = SEARCH_COLUMNS[config.against]
    dup_of, score, checked = DEDUP_COLUMNS[config.against]
    needed = [vector] + _priority_columns(config.keep)
    missing = [c for c in needed if c not in table.schema.names]
    if missing:
        raise ConfigError(f"table '{config.table_name}' has no {', '.join(missing)} column: "
                          f"keep {config.keep!r} against {config.against} needs {', '.join(needed)}")
    full = config.full or checked not in table.schema.names
    dataset = table.to_lance()  # this version is read twice, in the same order
    # Full: every row. Incremental: rows never checked (new, or cleared by an upsert) and rows
    # whose kept row is gone or changed; each compared with the kept rows through the index.
    filters = [None] if full else _incremental_filters(dataset, dup_of, checked)
    columns = [ID, vector] + _priority_columns(config.keep)
    prior_of = None if full else _PriorSearch(table, vector, dup_of, checked, config.threshold)
    to_check = dataset.count_rows() if full else sum(dataset.count_rows(filter=f) for f in filters)
    rows = _first_pass(_valid_batches(dataset, columns, filters, vector), vector, config.keep,
                       to_check, prior_of)
    counts = {"job": "dedup", "against": config.against, "threshold": config.threshold,
              "keep": config.keep, "mode": "full" if full else "incremental",
              "rows_checked": len(rows.ids), "duplicates": 0, "groups": 0}
    if not len(rows.ids):
        if full and table.count_rows():
            raise ConfigError(f"table '{config.table_name}' holds no {config.against} vectors: "
                              f"embed them with {named('towers')} {config.against}")
        return {**counts, "version": table.version, "changed": False, "random_weights": _random_weights(table)}
    clusters = Clusters.train(rows.sample, len(rows.ids))
    rows.sample = None  # the comparisons hold their own vectors
    vectors = (_unit_vectors(batch.column(vector))
               for batch in _valid_batches(dataset, [vector], filters, vector))
    grouping = group_rows(vectors, _ranks(rows.ids, rows.keys, config.keep), config.threshold,
                          clusters, rows.prior_scores)
    marks = _marks(rows.ids, grouping, rows.prior_ids, (dup_of, score, checked))
    if checked not in table.schema.names:
        table.add_columns(pa.schema([pa.field(name, kind) for name, kind in
                                     zip(DEDUP_COLUMNS[config.against], MARK_TYPES)]))
    # Only the three columns are rewritten, beside the others: whole-row upserts would move every
    # row out of the vector index (measured: 0 of 20,000 rows indexed after one).
    (table.to_lance().merge_insert(KEY).when_matched_update_all().write_mode("rewrite_columns")
     .execute(marks))
    table.checkout_latest()
    duplicated = marks.column(dup_of).drop_null()
    counts.update(duplicates=len(duplicated), groups=len(pc.unique(duplicated)))
    record_run(connect(config.db, config.storage_options), config.table_name, table.version, counts)
    return {**counts, "version": table.version, "changed": True, "random_weights": _random_weights(table)}


def _random_weights(table) -> bool:
    """Whether the table's vectors come from a model of random weights (its groups mean nothing)."""
    return bool((table_provenance(table) or {}).get("random_weights"))


def _priority_columns(keep: str) -> list[str]:
    return {"first": [], "largest": [WIDTH, HEIGHT], "longest": [CAPTION]}[keep]


def _ranks(ids: pa.Array, keys: pa.Table, keep: str) -> np.ndarray:
    """Each row's place in keep order, 0 kept first. first: the smallest id; largest: the most
    pixels (width x height); longest: the most characters of caption; ties go to the smallest
    id. Ids compare by code point ("row-10" before "row-9")."""
    sort = [(ID, "ascending")]
    columns = {ID: ids}
    if keep == "largest":
        area = pc.multiply(pc.cast(pc.fill_null(keys.column(WIDTH), 0), pa.int64()),
                           pc.cast(pc.fill_null(keys.column(HEIGHT), 0), pa.int64()))
        columns, sort = {"key": area, **columns}, [("key", "descending")] + sort
    elif keep == "longest":
        length = pc.utf8_length(pc.fill_null(keys.column(CAPTION), ""))
        columns, sort = {"key": length, **columns}, [("key", "descending")] + sort
    order = pc.sort_indices(pa.table(columns), sort_keys=sort).to_numpy()
    ranks = np.empty(len(ids), np.int64)
    ranks[order] = np.arange(len(ids))
    return ranks


def _incremental_filters(dataset, dup_of: str, checked: str) -> list[str]:
    """Rows an incremental run checks: never checked, or duplicates of a row that is no longer
    kept (deleted, or upserted since and so unchecked)."""
    marks = dataset.to_table(columns=[ID, dup_of, checked])
    kept = marks.filter(pc.and_(pc.fill_null(marks.column(checked), False),
                                pc.is_null(marks.column(dup_of)))).column(ID)
    duplicates = marks.filter(pc.is_valid(marks.column(dup_of)))
    orphans = duplicates.filter(pc.invert(pc.is_in(duplicates.column(dup_of), value_set=kept)))
    ids = orphans.column(ID).to_pylist()
    return [f"{checked} IS NULL"] + [sql_equals(ID, ids[s:s + 1000]) for s in range(0, len(ids), 1000)]


def _valid_batches(dataset, columns: list[str], filters: list[str | None],
                   vector: str) -> Iterator[pa.RecordBatch]:
    """The rows with a vector, in the same order on every call."""
    for where in filters:
        for batch in dataset.to_batches(columns=columns, filter=where, batch_size=SCAN_ROWS,
                                        scan_in_order=True):
            valid = batch.column(vector).is_valid()
            if batch.num_rows and pc.any(valid).as_py():
                yield batch.filter(valid)


def _unit_vectors(column: pa.Array) -> np.ndarray:
    """(rows, dim) float32 of unit length (float16 tables included)."""
    dim = column.type.list_size
    x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


@dataclass
class _Rows:
    """The rows to check, from a first read: ids and keep keys, a sample of their vectors for
    k-means, and (incremental) each one's best kept row from before."""

    ids: pa.Array
    keys: pa.Table
    sample: np.ndarray | None  # float16: half the memory, and as good for placing centroids
    prior_ids: pa.Array | None
    prior_scores: np.ndarray | None


def _first_pass(batches: Iterable[pa.RecordBatch], vector: str, keep: str, to_check: int,
                prior_of: _PriorSearch | None) -> _Rows:
    stride = max(1, math.ceil(to_check / KMEANS_SAMPLE))
    ids, keys, sample, prior_ids, prior_scores, seen = [], [], [], [], [], 0
    for batch in batches:
        x = _unit_vectors(batch.column(vector))
        ids.append(batch.column(ID))
        keys.append(pa.table({c: batch.column(c) for c in _priority_columns(keep)}))
        sample.append(x[(-seen) % stride::stride].astype(np.float16))  # a copy, not a view of x
        seen += len(x)
        if prior_of is not None:
            found_ids, found_scores = prior_of(x)
            prior_ids.append(found_ids)
            prior_scores.append(found_scores)
    return _Rows(
        ids=pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
        keys=pa.concat_tables(keys) if keys else pa.table({}),
        sample=np.concatenate(sample) if sample else np.zeros((0, 1), np.float16),
        prior_ids=(pa.concat_arrays(prior_ids) if prior_ids else pa.array([], pa.string()))
        if prior_of is not None else None,
        prior_scores=(np.concatenate(prior_scores) if prior_scores else np.zeros(0, np.float32))
        if prior_of is not None else None)


class _PriorSearch:
    """Each new row's best kept row among the table's: its nearest rows through the vector
    index (an exact scan where there is none), each taken as itself where it is kept, or as the
    kept row it duplicates; cosines recomputed exactly from the vectors.

    No filter on the search itself: LanceDB runs a prefilter once per query vector over the
    whole table (54 ms a query on 20,000 rows, against 5 ms without), and a postfilter would
    lose a kept row behind its own near-copies."""

    def __init__(self, table, vector: str, dup_of: str, checked: str, threshold: float):
        self.table, self.vector, self.dup_of, self.checked = table, vector, dup_of, checked
        self.cutoff = cosine_cutoff(threshold)

    def __call__(self, x: np.ndarray) -> tuple[pa.Array, np.ndarray]:
        best_ids, best = [None] * len(x), np.full(len(x), -np.inf, np.float32)
        for start in range(0, len(x), QUERY_BATCH):
            queries = x[start:start + QUERY_BATCH]
            for query, row_id, cosine in self._kept_near(queries):
                if cosine >= self.cutoff and cosine > best[start + query]:
                    best_ids[start + query], best[start + query] = row_id, cosine
        return pa.array(best_ids, pa.string()), best

    def _kept_near(self, queries: np.ndarray) -> Iterator[tuple[int, str, float]]:
        found = (self.table.search([q for q in queries], vector_column_name=self.vector)
                 .distance_type("cosine").nprobes(SEARCH_NPROBES).refine_factor(SEARCH_REFINE_FACTOR)
                 .limit(ANN_NEIGHBOURS)
                 .select([ID, self.vector, self.dup_of, self.checked, "_distance"]).to_arrow())
        query = (found.column("query_index").to_numpy() if "query_index" in found.column_names
                 else np.zeros(found.num_rows, np.int64))
        kept = pc.and_(pc.fill_null(found.column(self.checked), False),
                       pc.is_null(found.column(self.dup_of)))
        kept = pc.and_(kept, pc.is_valid(found.column(self.vector))).to_numpy(zero_copy_only=False)
        pointed = pc.is_valid(found.column(self.dup_of)).to_numpy(zero_copy_only=False)
        targets = pc.unique(found.column(self.dup_of).drop_null()).to_pylist()
        vectors = {}
        if targets:  # the kept rows that near rows duplicate, if still kept
            where = f"{sql_equals(ID, targets)} AND {self.checked} = true AND {self.dup_of} IS NULL"
            rows = self.table.search().where(where).select([ID, self.vector]).limit(None).to_arrow()
            vectors = dict(zip(rows.column(ID).to_pylist(),
                               _unit_vectors(rows.column(self.vector).combine_chunks())))
        ids, dup_of = found.column(ID).to_pylist(), found.column(self.dup_of).to_pylist()
        if kept.any():
            hit = _unit_vectors(found.column(self.vector).filter(pa.array(kept)).combine_chunks())
            for q, row_id, v in zip(query[kept], np.asarray(ids, object)[kept], hit):
                yield int(q), row_id, float(v @ queries[q])
        for q, target in zip(query[pointed], np.asarray(dup_of, object)[pointed]):
            if target in vectors:
                yield int(q), target, float(vectors[target] @ queries[q])


def _marks(ids: pa.Array, grouping: Grouping, prior_ids: pa.Array | None,
           names: tuple[str, str, str]) -> pa.Table:
    """id + dup_of, dup_score, dup_checked (under the side's names) for every row checked."""
    target = grouping.target
    dup_of = ids.take(pa.array(np.maximum(target, 0)))
    dup_of = pc.if_else(pa.array(target >= 0), dup_of, pa.nulls(len(ids), pa.string()))
    if prior_ids is not None:
        dup_of = pc.if_else(pa.array(target == PRIOR), prior_ids, dup_of)
    score = pa.array(grouping.score, pa.float32(), mask=np.isnan(grouping.score))
    return pa.table({ID: ids, names[0]: dup_of, names[1]: score,
                     names[2]: pa.array(np.ones(len(ids), bool))})
