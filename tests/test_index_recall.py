"""The vector index: what it costs (`altclip table index` reports recall@10 against exact search), and
commands that add columns leave every row in it."""

from __future__ import annotations

import json
import re

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.table.indexes import index_table
from pipeline.table.recall import index_recall
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING
from tests.conftest import altclip

ROWS, DIM = 6000, 32


def _table(folder, vectors: np.ndarray):
    vector_type = pa.list_(pa.float32(), DIM)
    rows = pa.table({
        "id": [f"row-{i:05d}" for i in range(len(vectors))],
        "caption": [f"caption {i}" for i in range(len(vectors))],
        IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), DIM),
        TEXT_EMBEDDING: pa.nulls(len(vectors), vector_type),
    })
    return lancedb.connect(str(folder)).create_table("embeddings", data=rows, on_bad_vectors="null")


def _unit(rng, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def uniform_table(tmp_path_factory):
    table = _table(tmp_path_factory.mktemp("recall"), _unit(np.random.default_rng(1), ROWS))
    index_table(table, rows_per_partition=500)  # 12 partitions: probing one of them must miss
    return table


def test_table_index_prints_the_recall_it_measured(tmp_path):
    _table(tmp_path, _unit(np.random.default_rng(0), ROWS))
    result = altclip("table", "index", tmp_path, "--recall-queries", "20")
    assert f"{IMAGE_EMBEDDING}: IVF_HNSW_SQ, cosine, 1 partitions over {ROWS} vectors" in result.stderr
    measured = re.search(r"recall@10 ([0-9.]+) against exact search on (\d+) sampled rows", result.stderr)
    assert measured, result.stderr
    assert 0.5 <= float(measured.group(1)) <= 1.0 and measured.group(2) == "20"
    assert result.stdout == ""  # stdout is for --json
    quiet = altclip("table", "index", tmp_path, "--recall-queries", "0", "--json")
    assert "recall@" not in quiet.stderr
    built = json.loads(quiet.stdout)["indexes"][IMAGE_EMBEDDING]
    assert built["vectors"] == ROWS and built["partitions"] == 1 and "recall" not in built


def test_recall_tells_a_starved_search_from_a_thorough_one(uniform_table):
    # Uniform random vectors have no neighbourhoods: one partition of twelve holds few of a
    # query's true neighbours, all twelve hold them all.
    starved = index_recall(uniform_table, IMAGE_EMBEDDING, queries=30, nprobes=1, refine_factor=1)
    thorough = index_recall(uniform_table, IMAGE_EMBEDDING, queries=30, nprobes=12, refine_factor=50)
    assert starved["queries"] == thorough["queries"] == 30
    assert starved["recall"] < 0.6
    assert thorough["recall"] >= 0.95


def test_recall_leaves_the_querying_row_out(uniform_table):
    measured = index_recall(uniform_table, IMAGE_EMBEDDING, queries=5, k=1, nprobes=12, refine_factor=50)
    # With its own row counted, k=1 would always be that row, found by both searches: 1.0 for
    # any index. Left out, it is the nearest other row, which a thorough search also finds.
    assert measured["queries"] == 5 and measured["recall"] >= 0.8


def test_no_vectors_no_figure(tmp_path):
    table = _table(tmp_path, np.zeros((0, DIM), np.float32))
    assert index_recall(table, IMAGE_EMBEDDING, queries=10)["recall"] is None


def test_classify_keeps_every_row_in_the_vector_index(tmp_path, tiny_model):
    from schemas.embeddings import PROVENANCE_KEY

    dim = 64  # the tiny model's projection
    vectors = np.random.default_rng(2).standard_normal((ROWS, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = pa.table({
        "id": [f"row-{i:05d}" for i in range(ROWS)],
        "caption": [f"caption {i}" for i in range(ROWS)],
        IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        TEXT_EMBEDDING: pa.nulls(ROWS, pa.list_(pa.float32(), dim)),
    })
    provenance = json.dumps({"model": tiny_model, "dim": dim, "dtype": "float32"})
    rows = rows.replace_schema_metadata({PROVENANCE_KEY: provenance})
    table = lancedb.connect(str(tmp_path)).create_table("embeddings", data=rows, on_bad_vectors="null")
    index_table(table)
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    altclip("classify", tmp_path, "--labels", tmp_path / "labels.txt")
    table.checkout_latest()
    assert table.count_rows("label IS NOT NULL") == ROWS
    index = next(i for i in table.list_indices() if list(i.columns) == [IMAGE_EMBEDDING])
    assert table.index_stats(index.name).num_unindexed_rows == 0
