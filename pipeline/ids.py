"""The manifest's ids, read before any work: rows, rejects, repeated ids (the first row wins),
and the Ray Data stage that keeps only the rows a run still has to do."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage, webdataset
from pipeline.config import ConfigError
from pipeline.formats import csv_options, flatten_webdataset, id_text, json_lines
from pipeline.manifest import Manifest, parse_json_file
from schemas.manifest import ID


@dataclass(frozen=True)
class IdScan:
    """The manifest's ids, read before any work: row count, rejects and duplicates."""

    rows: int
    ids: pa.Array | None  # every valid id once (string)
    missing_ids: int  # rows whose id is null or empty: rejected
    duplicate_rows: int  # rows whose id an earlier row already has: rejected
    duplicated_ids: pa.Array  # ids that more than one row has
    first_of_duplicates: pa.Table | None  # the first row of each duplicated id, manifest columns
    # WebDataset: how to read each shard (in the manifest's order of files). Its read leaves out
    # the later copies of a repeated id itself: no row is read twice, none is held in the driver.
    shards: tuple[webdataset.ShardPlan, ...] | None = None

    @property
    def held_back(self) -> pa.Array:
        """Ids whose every row select_rows is to drop from the read: a table's repeated ids,
        whose first rows join the stream again from first_of_duplicates (none for WebDataset,
        whose shards' plans leave out the later copies only)."""
        return self.duplicated_ids if self.shards is None else pa.array([], pa.string())

    def pending(self, done: pa.Array) -> int | None:
        """How many ids are not done yet (None: unknown)."""
        if self.ids is None:
            return None
        return int(pc.sum(pc.invert(pc.is_in(self.ids, value_set=done))).as_py() or 0)


def scan_ids(manifest: Manifest) -> IdScan:
    """Read only the ids (in manifest order: files as listed, rows in file order) to count rows
    and find bad and repeated ids; of the rows sharing an id the first wins.

    A CSV or JSON line that cannot be read as a row, or a shard that cannot be read as a tar,
    fails the job here, before any work, with a message naming the file (and line). WebDataset
    keys are unique within a shard only (img2dataset numbers each run's samples from 0): shards
    that reuse keys repeat them. Only the shards' member headers are read here (in Ray tasks),
    and their `.json` members where the id is a metadata field.
    """
    fs = manifest.filesystem()
    scattered = None
    if manifest.format == "webdataset":
        per_file, scattered = _shard_ids(manifest)
    else:
        per_file = [file_ids(manifest, fs, path) for path in manifest.files]
    ids = pa.concat_arrays(per_file) if per_file else pa.array([], pa.string())
    valid = pc.fill_null(pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), "")), False)
    good = ids.filter(valid)
    counts = pc.value_counts(good)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    duplicated = repeated.field("values")
    firsts, laters = [], []
    if len(duplicated):
        is_repeated = pc.fill_null(pc.is_in(ids, value_set=duplicated), False)
        positions = pc.indices_nonzero(is_repeated).to_pylist()
        seen = set()
        for position, row_id in zip(positions, ids.take(positions).to_pylist()):
            (laters if row_id in seen else firsts).append(position)
            seen.add(row_id)
    sizes = [len(file_ids) for file_ids in per_file]
    first_rows, shards = None, None
    if scattered is not None:
        shards = tuple(webdataset.ShardPlan(storage.unstrip(fs, path), frozenset(skipped), keys)
                       for path, skipped, keys in zip(manifest.files, _per_file(laters, sizes), scattered))
    elif firsts:
        # The first row of each repeated id, read again whole from its file.
        parts = [file_rows(manifest, fs, path).take(local)
                 for path, local in zip(manifest.files, _per_file(firsts, sizes)) if local]
        first_rows = pa.concat_tables(parts, promote_options="default")
    return IdScan(
        rows=len(ids),
        ids=pc.unique(good),
        missing_ids=len(ids) - len(good),
        duplicate_rows=int(pc.sum(repeated.field("counts")).as_py() or 0) - len(duplicated),
        duplicated_ids=duplicated,
        first_of_duplicates=first_rows,
        shards=shards,
    )


