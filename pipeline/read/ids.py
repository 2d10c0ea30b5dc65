"""The manifest's ids, read on the cluster before any work: rows, rejects, repeated ids (the
first row wins), and the Ray Data stage that keeps only the rows a run has to do."""

from __future__ import annotations

import collections
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import PARTITION_ROWS, ConfigError
from pipeline.read import webdataset
from pipeline.read.formats import csv_options, flatten_webdataset, id_text, json_lines
from pipeline.read.manifest import Manifest, parse_json_file
from pipeline.read.partitions import FileSlices, file_partitions
from schemas.manifest import ID


@dataclass(frozen=True)
class IdScan:
    """The manifest's ids, counted before any work: rows, rejects, and how to read each file."""

    rows: int
    missing_ids: int  # rows whose id is null or empty: rejected
    duplicate_rows: int  # rows whose id an earlier row already has: rejected
    duplicated_ids: pa.Array  # ids that more than one row has (the first row of each is kept)
    file_slices: tuple[FileSlices, ...]  # per manifest file: its partitions and the rows its read leaves out
    partition_kept: dict[str, int]  # per partition (by key): the rows its read yields

    @property
    def distinct_ids(self) -> int:
        return self.rows - self.missing_ids - self.duplicate_rows


# Each scan task reads the ids of a run of files and reserves this much CPU: it waits on storage
# (as stages.READ_CPUS for the reads of the job).
SCAN_CPUS = 0.25
SCAN_TASKS_PER_CPU = 2
MAX_ID_BUCKETS = 256  # the duplicate check's hash partitions


def scan_ids(manifest: Manifest, committed: frozenset[str] = frozenset(),
             partition_rows: int = PARTITION_ROWS) -> IdScan:
    """Count rows, split each file into partitions (see partitions.file_partitions) and find bad
    and repeated ids, on the cluster: tasks read the ids of runs of files and hash them into
    buckets, a task per bucket finds its repeated ids. The driver gets per-partition counts and
    the rows of repeated ids only, never every id.

    Of rows sharing an id the first in manifest order (files as listed, rows in file order) is
    kept, but a row of a `committed` partition (done by an earlier run) is never undone: a
    repeated id that a committed partition holds is left out of every other partition.

    A CSV or JSON line that cannot be read as a row, or a shard that cannot be read as a tar,
    fails the job here, before any work, with a message naming the file (and line). WebDataset
    keys are unique within a shard only (img2dataset numbers each run's samples from 0): shards
    that reuse keys repeat them. Only the shards' member headers are read here, and their
    `.json` members where the id is a metadata field.
    """
    counted, repeated = _scan_on_cluster(manifest, committed, partition_rows)
    order = repeated.sort_by([("id", "ascending"), ("rank", "ascending"), ("file", "ascending"),
                              ("position", "ascending")])
    skipped = _later_copies(order)
    uris, keys = manifest.uris(), manifest.partition_keys()
    file_slices = tuple(FileSlices(keys[i], uris[i], frozenset(skipped.get(i, ())), c["scattered"], c["partitions"])
                  for i, c in enumerate(counted))
    return IdScan(
        rows=sum(c["rows"] for c in counted),
        missing_ids=sum(c["rows"] - c["valid"] for c in counted),
        duplicate_rows=sum(len(positions) for positions in skipped.values()),
        duplicated_ids=pc.unique(order.column("id")),
        file_slices=file_slices,
        partition_kept=_partition_kept(file_slices, counted, skipped),
    )


