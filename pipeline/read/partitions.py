"""Manifest partitions: the unit of work and of resume, and how each file is read.

A partition is a run of rows of one manifest file, in its reading order: up to `partition_rows`
rows (config.PARTITION_ROWS by default) of a CSV or JSON Lines file, whole row groups of a
Parquet file (a row group larger than that is a partition of its own), a whole WebDataset
shard. A file of fewer rows is one partition. Every output shard holds rows of one partition
and carries its key in its name; a committed partition (pipeline/write/ledger.py) is not read
again (a Parquet file's row groups in it are not even opened).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def partition_key(path: str, size: int) -> str:
    """A file's key: its path and size. A file that changes size is a new partition (its rows
    are embedded again and its old shards go)."""
    return hashlib.sha1(f"{path}\0{size}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Partition:
    """Rows [start, stop) of a file, by position in its reading order."""

    key: str
    start: int
    stop: int


def file_partitions(path: str, size: int, rows: int, partition_rows: int,
                    groups: list[int] | None = None) -> tuple[Partition, ...]:
    """A file's partitions: runs of whole `groups` (a Parquet file's row groups, by rows) of at
    most `partition_rows` rows, or without groups runs of `partition_rows` rows. A file of one
    partition keeps the file's key; several are keyed by the file and their rows."""
    bounds = [0]
    if groups is None:
        bounds += list(range(partition_rows, rows, partition_rows))
    else:
        taken = 0
        for group in groups:
            if taken and taken + group > partition_rows:
                bounds.append(bounds[-1] + taken)
                taken = 0
            taken += group
    bounds.append(rows)
    if len(bounds) == 2:
        return (Partition(partition_key(path, size), 0, rows),)
    return tuple(Partition(hashlib.sha1(f"{path}\0{size}\0{start}\0{stop}".encode()).hexdigest()[:16],
                           start, stop) for start, stop in zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class FileSlices:
    """How to read one manifest file: its key, its URI (WebDataset members' URIs start from it),
    the rows to leave out (by position in reading order: later copies of an id an earlier row
    has), for a WebDataset shard the keys whose members are not adjacent, and its partitions
    with those not to read (`done`). Without partitions the file is one, keyed `key`."""

    key: str
    uri: str
    skipped: frozenset[int] = frozenset()
    scattered: frozenset[str] = frozenset()
    partitions: tuple[Partition, ...] = ()
    done: frozenset[str] = frozenset()

    def rows_to_read(self, table, position: int):
        """A block of the file's rows, the first at `position`, less the rows left out and the
        rows of partitions done, each tagged with its partition's key (PARTITION)."""
        import numpy as np
        import pyarrow as pa

        from schemas.manifest import PARTITION

        partitions = self.partitions or (Partition(self.key, 0, position + table.num_rows),)
        positions = np.arange(position, position + table.num_rows)
        index = np.searchsorted([p.start for p in partitions], positions, side="right") - 1
        keep = ~np.isin(index, [n for n, p in enumerate(partitions) if p.key in self.done])
        if self.skipped:  # a set lookup per row: the set can hold millions of positions
            keep &= np.fromiter((int(p) not in self.skipped for p in positions), bool, len(positions))
        keys = np.array([p.key for p in partitions], dtype=object)[index[keep]]
        return table.filter(pa.array(keep)).append_column(PARTITION, pa.array(keys, pa.string()))

    def groups_to_read(self, groups: list[int]) -> list[tuple[int, int]]:
        """Runs [first, stop) of a Parquet file's row groups (`groups`: their rows) that hold
        rows of partitions not done: the row groups of partitions done are not read."""
        done = [(p.start, p.stop) for p in self.partitions if p.key in self.done]
        runs: list[tuple[int, int]] = []
        start = 0
        for n, rows in enumerate(groups):
            if not any(a <= start < b for a, b in done):
                if runs and runs[-1][1] == n:
                    runs[-1] = (runs[-1][0], n + 1)
                else:
                    runs.append((n, n + 1))
            start += rows
        return runs
