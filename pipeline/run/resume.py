"""A run's bookkeeping against what OUT already holds: the partitions a previous run of the same
job committed (skipped now), the rows a retry redoes and how they came out, and one copy of
each id kept where a retry or an older run wrote another."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.config import ConfigError, EmbedConfig, named
from pipeline.embed.provenance import changed_provenance
from pipeline.read.ids import IdScan, scan_ids
from pipeline.read.manifest import Manifest
from pipeline.read.partitions import FileSlices
from pipeline.write.ledger import (
    drop_changed,
    read_records,
    remove_records,
    remove_unlisted_shards,
    shards_by_partition,
    write_record,
)
from pipeline.write.shards import (
    check_output_vector_dtype,
    errors_by_kind,
    failed_ids,
    has_error,
    list_shards,
    outputs_dataset,
    read_output_provenance,
    remove_duplicate_rows,
    remove_outputs,
    remove_unpublished,
    shards_totals,
)
from schemas.embeddings import IMAGE_ERROR, TEXT_ERROR
from schemas.manifest import ID


def _holds_same_embeddings(config: EmbedConfig, provenance: dict) -> bool:
    """Whether OUT holds embeddings (False: none), refusing ones made differently."""
    check_output_vector_dtype(config.out, config.vector_dtype, config.storage_options)
    previous = read_output_provenance(config.out, config.storage_options)
    if previous is None:
        return False
    changed = changed_provenance(previous, provenance)
    if changed:
        details = "; ".join(f"{k}: {previous.get(k)!r} there, {provenance.get(k)!r} now" for k in changed)
        raise ConfigError(
            f"{named('out')} {config.out} holds embeddings made differently ({details}): rerun with "
            f"the same options, choose another {named('out')}, or pass {named('overwrite')} to replace them"
        )
    remove_unpublished(config.out, config.storage_options)
    return True


def committed_partitions(config: EmbedConfig, provenance: dict) -> dict[str, dict]:
    """The commit records of partitions a previous run of the same job finished under OUT, by
    key (none when overwriting). Shards of partitions no record commits are removed, so a run
    killed half-way leaves whole partitions only: done, and skipped now, or done again."""
    if config.overwrite:
        remove_outputs(config.out, config.storage_options)
        remove_records(config.out, config.storage_options)
        return {}
    if not _holds_same_embeddings(config, provenance):
        return {}
    records = read_records(config.out, config.storage_options)
    remove_unlisted_shards(config.out, records, config.storage_options)
    return records


def rows_to_retry(config: EmbedConfig, provenance: dict) -> pa.Array:
    """Ids of OUT's rows whose error is of a kind to retry (config.retry_kinds)."""
    if config.overwrite:
        raise ConfigError(f"{named('overwrite')} replaces the output, {named('retry_errors')} mends it: choose one")
    if not _holds_same_embeddings(config, provenance):
        raise ConfigError(f"{named('out')} {config.out} holds no embeddings to retry: run without "
                          f"{named('retry_errors')} first")
    return failed_ids(config.out, config.retry_kinds, config.storage_options)


def retry_outcome(config: EmbedConfig, retried: pa.Array) -> dict:
    """How the retried rows came out: how many no longer have an error of the retried kinds."""
    if not len(retried):
        return {"rows": 0, "succeeded": 0, "still_failing": {}}
    rows = outputs_dataset(config.out, config.storage_options).to_table(
        columns=[ID, IMAGE_ERROR, TEXT_ERROR], filter=pads.field(ID).isin(retried))
    still = {k: v for k, v in errors_by_kind(rows).items() if k.split(".", 1)[1] in config.retry_kinds}
    failing = len(pc.unique(rows.column(ID).combine_chunks().filter(has_error(rows, config.retry_kinds))))
    return {"rows": len(retried), "succeeded": len(retried) - failing,
            "still_failing": dict(sorted(still.items()))}


def merge_retried(config: EmbedConfig, records: dict[str, dict], shards: list[dict]) -> int:
    """Keep the newest copy of each retried row among its partition's shards; returns the rows
    removed."""
    base = config.out.rstrip("/")
    written = shards_by_partition([n for s in shards for n in s["shards"]])
    return sum(remove_copies(config, records, [f"{base}/{n}" for n in records[key]["shards"] + names])
               for key, names in written.items())


def remove_copies(config: EmbedConfig, records: dict[str, dict], shards: list[str] | None = None) -> int:
    """Keep the newest copy of each id over `shards` (URIs; None: all of OUT's), and name in the
    record of each partition they touch the shards left, with their totals; returns the rows
    removed."""
    so = config.storage_options
    scope = shards if shards is not None else list_shards(config.out, so)
    removed, left = remove_duplicate_rows(config.out, so, config.storage_patience_s, shards=scope)
    now = shards_by_partition(left)
    base = config.out.rstrip("/")
    for key in set(shards_by_partition([s.rsplit("/", 1)[-1] for s in scope])) & set(records):
        names = sorted(now.get(key, []))
        if names == sorted(records[key]["shards"]):
            continue
        totals = shards_totals([f"{base}/{name}" for name in names], so)
        records[key].update(rows=totals["rows"], shards=names, totals=totals)
        write_record(config.out, key, records[key], so, config.storage_patience_s)
    return removed


@dataclass(frozen=True)
class Work:
    """What a run has to do, after what OUT already holds."""

    records: dict[str, dict]  # commit records of partitions done, by key
    scan: IdScan
    partitions: dict[str, str]  # every partition's key -> its file's URI
    retry: pa.Array | None  # with config.retry_kinds: the ids to redo
    done: frozenset[str]  # partitions not to read
    file_slices: list[FileSlices]  # per manifest file, with `done` marked
    todo: list[int]  # the manifest files with rows to read
    already: int  # rows OUT holds for the manifest's partitions
    pending: int  # rows to go through the towers


def work_to_do(config: EmbedConfig, manifest: Manifest, provenance: dict) -> Work:
    # Retrying: only the failed rows, replaced in place (the newest copy of an id is kept).
    retry = rows_to_retry(config, provenance) if config.retry_kinds else None
    records = committed_partitions(config, provenance)
    scan = scan_ids(manifest, frozenset(records), config.partition_rows)
    partitions = {p.key: slices.uri for slices in scan.file_slices for p in slices.partitions}
    # Records of the manifest's files that are not among their partitions now (the file changed
    # size, or the partition size changed) go with their shards: those rows are done again.
    records = drop_changed(config.out, records, partitions, config.storage_options)
    # A retry reads every file for its rows; a run, the partitions not committed yet.
    done = frozenset() if retry is not None else frozenset(records)
    file_slices = [dataclasses.replace(s, done=done & {p.key for p in s.partitions}) for s in scan.file_slices]
    todo = [i for i, s in enumerate(file_slices) if any(p.key not in s.done for p in s.partitions)]
    pending = len(retry) if retry is not None else sum(n for k, n in scan.partition_kept.items() if k not in done)
    return Work(records, scan, partitions, retry, done, file_slices, todo,
                already=sum(records[k]["rows"] for k in partitions if k in records), pending=pending)
