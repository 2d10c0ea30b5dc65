"""Load outputs into LanceDB and search them, as `altclip load` and `altclip search` do."""

from __future__ import annotations

import json

import lancedb
import pyarrow as pa
import pytest

from tests.conftest import altclip, embedded_corpus, read_output


@pytest.fixture(scope="module")
def db(standard_run, tmp_path_factory):
    return embedded_corpus(standard_run, tmp_path_factory, "search")


def _hits(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_image_query_finds_itself_first(db):
    result = altclip("search", db / "db", "--image", db / "images" / "rgba.png", "--k", "3", "--json")
    assert "test model of RANDOM WEIGHTS" in result.stderr  # the JSON lines on stdout stay whole
    hits = _hits(result)
    assert len(hits) == 3
    assert hits[0]["image"].endswith("images/rgba.png")
    assert hits[0]["score"] > 0.9999
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert set(hits[0]) >= {"id", "score", "caption", "image", "lang", "rank"}
    assert "image_embedding" not in hits[0]


def test_text_query_against_captions_and_a_filter(db):
    outputs = read_output(db / "out")
    caption = outputs["row-03"]["caption"]
    hits = _hits(altclip("search", db / "db", "--text", caption, "--against", "text", "--k", "1",
                         "--json"))
    assert hits[0]["id"] == "row-03" and hits[0]["score"] > 0.9999

    hits = _hits(altclip("search", db / "db", "--text", "una foto de un gato", "--k", "20",
                         "--where", "lang = 'de'", "--json"))
    expected = {i for i, r in outputs.items() if r["lang"] == "de"}
    assert {h["id"] for h in hits} == expected  # text -> image vectors, only German rows


def test_load_upserts_by_id(db):
    result = altclip("load", db / "out", "--db", db / "db")
    assert "0 inserted" in result.stderr
    table = lancedb.connect(str(db / "db")).open_table("embeddings")
    assert table.count_rows() == len(read_output(db / "out"))


def test_a_bad_filter_is_reported(db):
    result = altclip("search", db / "db", "--text", "x", "--where", "no_such_column = 1",
                     expect_exit=1)
    assert "--where 'no_such_column = 1'" in result.stderr


def test_vector_file_hybrid_and_index(db, tmp_path):
    outputs = read_output(db / "out")
    vector_file = tmp_path / "q.json"
    vector_file.write_text(json.dumps(outputs["row-05"]["text_embedding"]))
    hits = _hits(altclip("search", db / "db", "--vector", vector_file, "--against", "text", "--k", "1",
                         "--json"))
    assert hits[0]["id"] == "row-05" and hits[0]["score"] > 0.9999

    caption = outputs["row-07"]["caption"]
    hits = _hits(altclip("search", db / "db", "--text", caption, "--hybrid", "--against", "text",
                         "--k", "3", "--json"))
    assert hits[0]["id"] == "row-07"  # first in both rankings

    result = altclip("table", "index", db / "db")
    assert "too few vectors for an ANN index: search is exact" in result.stderr
    table = altclip("search", db / "db", "--text", "un gato", "--k", "2").stdout.splitlines()
    assert len(table) == 3 and table[0].split()[0] == "rank" and table[1].split()[0] == "1"


@pytest.mark.parametrize("against, column", [("image", "image_embedding"), ("text", "text_embedding")])
def test_rows_without_the_vector_are_never_hits(db, tmp_path, against, column):
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.write.shards import write_shard

    # The corpus's rows, and copies of them under new ids that failed on this side.
    out = tmp_path / "out"
    shutil.copytree(db / "out", out)
    rows = pq.read_table(next(out.glob("part-*.parquet")))
    failed = rows.set_column(rows.schema.get_field_index("id"), "id",
                             pc.binary_join_element_wise("failed-", rows.column("id"), ""))
    failed = failed.set_column(failed.schema.get_field_index(column), rows.schema.field(column),
                               pa.nulls(rows.num_rows, rows.schema.field(column).type))
    write_shard(str(out), failed)
    altclip("load", out, "--db", tmp_path / "db")
    outputs = read_output(out)
    with_vector = {i for i, r in outputs.items() if r[column] is not None}
    assert 0 < len(with_vector) < len(outputs)
    hits = _hits(altclip("search", tmp_path / "db", "--text", "a photo", "--against", against,
                         "--k", str(len(outputs)), "--json"))
    assert {h["id"] for h in hits} == with_vector


def test_lancedb_never_returns_a_null_vector(tmp_path):
    """What `search` and `serve` rely on to search without filtering nulls out (a filter that
    scanned the whole column on every query): indexed, unindexed and exact searches, with and
    without a filter, skip rows whose vector is null."""
    import numpy as np

    rng = np.random.default_rng(0)

    def rows(start: int, n: int, null_share: float) -> pa.Table:
        vectors = [None if rng.random() < null_share else v.tolist()
                   for v in rng.standard_normal((n, 8)).astype(np.float32)]
        return pa.table({"id": [f"r{start + i}" for i in range(n)],
                         "lang": ["en" if i % 3 else "de" for i in range(n)],
                         "v": pa.array(vectors, pa.list_(pa.float32(), 8))})

    table = lancedb.connect(str(tmp_path)).create_table("t", rows(0, 6000, 0.2))
    table.create_index(metric="cosine", vector_column_name="v", index_type="IVF_HNSW_SQ",
                       num_partitions=2, replace=True)
    table.add(rows(6000, 600, 0.5))  # not in the index
    query_vector = rng.standard_normal(8).astype(np.float32)
    for exact in (False, True):
        for where in (None, "lang = 'de'"):
            query = table.search(query_vector, vector_column_name="v").distance_type("cosine").limit(7000)
            query = query.bypass_vector_index() if exact else query.nprobes(8).refine_factor(5)
            if where:
                query = query.where(where, prefilter=True)
            hits = query.select(["id", "v"]).to_list()
            assert hits and all(h["v"] is not None for h in hits), (exact, where)
            assert any(int(h["id"][1:]) >= 6000 for h in hits)  # unindexed rows were searched