def _scan_on_cluster(manifest: Manifest, committed: frozenset[str],
                     partition_rows: int) -> tuple[list, pa.Table]:
    """Per manifest file its counts (see _scan_files), and the rows of the ids more than one row
    has; a file that cannot be read fails the job here."""
    import ray

    files = len(manifest.files)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    tasks = max(1, min(files, int(cpus * SCAN_TASKS_PER_CPU)))
    buckets = max(1, min(tasks, MAX_ID_BUCKETS))
    runs = [files * t // tasks for t in range(tasks + 1)]
    scan = ray.remote(_scan_files).options(num_cpus=SCAN_CPUS, num_returns=1 + buckets)
    source, done = ray.put(manifest), ray.put(committed)
    refs = [scan.remote(source, start, stop, done, partition_rows, buckets)
            for start, stop in zip(runs, runs[1:]) if stop > start]
    counted = [c for counts in ray.get([r[0] for r in refs]) for c in counts]
    failed = next((c for c in counted if isinstance(c, str)), None)
    if failed is not None:
        raise ConfigError(failed)
    find = ray.remote(_repeated).options(num_cpus=SCAN_CPUS)
    repeated = pa.concat_tables(ray.get([find.remote(*[r[1 + b] for r in refs]) for b in range(buckets)]))
    return counted, repeated


def _later_copies(order: pa.Table) -> dict[int, list[int]]:
    """Per file, the positions of its rows whose id an earlier row of `order` (sorted by id, then
    the row to keep first) already has."""
    skipped: dict[int, list[int]] = collections.defaultdict(list)
    previous = None
    for row_id, file, position in zip(*(order.column(c).to_pylist() for c in ("id", "file", "position"))):
        if row_id == previous:
            skipped[file].append(position)
        previous = row_id
    return skipped


def _partition_kept(file_slices: tuple[FileSlices, ...], counted: list,
                    skipped: dict[int, list[int]]) -> dict[str, int]:
    """Per partition (by key), its valid rows less those of its rows left out as repeats."""
    partition_kept = {}
    for i, (slices, count) in enumerate(zip(file_slices, counted)):
        left_out = np.sort(np.fromiter(skipped.get(i, ()), np.int64))
        bounds = [p.start for p in slices.partitions] + [slices.partitions[-1].stop]
        for partition, valid, repeats in zip(slices.partitions, count["valid_by_partition"],
                                             np.diff(np.searchsorted(left_out, bounds))):
            partition_kept[partition.key] = valid - int(repeats)
    return partition_kept


_ID_ROWS = pa.schema([("id", pa.string()), ("file", pa.int64()), ("position", pa.int64()),
                      ("rank", pa.int8())])


def _scan_files(manifest: Manifest, start: int, stop: int, committed: frozenset[str],
                partition_rows: int, buckets: int):
    """Scan task: per file of manifest.files[start:stop] its partitions and counts (or, for a
    file that cannot be read, the message saying so), then per bucket the valid ids with where
    they are and their rank (0: in a committed partition)."""
    fs = manifest.filesystem()
    counts, pieces = [], [[] for _ in range(buckets)]
    for index in range(start, stop):
        try:
            ids, scattered, groups = file_ids(manifest, fs, manifest.files[index])
        except ConfigError as exc:
            return [[str(exc)], *[_ID_ROWS.empty_table()] * buckets]
        partitions = file_partitions(manifest.files[index], manifest.sizes[index], len(ids), partition_rows, groups)
        valid = pc.fill_null(pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), "")), False)
        positions = pc.indices_nonzero(valid).cast(pa.int64())
        good = ids.filter(valid)
        # Each valid row's partition, by its position.
        starts = [p.start for p in partitions]
        owner = np.searchsorted(starts, positions.to_numpy(), side="right") - 1
        counts.append({"rows": len(ids), "valid": len(good), "scattered": scattered, "partitions": partitions,
                       "valid_by_partition": np.bincount(owner, minlength=len(partitions)).tolist()})
        ranks = np.array([0 if p.key in committed else 1 for p in partitions], np.int8)[owner]
        rows = pa.table([good, pa.array([index] * len(good), pa.int64()), positions,
                         pa.array(ranks, pa.int8())], schema=_ID_ROWS)
        if buckets == 1:
            pieces[0].append(rows)
            continue
        bucket = pa.array([zlib.crc32(i.encode()) % buckets for i in good.to_pylist()], pa.int64())
        for b in range(buckets):
            pieces[b].append(rows.filter(pc.equal(bucket, b)))
    return [counts, *[pa.concat_tables(p) if p else _ID_ROWS.empty_table() for p in pieces]]


