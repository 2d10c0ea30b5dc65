"""Near-duplicates among unit vectors: spherical k-means clusters, greedy SemDeDup within each."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

# Figures below: `python -m bench.dedup --rows 1000000` (CLIP-shaped vectors, planted near-copies
# at cosine 0.95-0.995), recall = near-copies marked as duplicates of their original.
# k-means clusters of about this many rows: comparing within clusters costs rows x CLUSTER_ROWS,
# assigning rows to centroids rows x rows / CLUSTER_ROWS. Recall 0.996 at 512 (108 s), 0.992 at
# 1024 (91 s), 0.990 at 2048 (90 s).
CLUSTER_ROWS = 1024
KMEANS_ITERATIONS = 10
KMEANS_MIN_SAMPLE_PER_CLUSTER = 16
# A row whose second nearest centroid is within this cosine of its nearest is also compared in
# that cluster: recall 0.959 -> 0.992, for 7% more rows compared. Near-copies compared with their
# original, on the same vectors: 0.983 at 0.001 (2.7% more rows), 0.992 at 0.005 (11% more).
GUEST_MARGIN = 0.003
NEAREST_ROWS = 8192  # rows compared with the centroids at once
BLOCK_ROWS = 1024  # rows of a cluster compared at once
# Vectors compared at once (192 MiB at 768-d): the rest wait in local files, by cluster.
SPILL_GROUP_ROWS = 65_536

KEPT = -1  # target of a kept row
PRIOR = -2  # target of a row that duplicates a kept row from an earlier run (incremental)


@dataclass
class Grouping:
    """Per row: KEPT, PRIOR, or the index of the kept row it duplicates; and the cosine to it."""

    target: np.ndarray  # int64
    score: np.ndarray  # float32, NaN where kept


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
    cutoff = cosine_cutoff(threshold)
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


def cosine_cutoff(threshold: float) -> float:
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
