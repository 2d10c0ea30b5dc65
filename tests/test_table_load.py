"""A first load writes the table from Ray tasks (fragments per group of shards, one commit);
later loads upsert. Either way the table holds exactly the outputs' rows."""

from __future__ import annotations

import json
import os

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import lance_io
from pipeline.lance_io import SHARDS_PER_TASK
from pipeline.table import load_outputs, table_provenance
from pipeline.writer import outputs_dataset, write_shard
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema

DIM = 8
WRITE_FRAGMENTS = lance_io._write_fragments
PROVENANCE = {"model": "test/model", "revision": "r1", "dim": DIM, "vector_dtype": "float32"}


def _shard(rng, start: int, rows: int) -> pa.Table:
    schema = embeddings_schema(DIM, [pa.field("lang", pa.string())], PROVENANCE)
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    failed = rng.random(rows) < 0.2  # failed rows keep their row, without a vector
    columns = {name: pa.nulls(rows, schema.field(name).type) for name in schema.names}
    columns.update({
        "id": pa.array([f"row-{start + i:06d}" for i in range(rows)]),
        "caption": pa.array([f"caption {start + i}" for i in range(rows)]),
        "lang": pa.array(rng.choice(["en", "es", "zh"], rows).tolist(), pa.string()),
        IMAGE_EMBEDDING: pa.array([None if f else v.tolist() for v, f in zip(vectors, failed)],
                                  schema.field(IMAGE_EMBEDDING).type),
        "image_error": pa.array([f"decode_error: bad {i}" if f else None for i, f in enumerate(failed)],
                                pa.string()),
    })
    return pa.table(columns, schema=schema)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(7)
    start = 0
    # More shards than one task takes, of uneven sizes, one of them empty.
    for rows in [40, 0, 75, 13, 60, 1, 90, 33, 50, 20, 7]:
        write_shard(str(folder), _shard(rng, start, rows))
        start += rows
    return folder


def _rows(table) -> pa.Table:
    return table.to_arrow().sort_by("id")


def test_a_first_load_is_written_by_tasks_and_equals_the_outputs(outputs, ray_session, tmp_path,
                                                                  monkeypatch):
    driver = os.getpid()

    def in_a_worker(*args):  # _write_fragments, refusing to run in the driver (this process)
        assert os.getpid() != driver, "fragments written by the driver, not by Ray tasks"
        return WRITE_FRAGMENTS(*args)

    monkeypatch.setattr(lance_io, "_write_fragments", in_a_worker)
    expected = outputs_dataset(str(outputs)).to_table().sort_by("id")
    assert len(list(outputs.glob("part-*.parquet"))) > 2 * SHARDS_PER_TASK
    result = load_outputs(str(outputs), str(tmp_path / "db"), "embeddings")
    assert result["inserted"] == expected.num_rows == result["rows"] and result["updated"] == 0
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
    # One task per group of shards, each writing its own fragments (empty groups none).
    assert len(table.to_lance().get_fragments()) >= 2
    assert _rows(table).select(expected.column_names).equals(expected)
    assert table_provenance(table) == PROVENANCE  # the footer's record travels into the table
    assert table.count_rows(f"{IMAGE_EMBEDDING} IS NULL") == pc.sum(
        pc.is_null(expected.column(IMAGE_EMBEDDING))).as_py() > 0
    assert table.count_rows(f"{TEXT_EMBEDDING} IS NOT NULL") == 0

    again = load_outputs(str(outputs), str(tmp_path / "db"), "embeddings")
    assert (again["inserted"], again["updated"], again["rows"]) == (0, expected.num_rows, expected.num_rows)
    assert _rows(table).select(expected.column_names).equals(expected)
    runs = lancedb.connect(str(tmp_path / "db")).open_table("embeddings__runs").to_arrow().to_pylist()
    assert [json.loads(r["details"])["inserted"] for r in runs] == [expected.num_rows, 0]


def test_without_ray_the_driver_writes_the_same_table(outputs, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a plain `altclip load` runs
    expected = outputs_dataset(str(outputs)).to_table().sort_by("id")
    load_outputs(str(outputs), str(tmp_path / "db"), "embeddings")
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
    assert _rows(table).select(expected.column_names).equals(expected)


def test_a_vector_holding_nan_is_loaded_as_null(tmp_path, ray_session):
    rng = np.random.default_rng(3)
    shard = _shard(rng, 0, 5)
    vectors = shard.column(IMAGE_EMBEDDING).to_pylist()
    vectors[1] = [float("nan")] * DIM
    vectors[3] = [1.0] * (DIM - 1) + [float("nan")]
    shard = shard.set_column(shard.schema.get_field_index(IMAGE_EMBEDDING),
                             shard.schema.field(IMAGE_EMBEDDING),
                             pa.array(vectors, shard.schema.field(IMAGE_EMBEDDING).type))
    (tmp_path / "out").mkdir()
    write_shard(str(tmp_path / "out"), shard)
    load_outputs(str(tmp_path / "out"), str(tmp_path / "db"), "embeddings")
    rows = {r["id"]: r for r in lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
            .to_arrow().to_pylist()}
    assert rows["row-000001"][IMAGE_EMBEDDING] is None and rows["row-000003"][IMAGE_EMBEDDING] is None
    assert all(rows[i][IMAGE_EMBEDDING] == vectors[n] for n, i in enumerate(sorted(rows))
               if vectors[n] is not None and n not in (1, 3))
