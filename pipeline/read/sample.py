"""A manifest's row count and rows spread over it, read from its files directly (no Ray): the
rows `embed --plan` times, and the number it projects them to."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.read import webdataset
from pipeline.read.formats import flatten_webdataset
from pipeline.read.ids import file_ids, file_rows
from pipeline.read.manifest import Manifest, to_contract_columns


def count_rows(manifest: Manifest) -> tuple[list[int], str]:
    """Rows of each file of the manifest, and how they were counted: Parquet's footers (no row
    read), or a pass over the files (CSV and JSON Lines: every id read; WebDataset: every member
    header), the same reading the run does before any work."""
    fs = manifest.filesystem()
    counts = []
    for path in manifest.files:
        if manifest.format in ("csv", "json"):
            counts.append(len(file_ids(manifest, fs, path)[0]))
            continue
        try:
            with fs.open(path, "rb") as f:
                counts.append(pq.ParquetFile(f).metadata.num_rows if manifest.format == "parquet"
                              else len(webdataset.index_shard(f).samples))
        except Exception as exc:  # a damaged file: say which
            raise ConfigError(f"cannot read manifest file {storage.unstrip(fs, path)}: "
                              f"{storage.describe(exc)}") from None
    return counts, "parquet_metadata" if manifest.format == "parquet" else "count_pass"


def spread_positions(total: int, n: int) -> list[int]:
    """`n` row positions spread evenly over `total` rows, each in the middle of its stretch: the
    sample sees the start, the middle and the end of the manifest alike."""
    n = min(n, total)
    return [int((k + 0.5) * total / n) for k in range(n)]


def _per_file(positions: list[int], counts: list[int]) -> list[list[int]]:
    """Ascending manifest positions -> positions within each file."""
    out, start = [], 0
    for count in counts:
        out.append([p - start for p in positions if start <= p < start + count])
        start += count
    return out


def read_sample(manifest: Manifest, counts: list[int], positions: list[int]) -> pa.Table:
    """The manifest's rows at `positions`, in the contract's columns, as the run reads them.
    Parquet reads only the row groups holding them; a WebDataset sample keeps its image as its
    member's URI (read when it is fetched) rather than the whole shard in memory."""
    fs = manifest.filesystem()
    parts = []
    for path, local in zip(manifest.files, _per_file(positions, counts)):
        if not local:
            continue
        if manifest.format == "parquet":
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                parts.extend(parquet.read_row_group(g).take(inside)
                             for g, inside in enumerate(_per_file(local, sizes)) if inside)
        elif manifest.format == "webdataset":
            with fs.open(path, "rb") as f:
                index = webdataset.index_shard(f, (webdataset.CAPTION_SUFFIX, webdataset.METADATA_SUFFIX))
            samples = [index.samples[p] for p in local]
            rows = webdataset.sample_table(samples, storage.unstrip(fs, path))
            parts.append(flatten_webdataset(rows, manifest.schema))
        else:
            parts.append(file_rows(manifest, fs, path).take(local))
    return to_contract_columns(pa.concat_tables(parts, promote_options="default"), manifest)