def _repeated(*pieces: pa.Table) -> pa.Table:
    """Bucket task: the rows of the ids that more than one row has."""
    rows = pa.concat_tables(pieces)
    counts = pc.value_counts(rows.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return rows.filter(pc.is_in(rows.column("id"), value_set=repeated)) if len(repeated) else rows.slice(0, 0)


def file_ids(manifest: Manifest, fs, path: str) -> tuple[pa.Array, frozenset[str], list[int] | None]:
    """One file's ids as text, in reading order; (a WebDataset shard) its keys whose members
    are not adjacent; and how its rows may be split into partitions: a Parquet file's row
    groups (their rows), a WebDataset shard's one group (it is never split), else None (at any
    row)."""
    if manifest.format == "webdataset":
        ids, scattered = _shard_ids(manifest, fs, path)
        return ids, scattered, [len(ids)]
    ids, groups = _table_file_ids(manifest, fs, path)
    return ids, frozenset(), groups


def _shard_ids(manifest: Manifest, fs, path: str) -> tuple[pa.Array, frozenset[str]]:
    shown = storage.unstrip(fs, path)
    read = () if manifest.id_col == ID else (webdataset.METADATA_SUFFIX,)
    try:
        with fs.open(path, "rb") as f:
            index = webdataset.index_shard(f, read)
    except Exception as exc:  # a damaged or truncated tar, an unreadable object: say which
        raise ConfigError(f"cannot read manifest shard {shown} as a tar: {storage.describe(exc)}") from None
    # The ids as the job's read makes them (a metadata field's as flatten_webdataset types it).
    rows = flatten_webdataset(webdataset.sample_table(index.samples, shown), manifest.schema)
    return id_text(rows.column(manifest.id_col)), index.scattered


def _table_file_ids(manifest: Manifest, fs, path: str) -> tuple[pa.Array, list[int] | None]:
    shown = storage.unstrip(fs, path)
    try:
        with fs.open(path, "rb") as f:
            if manifest.format == "parquet":
                parquet = pq.ParquetFile(f)
                groups = [parquet.metadata.row_group(n).num_rows for n in range(parquet.num_row_groups)]
                if manifest.id_col not in parquet.schema_arrow.names:
                    return pa.nulls(parquet.metadata.num_rows, pa.string()), groups
                return id_text(parquet.read(columns=[manifest.id_col]).column(0)), groups
            if manifest.format == "csv":
                bad = []
                table = pacsv.read_csv(f, **csv_options(manifest.schema.names, [manifest.id_col],
                                                         lambda row: bad.append(row) or "skip"))
                if bad:
                    row = bad[0]
                    raise ConfigError(
                        f"manifest {shown}, line {row.number}: expected {row.expected_columns} "
                        f"fields, found {row.actual_columns} ({row.text[:80]!r}); fix or remove the "
                        f"line{f' (and {len(bad) - 1} more like it)' if len(bad) > 1 else ''}")
                return id_text(table.column(0)), None
            data = f.read()
    except ConfigError:
        raise
    except Exception as exc:  # a damaged file: say which
        raise ConfigError(f"cannot read manifest file {shown}: {storage.describe(exc)}") from None
    bad = [(number, why) for number, why in json_lines(data) if isinstance(why, str)]
    if bad:
        number, why = bad[0]
        more = f" (and {len(bad) - 1} more like it)" if len(bad) > 1 else ""
        raise ConfigError(f"manifest {shown}, line {number}: {why}; fix or remove the line{more}")
    return id_text(parse_json_file(data, manifest).column(manifest.id_col)), None


def file_rows(manifest: Manifest, fs, path: str) -> pa.Table:
    """One Parquet, CSV or JSON Lines file's rows as the job's read yields them."""
    with fs.open(path, "rb") as f:
        if manifest.format == "parquet":
            return pq.read_table(f)
        if manifest.format == "csv":
            return pacsv.read_csv(f, **csv_options(manifest.schema.names))
        return parse_json_file(f.read(), manifest)


def select_rows(batch: pa.Table, id_col: str, included: pa.Array | None = None) -> pa.Table:
    """Ray Data stage: drop rows without an id and, when `included` is given, rows whose id is
    not in it (the rows to retry)."""
    ids = id_text(batch.column(id_col))
    keep = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    if included is not None:
        keep = pc.and_(keep, pc.is_in(ids, value_set=included))
    return batch.filter(pc.fill_null(keep, False))
