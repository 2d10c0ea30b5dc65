"""A first load writes the table from Ray tasks (fragments per group of shards, one commit);
later loads upsert. Either way the table holds exactly the outputs' rows."""

from __future__ import annotations

import json
import os
import shutil

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.table import bulk_load as lance_io
from pipeline.table.bulk_load import SHARDS_PER_TASK
from pipeline.table.store import load_outputs, restore_version, table_provenance
from pipeline.write.shards import outputs_dataset, remove_duplicate_rows, write_shard
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema
from tests.conftest import altclip, read_output

DIM = 8
WRITE_FRAGMENTS = lance_io._write_fragments
PROVENANCE = {"model": "test/model", "revision": "r1", "dim": DIM, "vector_dtype": "float32"}


def _shard(rng, start: int, rows: int, metadata: dict[str, pa.Array] | None = None) -> pa.Table:
    """Output rows row-<start>... as an embed writes them; metadata columns: a random `lang`, or
    `metadata`'s."""
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    failed = rng.random(rows) < 0.2  # failed rows keep their row, without a vector
    if metadata is None:
        metadata = {"lang": pa.array(rng.choice(["en", "es", "zh"], rows).tolist(), pa.string())}
    schema = embeddings_schema(DIM, [pa.field(name, values.type) for name, values in metadata.items()],
                               PROVENANCE)
    columns = {name: pa.nulls(rows, schema.field(name).type) for name in schema.names}
    columns.update(metadata)
    columns.update({
        "id": pa.array([f"row-{start + i:06d}" for i in range(rows)]),
        "caption": pa.array([f"caption {start + i}" for i in range(rows)]),
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


def _refusing_the_driver(function, what: str):
    """`function`, failing with `what` if it runs in this process (the driver), not in a Ray task."""
    driver = os.getpid()

    def in_a_worker(*args):
        assert os.getpid() != driver, what
        return function(*args)

    return in_a_worker


def _rows(table) -> pa.Table:
    return table.to_arrow().sort_by("id")


def test_a_first_load_is_written_by_tasks_and_equals_the_outputs(outputs, ray_session, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(lance_io, "_write_fragments", _refusing_the_driver(
        WRITE_FRAGMENTS, "fragments written by the driver, not by Ray tasks"))
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

    # Loaded again unchanged: nothing to upsert, no new version, nothing recorded.
    version = table.version
    again = load_outputs(str(outputs), str(tmp_path / "db"), "embeddings")
    assert (again["inserted"], again["updated"], again["rows"]) == (0, 0, expected.num_rows)
    assert again["shards_already_loaded"] == len(list(outputs.glob("part-*.parquet")))
    assert again["version"] == table.version == version
    runs = lancedb.connect(str(tmp_path / "db")).open_table("embeddings__runs").to_arrow().to_pylist()
    assert [json.loads(r["details"])["inserted"] for r in runs] == [expected.num_rows]


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


def test_a_later_load_upserts_only_the_shards_the_table_has_not_taken(outputs, tmp_path):
    out, db = tmp_path / "out", str(tmp_path / "db")
    shutil.copytree(outputs, out)
    load_outputs(str(out), db, "embeddings")
    table = lancedb.connect(db).open_table("embeddings")
    before = _rows(table)
    # A resumed run adds rows; a retry publishes new copies of some (older copies removed).
    rng = np.random.default_rng(11)
    write_shard(str(out), _shard(rng, 10_000, 25))
    write_shard(str(out), _shard(rng, 5, 4))  # row-000005..08 again, newer
    assert remove_duplicate_rows(str(out))[0] == 4
    result = load_outputs(str(out), db, "embeddings")
    # The new rows, the retried rows, and the rest of the one shard the retry rewrote.
    rewritten = 40 - 4  # the shard of row-000000..39 lost four rows: published again under a new name
    assert (result["inserted"], result["updated"]) == (25, 4 + rewritten)
    expected = outputs_dataset(str(out)).to_table().sort_by("id")
    table = lancedb.connect(db).open_table("embeddings")  # a handle sees the version it opened
    assert _rows(table).select(expected.column_names).to_pylist() == expected.to_pylist()
    assert before.num_rows + 25 == expected.num_rows


def _a_row_per_id(out) -> dict:
    return {row["id"]: row for row in outputs_dataset(str(out)).to_table().to_pylist()}


@pytest.mark.parametrize("seed", range(6))
def test_after_any_history_a_load_leaves_the_table_holding_the_outputs_rows(tmp_path, seed):
    """Random histories of two outputs loaded into one table: runs adding rows, retries
    replacing rows, loads of either, restores to any earlier version, the table dropped and
    made again. After each load of X, every row of X is in the table as X holds it, as if
    every row had been upserted."""
    rng = np.random.default_rng(seed)
    db = str(tmp_path / "db")
    outs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for out in outs.values():
        out.mkdir()
        write_shard(str(out), _shard(rng, 0, int(rng.integers(5, 30))))
    for step in range(30):
        action = rng.choice(["add", "retry", "load", "restore", "drop"], p=[.25, .1, .45, .15, .05])
        out = outs[rng.choice(["a", "b"])]
        if action in ("add", "retry"):  # a run or a retry, ending as every run does
            if action == "add":  # rows new or not, some of the other outputs' ids
                start, rows = int(rng.integers(0, 400)), int(rng.integers(1, 20))
            else:  # new copies of rows this outputs holds
                ids = sorted(_a_row_per_id(out))
                start, rows = int(ids[int(rng.integers(0, len(ids)))].split("-")[1]), 3
            write_shard(str(out), _shard(rng, start, rows))
            remove_duplicate_rows(str(out))
        elif action == "restore" and os.path.exists(f"{db}/embeddings.lance"):
            versions = [v["version"] for v in lancedb.connect(db).open_table("embeddings").list_versions()]
            restore_version(db, "embeddings", int(rng.choice(versions[:-1] or versions)))
        elif action == "drop" and os.path.exists(f"{db}/embeddings.lance"):
            lancedb.connect(db).drop_table("embeddings")  # its record of runs stays behind
        elif action == "load":
            load_outputs(str(out), db, "embeddings")
            held = {row["id"]: row for row in lancedb.connect(db).open_table("embeddings")
                    .to_arrow().to_pylist()}
            for id_, row in _a_row_per_id(out).items():
                assert {k: held[id_][k] for k in row} == row, (step, action, id_)


def test_altclip_load_says_which_shards_it_had_loaded_before(outputs, tmp_path):
    altclip("load", outputs, "--db", tmp_path / "db")
    again = altclip("load", outputs, "--db", tmp_path / "db")
    shards = len(list(outputs.glob("part-*.parquet")))
    assert "0 inserted, 0 updated" in again.output
    assert f"{shards} shards already loaded" in again.output


def test_a_restore_to_before_a_load_makes_the_next_load_take_its_shards_again(outputs, tmp_path):
    out, db = tmp_path / "out", str(tmp_path / "db")
    shutil.copytree(outputs, out)
    first = load_outputs(str(out), db, "embeddings")["version"]
    write_shard(str(out), _shard(np.random.default_rng(5), 10_000, 12))
    assert load_outputs(str(out), db, "embeddings")["inserted"] == 12
    restore_version(db, "embeddings", first)  # the 12 rows are gone from the table
    assert load_outputs(str(out), db, "embeddings")["inserted"] == 12
    assert lancedb.connect(db).open_table("embeddings").count_rows() == outputs_dataset(str(out)).count_rows()


def _ann_segments(db: str) -> list[int]:
    """Rows per segment of the image column's ANN index, and the rows it lacks."""
    stats = lancedb.connect(db).open_table("embeddings").to_lance().stats.index_stats(
        f"{IMAGE_EMBEDDING}_idx")
    return stats["num_indexed_rows_per_delta"] + [stats["num_unindexed_rows"]]


def _indexed_table(tmp_path, rng, rows: int):
    """Outputs of `rows` rows loaded into a new table, which trains its ANN index on them."""
    out, db = tmp_path / "out", str(tmp_path / "db")
    out.mkdir()
    write_shard(str(out), _shard(rng, 0, rows))
    load_outputs(str(out), db, "embeddings")
    return out, db


def test_rows_a_load_adds_join_the_ann_index_as_a_segment_until_it_is_worth_training_again(tmp_path):
    from pipeline.table.indexes import RETRAIN_SHARE

    rng = np.random.default_rng(2)
    out, db = _indexed_table(tmp_path, rng, 8_000)
    trained = _ann_segments(db)
    assert len(trained) == 2 and trained[-1] == 0  # one segment, every vector in it

    added = write_shard(str(out), _shard(rng, 100_000, 300))
    load_outputs(str(out), db, "embeddings")
    segments = _ann_segments(db)
    assert segments[0] == trained[0] and len(segments) == 3 and segments[-1] == 0
    # The new rows are found through the index, each its own nearest row.
    table = lancedb.connect(db).open_table("embeddings")
    new_rows = pa.parquet.read_table(out / added).filter(pc.is_valid(pa.parquet.read_table(out / added)
                                                                     .column(IMAGE_EMBEDDING)))
    for row in new_rows.slice(0, 20).to_pylist():
        hit = table.search(row[IMAGE_EMBEDDING], vector_column_name=IMAGE_EMBEDDING) \
            .metric("cosine").nprobes(8).limit(1).to_arrow()
        assert hit.column("id")[0].as_py() == row["id"]

    # Past RETRAIN_SHARE of the trained rows the index is trained again on all of them.
    write_shard(str(out), _shard(rng, 200_000, int(RETRAIN_SHARE * 8_000) + 100))
    load_outputs(str(out), db, "embeddings")
    assert len(_ann_segments(db)) == 2 and _ann_segments(db)[0] > trained[0]


def test_table_index_trains_the_indexes_again(tmp_path):
    rng = np.random.default_rng(4)
    out, db = _indexed_table(tmp_path, rng, 7_000)
    write_shard(str(out), _shard(rng, 100_000, 200))
    load_outputs(str(out), db, "embeddings")
    assert len(_ann_segments(db)) == 3
    altclip("table", "index", db, "--recall-queries", "0")
    assert len(_ann_segments(db)) == 2


def test_a_load_on_ray_builds_a_large_ann_index_as_segments_on_the_workers(ray_session, tmp_path, monkeypatch):
    """Over ROWS_PER_INDEX_SEGMENT rows, a load on Ray trains the index once and builds it as
    segments over groups of fragments in Ray tasks, committed together: every fragment in one
    segment, every vector found through them; rows added later join as one more segment."""
    from pipeline.table import indexes as table_module
    from schemas.table import ROWS_PER_PARTITION

    monkeypatch.setattr(table_module, "ROWS_PER_INDEX_SEGMENT", SHARDS_PER_TASK * 1_000)
    rng = np.random.default_rng(6)
    out, db = tmp_path / "out", str(tmp_path / "db")
    out.mkdir()
    for i in range(3 * SHARDS_PER_TASK):  # three load tasks, a fragment of 4,000 rows each
        write_shard(str(out), _shard(rng, i * 1_000, 1_000))
    load_outputs(str(out), db, "embeddings")
    table = lancedb.connect(db).open_table("embeddings")
    dataset = table.to_lance()
    segments = [i for i in dataset.list_indices() if i["name"] == f"{IMAGE_EMBEDDING}_idx"]
    fragments = sorted(f.fragment_id for f in dataset.get_fragments())
    assert len(fragments) == 3 and len(segments) == 3
    assert len({s["version"] for s in segments}) == 1  # one build, one commit
    assert sorted(f for s in segments for f in s["fragment_ids"]) == fragments  # each once
    vectors = table.count_rows(f"{IMAGE_EMBEDDING} IS NOT NULL")
    partitions = vectors // ROWS_PER_PARTITION
    assert table_module._ann_segments(table, IMAGE_EMBEDDING) == {
        "name": f"{IMAGE_EMBEDDING}_idx", "trained": 12_000, "added_segments": 0, "added": 0,
        "partitions": partitions}

    def found_through_the_index(rows: pa.Table) -> None:
        for row in rows.filter(pc.is_valid(rows.column(IMAGE_EMBEDDING))).to_pylist():
            hit = table.search(row[IMAGE_EMBEDDING], vector_column_name=IMAGE_EMBEDDING) \
                .metric("cosine").nprobes(partitions).limit(1).to_arrow()
            assert hit.column("id")[0].as_py() == row["id"]

    # The full-text index too, a segment per group of fragments, answers as the index one
    # process builds: the same best caption, the same scores (term statistics of the whole table).
    assert len([i for i in dataset.list_indices() if i["name"] == table_module.FULL_TEXT_INDEX]) == 3
    shutil.copytree(db, tmp_path / "one")
    one = lancedb.connect(str(tmp_path / "one")).open_table("embeddings")
    table_module._full_text_segment(one.to_lance(), None)
    one.checkout_latest()
    assert len([i for i in one.to_lance().list_indices() if i["name"] == table_module.FULL_TEXT_INDEX]) == 1
    for query in ["caption 11999", "caption 4000", "caption 123", "7777"]:
        hits = [t.search(f" {query} ", query_type="fts").limit(10).to_arrow() for t in (table, one)]
        assert hits[0].column("id")[0].as_py() == hits[1].column("id")[0].as_py()
        assert (np.round(hits[0].column("_score").to_numpy(), 4).tolist()
                == np.round(hits[1].column("_score").to_numpy(), 4).tolist())

    # Rows of every segment are each their own nearest row.
    found_through_the_index(pa.concat_tables(
        table.search().where(f"id = 'row-{i:06d}'").to_arrow() for i in range(0, 12_000, 500)))

    added = write_shard(str(out), _shard(rng, 100_000, 300))
    load_outputs(str(out), db, "embeddings")
    table.checkout_latest()
    assert table_module._ann_segments(table, IMAGE_EMBEDDING) == {
        "name": f"{IMAGE_EMBEDDING}_idx", "trained": 12_000, "added_segments": 1, "added": 300,
        "partitions": partitions}
    found_through_the_index(pa.parquet.read_table(out / added).slice(0, 20))

    # `altclip table index` on Ray trains again over every row, as segments again: one per
    # fragment here (4,000, 4,000, 4,000 and the 300 added).
    shown = altclip("table", "index", db, "--recall-queries", "20").stderr
    table.checkout_latest()
    vectors = table.count_rows(f"{IMAGE_EMBEDDING} IS NOT NULL")
    partitions = vectors // ROWS_PER_PARTITION
    assert (f"{IMAGE_EMBEDDING}: IVF_HNSW_SQ, cosine, {partitions} partitions over {vectors} vectors, "
            "built as 4 segments by the cluster's tasks") in shown
    assert table_module._ann_segments(table, IMAGE_EMBEDDING) == {
        "name": f"{IMAGE_EMBEDDING}_idx", "trained": 12_300, "added_segments": 0, "added": 0,
        "partitions": partitions}
    text_segments = [i for i in table.to_lance().list_indices() if i["name"] == table_module.FULL_TEXT_INDEX]
    assert len(text_segments) == 4 and len({s["version"] for s in text_segments}) == 1  # the old ones replaced
    found_through_the_index(pa.parquet.read_table(out / added).slice(0, 20))


def test_on_ray_every_index_is_built_by_tasks_not_by_the_driver(ray_session, tmp_path, monkeypatch):
    """An ANN build holds about 1.3x the vectors it indexes, a full-text build grew 1.6 GiB at 5
    million captions: on Ray the driver builds neither, even under ROWS_PER_INDEX_SEGMENT rows
    (one segment each, over every fragment), nor counts the vectors, nor adds later rows to them."""
    from pipeline.table import indexes as table_module

    for name in ["_index_segment", "_full_text_segment", "_vector_counts", "_index_added_rows"]:
        monkeypatch.setattr(table_module, name, _refusing_the_driver(
            getattr(table_module, name), f"{name} run by the driver, not by a Ray task"))
    monkeypatch.setattr(lancedb.table.LanceTable, "create_index", None)  # the driver's own builds
    rng = np.random.default_rng(9)
    out, db = tmp_path / "out", str(tmp_path / "db")
    out.mkdir()
    for i in range(2 * SHARDS_PER_TASK):  # 8,000 rows, about 6,400 vectors: an ANN index
        write_shard(str(out), _shard(rng, i * 1_000, 1_000))
    load_outputs(str(out), db, "embeddings")
    table = lancedb.connect(db).open_table("embeddings")
    dataset = table.to_lance()
    fragments = sorted(f.fragment_id for f in dataset.get_fragments())
    for name in [f"{IMAGE_EMBEDDING}_idx", table_module.FULL_TEXT_INDEX]:
        segments = [i for i in dataset.list_indices() if i["name"] == name]
        assert len(segments) == 1
        assert sorted(segments[0]["fragment_ids"]) == fragments
    hits = table.search(" caption 7123 ", query_type="fts").limit(1).to_arrow()
    assert hits.column("id").to_pylist() == ["row-007123"]

    write_shard(str(out), _shard(rng, 100_000, 300))  # added to both indexes, by tasks
    load_outputs(str(out), db, "embeddings")
    table.checkout_latest()
    dataset = table.to_lance()
    for name in [f"{IMAGE_EMBEDDING}_idx", table_module.FULL_TEXT_INDEX]:
        assert len([i for i in dataset.list_indices() if i["name"] == name]) == 2


def test_index_segments_hold_what_half_the_largest_node_can_build():
    from pipeline.table.indexes import (
        INDEX_BYTES_PER_VALUE,
        INDEX_TASK_BASE_BYTES,
        ROWS_PER_INDEX_SEGMENT,
        segment_rows,
    )

    assert segment_rows(768, 2**40) == ROWS_PER_INDEX_SEGMENT  # a 1 TiB node builds 10M rows
    assert segment_rows(768, 0) == ROWS_PER_INDEX_SEGMENT  # memory not known
    for dim, memory in [(768, 64 * 2**30), (768, 16 * 2**30), (64, 2 * 2**30), (1024, 8 * 2**30)]:
        rows = segment_rows(dim, memory)
        assert rows < ROWS_PER_INDEX_SEGMENT
        assert INDEX_TASK_BASE_BYTES + rows * dim * INDEX_BYTES_PER_VALUE <= memory // 2
        assert INDEX_TASK_BASE_BYTES + (rows + 1) * dim * INDEX_BYTES_PER_VALUE > memory // 2
    assert segment_rows(768, 2**30) == 1  # too little to spare: a fragment a segment


def test_load_and_table_index_join_a_cluster_only_when_asked(monkeypatch):
    """--address, or RAY_ADDRESS as `ray job submit` sets it, joins that cluster; without
    either, the work stays in the command's process."""
    import pipeline.run.stages
    from jobs.options import join_cluster

    joined = []
    monkeypatch.setattr(pipeline.run.stages, "ensure_ray", joined.append)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    join_cluster(None)
    assert joined == []
    join_cluster("auto")
    assert joined == ["auto"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    join_cluster(None)
    assert joined == ["auto", None]


def test_altclip_load_with_address_writes_the_table_through_that_cluster(ray_session, tmp_path):
    import subprocess
    import sys

    import ray

    rng = np.random.default_rng(8)
    out, db = tmp_path / "out", tmp_path / "db"
    out.mkdir()
    for i in range(2 * SHARDS_PER_TASK):  # two write tasks
        write_shard(str(out), _shard(rng, i * 100, 100))
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    address = ray.get_runtime_context().gcs_address  # the test session's Ray, as a cluster
    result = subprocess.run([altclip_bin, "load", str(out), "--db", str(db), "--address", address],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "800 rows: 800 inserted" in result.stderr
    table = lancedb.connect(str(db)).open_table("embeddings")
    assert sorted(table.to_arrow().column("id").to_pylist()) == sorted(
        outputs_dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist())


# --- Outputs of manifests with other metadata columns; repeated ids ----------------------------

LANG = {"lang": lambda ids: pa.array([f"lang of {i}" for i in ids])}
TAGS_YEAR = {"tags": lambda ids: pa.array([[f"tag {i}", "x"] for i in ids], pa.list_(pa.string())),
             "year": lambda ids: pa.array([1900 + i for i in ids], pa.int64())}


def _outputs(folder, rng, first: int, rows: int, columns: dict, shards: int = 2):
    """`shards` shards of rows row-<first>... with these metadata columns (values made from the
    row's number); returns the folder."""
    folder.mkdir()
    for part in np.array_split(np.arange(first, first + rows), shards):
        ids = part.tolist()
        write_shard(str(folder), _shard(rng, ids[0], len(ids), {n: make(ids) for n, make in columns.items()}))
    return folder


@pytest.mark.parametrize("first_columns, then_columns", [(LANG, TAGS_YEAR), (TAGS_YEAR, LANG)],
                         ids=["lang-then-tags-year", "tags-year-then-lang"])
def test_a_load_adds_the_metadata_columns_the_table_lacks(tmp_path, first_columns, then_columns):
    """Outputs of a second manifest, whose metadata columns differ, into the first's table: the
    new columns are added, null in the rows that came before; the second's rows are null in the
    first's columns when new, and keep their values there when they replace a row."""
    rng = np.random.default_rng(12)
    first = _outputs(tmp_path / "first", rng, 0, 30, first_columns)
    then = _outputs(tmp_path / "then", rng, 20, 30, then_columns)  # rows 20..29 in both
    db = tmp_path / "db"
    altclip("load", first, "--db", db)
    shown = altclip("load", then, "--db", db).stderr
    assert "(50 rows: 20 inserted, 10 updated;" in shown
    assert f"columns added: {', '.join(then_columns)}" in shown

    table = lancedb.connect(str(db)).open_table("embeddings")
    assert table.count_rows() == 50 and len(set(table.to_arrow().column("id").to_pylist())) == 50
    for name in [*first_columns, *then_columns]:  # each column in its outputs' type
        outputs = outputs_dataset(str(first if name in first_columns else then))
        assert table.schema.field(name).type == outputs.schema.field(name).type
    held = {row["id"]: row for row in table.to_arrow().to_pylist()}
    firsts, thens = _a_row_per_id(first), _a_row_per_id(then)
    for number in range(50):
        id_ = f"row-{number:06d}"
        row = held[id_]
        if number < 20:  # the first's rows alone: the second's columns null
            assert {k: row[k] for k in firsts[id_]} == firsts[id_]
            assert all(row[name] is None for name in then_columns)
        else:  # the second's rows, values as it holds them
            assert {k: row[k] for k in thens[id_]} == thens[id_]
            for name in first_columns:  # new rows null there; replaced rows keep the first's values
                assert row[name] == (firsts[id_][name] if number < 30 else None), (id_, name)
    assert held["row-000025"][IMAGE_EMBEDDING] == thens["row-000025"][IMAGE_EMBEDDING]


def test_a_column_of_another_type_is_refused_before_anything_is_written(tmp_path):
    rng = np.random.default_rng(13)
    db = tmp_path / "db"
    altclip("load", _outputs(tmp_path / "a", rng, 0, 10, TAGS_YEAR), "--db", db)
    table = lancedb.connect(str(db)).open_table("embeddings")
    version, rows = table.version, _rows(table)
    # `year` as text (a CSV manifest), with a column the table lacks: neither is written.
    as_text = {"year": lambda ids: pa.array([str(1900 + i) for i in ids]), **LANG}
    refused = altclip("load", _outputs(tmp_path / "b", rng, 5, 10, as_text), "--db", db, expect_exit=1)
    assert refused.stderr.strip() == (
        "Error: column 'year' is string in the outputs, int64 in table 'embeddings' (a column "
        "holds one type): load them into another table with --table")
    table.checkout_latest()
    assert table.version == version and _rows(table).equals(rows) and "lang" not in table.schema.names

    # Outputs whose own shards disagree (two manifests' runs into one folder): refused, naming both.
    narrower = {"year": lambda ids: pa.array([2000 + i for i in ids], pa.int32())}
    mixed = _outputs(tmp_path / "mixed", rng, 30, 4, narrower)
    write_shard(str(mixed), _shard(rng, 40, 2, {"year": pa.array(["2040", "2041"])}))
    shards = sorted(p.name for p in mixed.glob("part-*.parquet"))
    refused = altclip("load", mixed, "--db", db, expect_exit=1)
    assert refused.stderr.strip() == (
        f"Error: column 'year' is int32 in shard {shards[0]} and string in shard {shards[2]} (a column "
        "holds one type): load the shards of each kind from a folder of their own, into a table each")
    table.checkout_latest()
    assert table.version == version

    # A narrower number is taken, as the table's type.
    altclip("load", _outputs(tmp_path / "c", rng, 5, 10, narrower), "--db", db)
    table.checkout_latest()
    assert table.schema.field("year").type == pa.int64() and table.count_rows() == 15
    assert table.search().where("id = 'row-000012'").to_arrow().column("year").to_pylist() == [2012]


@pytest.mark.parametrize("on_ray", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-process", "ray-tasks"])
def test_a_repeated_id_is_loaded_once_from_its_newest_shard(tmp_path, request, monkeypatch, on_ray):
    """Outputs holding an id more than once (shards put together by hand, an older version's
    leftovers): a load takes each id once, the last copy of the newest shard, and says how many
    rows it left out, on a first load and on an upsert alike."""
    import ray

    if on_ray:
        request.getfixturevalue("ray_session")  # the id check runs as Ray tasks, in buckets
    else:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a plain `altclip load` runs
    rng = np.random.default_rng(14)
    out, db = tmp_path / "out", tmp_path / "db"
    out.mkdir()

    def shard(ids: list[int], label: str):
        rows = _shard(rng, 0, len(ids))
        rows = rows.set_column(0, rows.schema.field("id"), pa.array([f"row-{i:06d}" for i in ids]))
        captions = pa.array([f"{label} {n}" for n in range(len(ids))])
        write_shard(str(out), rows.set_column(rows.schema.get_field_index("caption"), "caption", captions))

    # Shards sort by their run's stamp: each later shard is newer. More shards than a task reads.
    shard(list(range(0, 10)), "first")
    shard(list(range(10, 20)), "second")
    shard([3, 4, 20, 21, 20], "third")  # 3, 4 again; 20 twice in one shard
    for n in range(3):
        shard(list(range(100 + 10 * n, 110 + 10 * n)), f"filler{n}")
    shard([4, 30], "newest")
    shown = altclip("load", out, "--db", db).stderr
    # Left out: 3 and 4 of "first", 4 of "third", the first 20 of "third".
    assert "4 rows of repeated ids left out (each id loaded once, from its newest shard)" in shown
    table = lancedb.connect(str(db)).open_table("embeddings")
    captions = dict(zip(*(table.to_arrow().column(c).to_pylist() for c in ("id", "caption"))))
    assert table.count_rows() == len(captions) == 20 + 2 + 30 + 1
    assert [captions[f"row-{i:06d}"] for i in (3, 4, 20, 21, 30, 5)] == [
        "third 0", "newest 0", "third 4", "third 3", "newest 1", "first 5"]

    # An upsert of shards repeating ids among themselves and the table's.
    shard([5, 5, 40], "later")
    shard([40, 41], "latest")
    shown = altclip("load", out, "--db", db).stderr
    assert "(55 rows: 2 inserted, 1 updated;" in shown and "2 rows of repeated ids left out" in shown
    table.checkout_latest()
    captions = dict(zip(*(table.to_arrow().column(c).to_pylist() for c in ("id", "caption"))))
    assert table.count_rows() == len(captions) == 55
    assert [captions[f"row-{i:06d}"] for i in (5, 40, 41)] == ["later 1", "latest 0", "latest 1"]


def _captions_manifest(path, first: int, rows: int, columns: dict) -> str:
    """A JSON Lines manifest of captions (embedded by the text tower alone: quick) with these
    metadata columns, values made from the row's number."""
    with open(path, "w") as f:
        for number in range(first, first + rows):
            values = {name: make([number])[0].as_py() for name, make in columns.items()}
            f.write(json.dumps({"id": f"row-{number:06d}", "caption": f"caption {number}", **values}) + "\n")
    return str(path)


def test_embed_db_adds_new_columns_refuses_another_type_before_embedding_and_says_when_only_its_load_failed(
        tiny_model, ray_session, tmp_path):
    embed = ("--model", tiny_model, "--towers", "text", "--dtype", "float32", "--batch-size", "8")
    # A table of another model's vectors: the embed runs, and only its load is refused.
    other = tmp_path / "other-db"
    altclip("load", _outputs(tmp_path / "other-out", np.random.default_rng(15), 0, 5, LANG), "--db", other)
    first = tmp_path / "first"
    failed = altclip("embed", _captions_manifest(tmp_path / "first.jsonl", 0, 12, LANG), "--out", first,
                     *embed, "--db", other, expect_exit=1)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in failed.output, failed.output
    assert errors[0].startswith(f"Error: the embed finished and its outputs in {first} are complete, "
                                "but their load into table 'embeddings' failed (table 'embeddings' "
                                "holds vectors of ('test/model', 'r1', 8)")
    assert errors[0].endswith(f"once that is fixed, load them with `altclip load {first} --db {other} "
                              "--table embeddings`")
    assert len(read_output(first)) == 12 and (first / "summary.json").exists()

    # Loaded where the user meant, then a manifest with other columns embedded into the same table.
    db = tmp_path / "db"
    altclip("load", first, "--db", db)
    then = altclip("embed", _captions_manifest(tmp_path / "then.jsonl", 8, 10, TAGS_YEAR), "--out",
                   tmp_path / "then", *embed, "--db", db)
    assert "(18 rows: 6 inserted, 4 updated;" in then.stderr and "columns added: tags, year" in then.stderr
    table = lancedb.connect(str(db)).open_table("embeddings")
    held = {row["id"]: row for row in table.to_arrow().to_pylist()}
    assert len(held) == 18
    assert held["row-000002"]["lang"] == "lang of 2" and held["row-000002"]["year"] is None
    assert held["row-000009"]["lang"] == "lang of 9" and held["row-000009"]["tags"] == ["tag 9", "x"]
    assert held["row-000017"]["lang"] is None and held["row-000017"]["year"] == 1917

    # `year` as text against the table's numbers: refused before any embedding.
    version = table.version
    as_text = {"year": lambda ids: pa.array([f"year {i}" for i in ids])}
    refused = altclip("embed", _captions_manifest(tmp_path / "text.jsonl", 30, 5, as_text), "--out",
                      tmp_path / "text", *embed, "--db", db, expect_exit=1)
    assert refused.stderr.strip().splitlines()[-1] == (
        "Error: metadata column 'year' is string in the manifest, int64 in table 'embeddings' (a "
        "column holds one type): rename the column in the manifest, or embed into another table "
        "with --table")
    assert not list((tmp_path / "text").glob("part-*.parquet"))
    assert not (tmp_path / "text" / "summary.json").exists()
    table.checkout_latest()
    assert table.version == version
