"""Near-duplicates in a table: its image or caption vectors grouped SemDeDup-style, each row
marked with the kept row it duplicates (`dup_of`, `dup_score`, `dup_checked`)."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import ConfigError, check_table_name, named
from pipeline.table.sql_text import sql_equals
from pipeline.table.store import DEDUP_COLUMNS, connect, open_table, record_run
from schemas.embeddings import HEIGHT, IMAGE_EMBEDDING, TEXT_EMBEDDING, WIDTH
from schemas.manifest import CAPTION, ID
from schemas.table import DEFAULT_TABLE_NAME, KEY, SEARCH_NPROBES, SEARCH_REFINE_FACTOR

# Cosine at or above which a row duplicates a kept row. Not measured here: the real weights are
# never available, and the tests' tiny random-weight model puts different pictures as close as
# 0.990 (JPEG re-encodes and half-size copies of a picture 0.9994 and up, 70% crops 0.987 to
# 0.997: tests/test_dedup.py), which says nothing about CLIP's space. Taken from practice with
# CLIP image vectors (AltCLIP's image tower is CLIP's ViT-L/14): clip-retrieval's search back
# end, which serves LAION's ViT-L/14 indexes, drops results at cosine >= 0.94 to each other as
# duplicates (`get_non_uniques`); SemDeDup-style pipelines go down to 0.93 (NeMo Curator's
# example eps 0.07) for semantic duplicates, a looser notion than one picture re-encoded,
# resized or cropped. Groups here never chain (each duplicate is within the threshold of its
# kept row itself), so 0.94 groups no more than clip-retrieval's connected components do.
DEFAULT_THRESHOLD = 0.94
KEEP_POLICIES = ("first", "largest", "longest")
VECTOR_COLUMN = {"image": IMAGE_EMBEDDING, "text": TEXT_EMBEDDING}
MARK_TYPES = (pa.string(), pa.float32(), pa.bool_())  # dup_of, dup_score, dup_checked

# Figures below: `python -m bench.dedup --rows 1000000` (CLIP-shaped vectors, planted near-copies
# at cosine 0.95-0.995), recall = near-copies marked as duplicates of their original.
# k-means clusters of about this many rows: comparing within clusters costs rows x CLUSTER_ROWS,
# assigning rows to centroids rows x rows / CLUSTER_ROWS. Recall 0.996 at 512 (108 s), 0.992 at
# 1024 (91 s), 0.990 at 2048 (90 s).
CLUSTER_ROWS = 1024
# Vectors the centroids are trained on, held as float16 (300 MiB at 768-d): better centroids
# split fewer near-copies from their original (without guests, below: recall 0.927 with
# 100,000, 0.959 with 200,000).
KMEANS_SAMPLE = 200_000
KMEANS_ITERATIONS = 10
KMEANS_MIN_SAMPLE_PER_CLUSTER = 16
# A row whose second nearest centroid is within this cosine of its nearest is also compared in
# that cluster: recall 0.959 -> 0.992, for 7% more rows compared. Near-copies compared with their
# original, on the same vectors: 0.983 at 0.001 (2.7% more rows), 0.992 at 0.005 (11% more).
GUEST_MARGIN = 0.003
NEAREST_ROWS = 8192  # rows compared with the centroids at once
BLOCK_ROWS = 1024  # rows of a cluster compared at once
SCAN_ROWS = 16_384  # rows per batch read from the table
# Vectors compared at once (192 MiB at 768-d): the rest wait in local files, by cluster.
SPILL_GROUP_ROWS = 65_536
ANN_NEIGHBOURS = 10  # nearest rows an incremental run asks the vector index for, per new row
QUERY_BATCH = 256  # new rows per vector search call

KEPT = -1  # target of a kept row
PRIOR = -2  # target of a row that duplicates a kept row from an earlier run (incremental)


@dataclass(frozen=True)
class DedupConfig:
    db: str
    table_name: str = DEFAULT_TABLE_NAME
    against: str = "image"  # which vectors: image or text
    threshold: float = DEFAULT_THRESHOLD
    keep: str = "first"
    full: bool = False  # re-cluster every row instead of checking new and changed ones only
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_table_name(self.table_name)
        if self.against not in VECTOR_COLUMN:
            raise ConfigError(f"against {self.against!r}: choose image or text")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold {self.threshold}: a cosine above 0 and at most 1")
        if self.keep not in KEEP_POLICIES:
            raise ConfigError(f"keep {self.keep!r}: choose one of {', '.join(KEEP_POLICIES)}")


@dataclass
class Grouping:
    """Per row: KEPT, PRIOR, or the index of the kept row it duplicates; and the cosine to it."""

    target: np.ndarray  # int64
    score: np.ndarray  # float32, NaN where kept


def dedup_table(config: DedupConfig) -> dict:
    """Mark the near-duplicates of a table's image or caption vectors; one new table version."""
    table = open_table(config.db, config.table_name, config.storage_options)
    vector = VECTOR_COLUMN[config.against]
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
        return {**counts, "version": table.version, "changed": False}
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
    return {**counts, "version": table.version, "changed": True}