def _per_file(positions: list[int], sizes: list[int]) -> list[list[int]]:
    """Ascending positions in the manifest -> positions within each file (files of `sizes` rows)."""
    out, start, n = [], 0, 0
    for size in sizes:
        local = []
        while n < len(positions) and positions[n] < start + size:
            local.append(positions[n] - start)
            n += 1
        out.append(local)
        start += size
    return out


# Each shard's scan is a Ray task reserving this much CPU: it waits on storage (as
# plan.READ_CPUS for the reads of the job).
SHARD_SCAN_CPUS = 0.25


def _shard_ids(manifest: Manifest) -> tuple[list[pa.Array], list[frozenset[str]]]:
    """Each shard's ids in reading order, and its keys whose members are not adjacent."""
    import ray

    scan = ray.remote(_one_shard_ids).options(num_cpus=SHARD_SCAN_CPUS)
    results = ray.get([scan.remote(manifest, path) for path in manifest.files])
    failed = next((r for r in results if isinstance(r, str)), None)
    if failed is not None:
        raise ConfigError(failed)
    return [ids for ids, _ in results], [keys for _, keys in results]


def _one_shard_ids(manifest: Manifest, path: str) -> tuple[pa.Array, frozenset[str]] | str:
    """One shard's ids and scattered keys, or why it cannot be read (a message)."""
    fs = manifest.filesystem()
    shown = storage.unstrip(fs, path)
    read = () if manifest.id_col == ID else (webdataset.METADATA_SUFFIX,)
    try:
        with fs.open(path, "rb") as f:
            index = webdataset.index_shard(f, read)
    except Exception as exc:  # a damaged or truncated tar, an unreadable object: say which
        return f"cannot read manifest shard {shown} as a tar: {storage.describe(exc)}"
    # The ids as the job's read makes them (a metadata field's as flatten_webdataset types it).
    rows = flatten_webdataset(webdataset.sample_table(index.samples, shown), manifest.schema)
    return id_text(rows.column(manifest.id_col)), index.scattered


def file_ids(manifest: Manifest, fs, path: str) -> pa.Array:
    """One file's ids as text, in order."""
    shown = storage.unstrip(fs, path)
    try:
        with fs.open(path, "rb") as f:
            if manifest.format == "parquet":
                parquet = pq.ParquetFile(f)
                if manifest.id_col not in parquet.schema_arrow.names:
                    return pa.nulls(parquet.metadata.num_rows, pa.string())
                return id_text(parquet.read(columns=[manifest.id_col]).column(0))
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
                return id_text(table.column(0))
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
    return id_text(parse_json_file(data, manifest).column(manifest.id_col))


def file_rows(manifest: Manifest, fs, path: str) -> pa.Table:
    """One file's rows as read_manifest yields them."""
    with fs.open(path, "rb") as f:
        if manifest.format == "parquet":
            return pq.read_table(f)
        if manifest.format == "csv":
            return pacsv.read_csv(f, **csv_options(manifest.schema.names))
        return parse_json_file(f.read(), manifest)


def select_rows(batch: pa.Table, id_col: str, excluded: pa.Array,
                included: pa.Array | None = None) -> pa.Table:
    """Ray Data stage: drop rows without an id, rows whose id is excluded (done, duplicated)
    and, when `included` is given, rows whose id is not in it (the rows to retry)."""
    ids = id_text(batch.column(id_col))
    keep = pc.and_(pc.is_valid(ids), pc.not_equal(pc.utf8_trim_whitespace(ids), ""))
    if len(excluded):
        keep = pc.and_(keep, pc.invert(pc.is_in(ids, value_set=excluded)))
    if included is not None:
        keep = pc.and_(keep, pc.is_in(ids, value_set=included))
    return batch.filter(pc.fill_null(keep, False))
