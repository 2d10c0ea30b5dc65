"""Manifest partitions: the unit of work and of resume.

A partition is a run of rows of one manifest file, in its reading order: up to `partition_rows`
rows (config.PARTITION_ROWS by default) of a CSV or JSON Lines file, whole row groups of a Parquet file
(a row group larger than that is a partition of its own), a whole WebDataset shard. A file of
fewer rows is one partition. Every output shard holds rows of one partition and carries its key
in its name; once all of a partition's rows are published, a small commit record,
`OUT/_partitions/<key>.json`, names its shards and their totals. A rerun skips committed
partitions without embedding their rows (a Parquet file's row groups in them are not even
read), and removes every partition shard that no record names: work a killed run had in flight,
or a copy a retried write published late. The driver holds records (one per partition), never
ids.
"""

from __future__ import annotations

import collections
import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass

from pipeline import storage
from pipeline.writer import add_totals, empty_totals, list_shards, shard_partition, shards_totals

RECORDS = "_partitions"  # folder of commit records under OUT


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
class FilePlan:
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


def _folder(out: str, storage_options: dict | None):
    fs, path = storage.filesystem(out, storage_options)
    return fs, f"{path.rstrip('/')}/{RECORDS}"


def read_records(out: str, storage_options: dict | None = None) -> dict[str, dict]:
    """The commit records under OUT, by partition key (read concurrently on object stores)."""
    fs, folder = _folder(out, storage_options)
    found = fs.glob(f"{folder}/*.json") if fs.exists(folder) else []
    if not found:
        return {}
    contents = fs.cat(found)
    return {posixpath.basename(p)[: -len(".json")]: json.loads(data) for p, data in contents.items()}


def write_record(out: str, key: str, record: dict, storage_options: dict | None = None,
                 patience_s: float = storage.DEFAULT_PATIENCE_S) -> None:
    """Publish a partition's record whole (write, then rename), as shards are."""
    fs, folder = _folder(out, storage_options)

    def write() -> None:
        fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{key}-{uuid.uuid4().hex}.tmp"
        with fs.open(temporary, "wb") as f:
            f.write(json.dumps(record).encode())
        fs.mv(temporary, f"{folder}/{key}.json")

    storage.patiently(write, out, patience_s)


def remove_records(out: str, storage_options: dict | None = None) -> None:
    """Delete every record (for --overwrite)."""
    fs, folder = _folder(out, storage_options)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def drop_changed(out: str, records: dict[str, dict], keys: dict[str, str],
                 storage_options: dict | None = None) -> dict[str, dict]:
    """The records still valid for the manifest's partitions (`keys`: key -> its file's URI). A
    record of a file the manifest lists that is not one of its partitions now (the file changed
    size, or is split at other rows) goes, and so do its shards: those rows are embedded again.
    Records of files the manifest no longer lists stay, as their rows do."""
    listed = set(keys.values())
    changed = {k for k, r in records.items() if k not in keys and r["path"] in listed}
    if changed:
        fs, folder = _folder(out, storage_options)
        base = out.rstrip("/")
        for key in changed:
            for name in records[key]["shards"]:
                fs.rm_file(storage.filesystem(f"{base}/{name}", storage_options)[1])
            fs.rm_file(f"{folder}/{key}.json")
    return {k: r for k, r in records.items() if k not in changed}


def remove_unlisted_shards(out: str, records: dict[str, dict],
                           storage_options: dict | None = None) -> int:
    """Delete the partition shards no record names; returns how many. Shards without a key in
    their name (written by `reembed`, or before partitions) are left as they are."""
    listed = {name for record in records.values() for name in record["shards"]}
    removed = 0
    for shard in list_shards(out, storage_options):
        name = posixpath.basename(shard)
        if shard_partition(name) is not None and name not in listed:
            fs, path = storage.filesystem(shard, storage_options)
            fs.rm_file(path)
            removed += 1
    return removed


def start_ledger(out: str, expected: dict[str, dict], storage_options: dict | None,
                 patience_s: float):
    """A PartitionLedger actor for this run (it reserves no CPU: it only keeps books)."""
    import ray

    return ray.remote(num_cpus=0)(PartitionLedger).remote(out, expected, storage_options, patience_s)


class PartitionLedger:
    """Told of every shard the write tasks publish, commits each partition the moment all of its
    rows are out. It holds the ids of the partitions in flight only (by distinct id: a write
    task Ray retries after its shard was published sends the same rows again)."""

    def __init__(self, out: str, expected: dict[str, dict], storage_options: dict | None,
                 patience_s: float):
        self.out, self.storage_options, self.patience_s = out, storage_options, patience_s
        self.expected = expected  # key -> {"path": file URI, "rows": rows its read yields}
        self.open: dict[str, dict] = {}
        self.committed: dict[str, dict] = {}
        for key, want in expected.items():
            if want["rows"] == 0:  # nothing to write: done already
                self._commit(key, {"ids": set(), "shards": [], "totals": empty_totals()})

    def written(self, key: str, shard: str, ids: list[str], totals: dict) -> list[str]:
        """Take a published shard into its partition; returns the ids among `ids` already
        published (the shard is then a copy, whole or in part, and not taken: its writer removes
        it, or rewrites it without them and reports that)."""
        if key in self.committed or key not in self.expected:
            return ids
        state = self.open.setdefault(key, {"ids": set(), "shards": [], "totals": empty_totals()})
        repeated = [i for i in ids if i in state["ids"]]
        if repeated:
            return repeated
        state["ids"].update(ids)
        state["shards"].append(shard)
        add_totals(state["totals"], totals)
        if len(state["ids"]) == self.expected[key]["rows"]:
            self._commit(key, self.open.pop(key))
        return []

    def _commit(self, key: str, state: dict) -> None:
        totals = state["totals"]
        record = {"path": self.expected[key]["path"], "rows": len(state["ids"]),
                  "shards": state["shards"], "totals": {**totals, "errors": dict(totals["errors"])}}
        write_record(self.out, key, record, self.storage_options, self.patience_s)
        self.committed[key] = record

    def outcome(self) -> tuple[dict[str, dict], dict[str, tuple[int, int]]]:
        """The records this run committed, and the partitions it did not finish (key ->
        (rows expected, rows written))."""
        unfinished = {k: (w["rows"], len(self.open[k]["ids"]) if k in self.open else 0)
                      for k, w in self.expected.items() if k not in self.committed}
        return self.committed, unfinished


def output_totals(out: str, records: dict[str, dict], storage_options: dict | None = None) -> dict:
    """Rows, vectors and errors by kind over OUT: the partitions' records added up, plus the
    footers of shards of no partition. No shard is opened for a committed partition."""
    keyless = [s for s in list_shards(out, storage_options) if shard_partition(posixpath.basename(s)) is None]
    return shards_totals(keyless, storage_options, [r["totals"] for r in records.values()])


def shards_by_partition(names: list[str]) -> dict[str, list[str]]:
    """Shard names grouped by the partition key in them (shards without one left out)."""
    grouped = collections.defaultdict(list)
    for name in names:
        key = shard_partition(name)
        if key is not None:
            grouped[key].append(name)
    return dict(grouped)