@dataclass
class Clusters:
    """Spherical k-means centroids, and the spill group each cluster is compared in."""

    centroids: torch.Tensor | None  # None: one cluster, every row compared with every other
    spill_group: np.ndarray  # cluster -> spill group

    @classmethod
    def train(cls, sample: np.ndarray, rows: int, cluster_rows: int | None = None,
              spill_rows: int | None = None) -> Clusters:
        """Centroids for `rows` vectors from a sample of them (float16 or float32); cluster and
        spill group sizes CLUSTER_ROWS and SPILL_GROUP_ROWS unless given."""
        cluster_rows, spill_rows = cluster_rows or CLUSTER_ROWS, spill_rows or SPILL_GROUP_ROWS
        count = max(1, min(round(rows / cluster_rows), len(sample) // KMEANS_MIN_SAMPLE_PER_CLUSTER))
        if count == 1:
            return cls(None, np.zeros(1, np.int64))
        centroids = _kmeans(sample, count)
        # Consecutive clusters whose sizes, as the sample sees them, add up to about spill_rows.
        sizes = np.bincount(_nearest(sample, centroids)[0], minlength=count) * rows / len(sample)
        return cls(centroids, ((np.cumsum(sizes) - sizes) // spill_rows).astype(np.int64))

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's nearest cluster, and its second nearest where that is within GUEST_MARGIN
        (a row near a boundary is compared in both clusters), else -1."""
        if self.centroids is None:
            return np.zeros(len(vectors), np.int64), np.full(len(vectors), -1)
        home, second, margin = _nearest(vectors, self.centroids)
        return home, np.where(margin < GUEST_MARGIN, second, -1)


def group_rows(batches: Iterable[np.ndarray], ranks: np.ndarray, threshold: float,
               clusters: Clusters, prior: np.ndarray | None = None,
               block_rows: int = BLOCK_ROWS) -> Grouping:
    """Greedy SemDeDup over unit vectors given in row order by `batches`: in each cluster, rows
    in keep order (`ranks`, 0 first); a row whose best cosine to a row kept before it (in its
    cluster, or `prior`: its best cosine to a row kept by an earlier run) is >= threshold
    duplicates that row, else it is kept.

    A row near a cluster boundary is compared in both clusters, and its best kept row over both
    wins; a row whose best kept row of one cluster turns out a duplicate in the other (a rarer
    case still) is kept."""
    rows = len(ranks)
    cutoff = _cutoff(threshold)
    prior_t = torch.from_numpy(np.asarray(prior, np.float32)) if prior is not None else None
    found = []  # (row, its best kept row in one cluster or PRIOR, cosine), for rows that have one
    with _Buckets(clusters.spill_group) as buckets:
        start = 0
        for block in batches:
            members = np.arange(start, start + len(block))
            home, guest = clusters.assign(block)
            buckets.add(members, home, block)
            near = guest >= 0
            buckets.add(members[near], guest[near], block[near])
            start += len(block)
        if start != rows:
            raise ValueError(f"{start} vectors for {rows} ranked rows")
        for members, cluster_of, vectors in buckets.groups():
            order = np.lexsort((ranks[members], cluster_of))  # by cluster, keep order within
            bounds = np.flatnonzero(np.diff(cluster_of[order])) + 1
            for part in np.split(order, bounds):
                index = members[part]
                target, score = _greedy(torch.from_numpy(vectors[part]), cutoff,
                                        prior_t[index] if prior_t is not None else None, block_rows)
                dup = target != KEPT
                target = np.where(target >= 0, index[np.maximum(target, 0)], target)
                found.append((index[dup], target[dup], score[dup]))
    return _settle(ranks, *(np.concatenate(column) for column in zip(*found)))


def _settle(ranks: np.ndarray, rows: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> Grouping:
    """Each row's best target that is still kept once every row before it is settled, in keep
    order: a boundary row may be kept in one cluster and a duplicate in the other."""
    grouping = Grouping(np.full(len(ranks), KEPT, np.int64), np.full(len(ranks), np.nan, np.float32))
    order = np.lexsort((-scores, ranks[rows]))
    for row, target, score in zip(rows[order].tolist(), targets[order].tolist(), scores[order].tolist()):
        if grouping.target[row] == KEPT and (target == PRIOR or grouping.target[target] == KEPT):
            grouping.target[row], grouping.score[row] = target, score
    return grouping


def _greedy(x: torch.Tensor, cutoff: float, prior: torch.Tensor | None,
            block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One cluster's rows in keep order -> (target, score) with targets local to the cluster.

    Compares each row with the rows kept so far only (cost rows x kept: thousands of copies of
    one placeholder image are as cheap as one), a block of rows at a time; a row compared with
    earlier rows of its own block is settled in order, since they may have just been kept."""
    rows = len(x)
    best = (prior.clone() if prior is not None else torch.full((rows,), -math.inf))
    target = torch.where(best >= cutoff, PRIOR, KEPT).to(torch.int64)
    kept = torch.zeros(0, dtype=torch.int64)
    for start in range(0, rows, block_rows):
        stop = min(rows, start + block_rows)
        block = x[start:stop]
        if len(kept):
            top, arg = (block @ x[kept].T).max(dim=1)
            better = (top >= cutoff) & (top > best[start:stop])
            best[start:stop] = torch.where(better, top, best[start:stop])
            target[start:stop] = torch.where(better, kept[arg], target[start:stop])
        inner = torch.tril(block @ block.T, diagonal=-1)  # each row against earlier block rows
        near = inner >= cutoff
        for r in torch.nonzero(near.any(dim=1)).flatten().tolist():
            earlier = torch.nonzero(near[r]).flatten()
            earlier = earlier[target[start + earlier] == KEPT]
            if len(earlier):
                q = earlier[inner[r, earlier].argmax()]
                if inner[r, q] > best[start + r]:
                    best[start + r], target[start + r] = inner[r, q], start + q
        kept = torch.cat([kept, start + torch.nonzero(target[start:stop] == KEPT).flatten()])
    # A row and its exact copy can score a hair over 1 in float32.
    score = torch.where(target == KEPT, torch.tensor(math.nan), best.clamp(max=1.0))
    return target.numpy(), score.numpy().astype(np.float32)


def _cutoff(threshold: float) -> float:
    """The smallest float32 at or above `threshold`: cosines are float32, and a score stored
    as float32 must still read >= the threshold given."""
    value = np.float32(threshold)
    return float(value if value >= threshold else np.nextafter(value, np.float32(2)))


def _kmeans(sample: np.ndarray, clusters: int, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine): unit centroids, started from sample rows; a cluster left
    empty restarts from a random row."""
    generator = torch.Generator().manual_seed(seed)

    def pick(n: int) -> torch.Tensor:
        chosen = np.sort(torch.randperm(len(sample), generator=generator)[:n].numpy())
        return torch.from_numpy(sample[chosen].astype(np.float32))

    centroids = pick(clusters)
    for _ in range(KMEANS_ITERATIONS):
        sums = torch.zeros_like(centroids)
        for s in range(0, len(sample), NEAREST_ROWS):
            chunk = torch.from_numpy(sample[s:s + NEAREST_ROWS].astype(np.float32))
            sums.index_add_(0, (chunk @ centroids.T).argmax(dim=1), chunk)
        empty = sums.norm(dim=1) == 0
        if empty.any():
            sums[empty] = pick(int(empty.sum()))
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def _nearest(vectors: np.ndarray, centroids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nearest centroid, second nearest, the difference of their cosines) per row."""
    parts = [torch.topk(torch.from_numpy(vectors[s:s + NEAREST_ROWS].astype(np.float32)) @ centroids.T,
                        2, dim=1) for s in range(0, len(vectors), NEAREST_ROWS)]
    values = torch.cat([p.values for p in parts]) if parts else torch.zeros(0, 2)
    indices = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, 2, dtype=torch.int64)
    return indices[:, 0].numpy(), indices[:, 1].numpy(), (values[:, 0] - values[:, 1]).numpy()


class _Buckets:
    """Vectors waiting in local files by spill group, so that one group at a time is in memory
    however large the table."""

    def __init__(self, group_of: np.ndarray):
        self.group_of = group_of.astype(np.int64)
        self.groups_n = int(self.group_of.max()) + 1
        self.members = [[] for _ in range(self.groups_n)]
        self.clusters = [[] for _ in range(self.groups_n)]
        self.dim = None

    def __enter__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="altclip-dedup-")
        return self

    def __exit__(self, *exc):
        self.folder.cleanup()

    def _path(self, group: int) -> str:
        return os.path.join(self.folder.name, f"{group}.f32")

    def add(self, members: np.ndarray, clusters: np.ndarray, vectors: np.ndarray) -> None:
        self.dim = vectors.shape[1]
        groups = self.group_of[clusters]
        for group in np.unique(groups):
            chosen = groups == group
            with open(self._path(group), "ab") as f:
                f.write(np.ascontiguousarray(vectors[chosen], np.float32).tobytes())
            self.members[group].append(members[chosen])
            self.clusters[group].append(clusters[chosen])

    def groups(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for group in range(self.groups_n):
            if not self.members[group]:
                continue
            vectors = np.fromfile(self._path(group), np.float32).reshape(-1, self.dim)
            os.remove(self._path(group))
            yield np.concatenate(self.members[group]), np.concatenate(self.clusters[group]), vectors


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
        self.cutoff = _cutoff(threshold)

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
