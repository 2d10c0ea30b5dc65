"""Vectors stored as float16 (`--vector-dtype float16`): half the bytes, and every query command
answers on them as it does on float32."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.classify import run_classify
from jobs.embed import run_embed
from jobs.reembed import run_reembed
from pipeline.config import ClassifyConfig, ConfigError, EmbedConfig, ReembedConfig, SearchConfig
from pipeline.query.search import search
from pipeline.query.sql import run_sql
from pipeline.serve.app import make_server
from pipeline.serve.searcher import Searcher
from pipeline.table.store import load_outputs
from pipeline.write.report import render_report
from pipeline.write.shards import list_shards, read_output_provenance
from schemas.embeddings import VECTOR_COLUMNS
from tests.conftest import embedded_corpus, read_output
from tests.corpus import CAPTIONS

DIM = 64  # the tiny test model's
BOTH = ("float32", "float16")


@pytest.fixture(scope="module")
def twins(standard_run, tiny_model, tmp_path_factory):
    """The same corpus embedded twice (towers in float32), stored as float32 (the standard run)
    and as float16, each in its outputs and its table."""
    folder = embedded_corpus(standard_run, tmp_path_factory, "vector-dtype")
    (folder / "out").rename(folder / "out-float32")
    (folder / "db").rename(folder / "db-float32")
    run_embed(EmbedConfig(manifest=str(folder / "manifest.parquet"), out=str(folder / "out-float16"),
                          db=str(folder / "db-float16"), model=tiny_model, dtype="float32",
                          vector_dtype="float16", progress="quiet"))
    halves = pq.read_schema(next((folder / "out-float16").glob("part-*.parquet")))
    assert halves.field("image_embedding").type.value_type == pa.float16()  # what every test reads
    return folder


def _vector_bytes(out) -> int:
    """Bytes of the vector columns in an output's shards, before compression."""
    total = 0
    for shard in out.glob("part-*.parquet"):
        metadata = pq.ParquetFile(shard).metadata
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            total += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                         if group.column(c).path_in_schema.split(".")[0] in VECTOR_COLUMNS)
    return total


def test_float16_outputs_and_table_hold_half_floats_as_close_as_float32(twins):
    half = pa.list_(pa.float16(), DIM)
    schema = pq.read_schema(next((twins / "out-float16").glob("part-*.parquet")))
    assert [schema.field(c).type for c in VECTOR_COLUMNS] == [half, half]
    assert read_output_provenance(str(twins / "out-float16"))["vector_dtype"] == "float16"
    assert read_output_provenance(str(twins / "out-float32"))["vector_dtype"] == "float32"
    table = lancedb.connect(str(twins / "db-float16")).open_table("embeddings")
    assert [table.schema.field(c).type for c in VECTOR_COLUMNS] == [half, half]
    # Half the values' bytes; 15 rows leave page headers and null flags a larger share than usual.
    assert _vector_bytes(twins / "out-float16") < 0.65 * _vector_bytes(twins / "out-float32")

    singles, halves = read_output(twins / "out-float32"), read_output(twins / "out-float16")
    cosines = []
    for row_id, single in singles.items():
        for column in VECTOR_COLUMNS:
            a, b = single[column], halves[row_id][column]
            assert (a is None) == (b is None), (row_id, column)  # the same rows failed
            if a is not None:
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                cosines.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert len(cosines) > 20 and min(cosines) >= 0.999
    print(f"\ncosine float16 to float32 over {len(cosines)} vectors: min {min(cosines):.7f}")


# float16 moves a score by 1e-4 at most here (measured); the tiny random model's rows, its
# captions above all, can be closer to a query than that to each other: ties.
TIE = 3e-4


def test_search_ranks_the_same_rows_on_both(twins):
    def hits(vd, text, against, k):
        return search(SearchConfig(db=str(twins / f"db-{vd}"), text=text, against=against, k=k))

    for text in (CAPTIONS[0], CAPTIONS[1], CAPTIONS[5], CAPTIONS[10]):
        # Text -> images: the top 3 stand apart (gaps over 0.007): the same rows in the same order.
        top = {vd: hits(vd, text, "image", 3) for vd in BOTH}
        assert [h["id"] for h in top["float16"]] == [h["id"] for h in top["float32"]], text
        assert np.allclose([h["score"] for h in top["float16"]], [h["score"] for h in top["float32"]],
                           atol=TIE)
        for against in ("image", "text"):
            # The top 5 too, up to ties: in float32's order, and float32's top 5 but for ties.
            everything = hits("float32", text, against, 100)
            single = {h["id"]: h["score"] for h in everything}
            half = [h["id"] for h in hits("float16", text, against, 5)]
            assert all(single[a] >= single[b] - TIE for a, b in zip(half, half[1:])), (text, against)
            assert min(single[i] for i in half) >= everything[4]["score"] - TIE, (text, against)


def test_sql_sees_float16_vectors_as_float_arrays(twins):
    db16, out16, out32 = (str(twins / p) for p in ("db-float16", "out-float16", "out-float32"))
    probe = read_output(twins / "out-float32")["row-02"]["image_embedding"]
    nearest = ("SELECT id, array_cosine_similarity(image_embedding, {probe}::FLOAT[64]) AS score "
               "FROM {name} WHERE image_embedding IS NOT NULL ORDER BY score DESC LIMIT 3")
    ranked = {}
    for name, db, outputs in (("embeddings", str(twins / "db-float32"), None),
                              ("embeddings", db16, None), ("outputs", None, out16)):
        rows = run_sql(nearest.format(probe=probe, name=name), db, "embeddings", outputs).to_pylist()
        assert rows[0]["id"] == "row-02" and rows[0]["score"] > 0.999
        ranked[(name, db)] = [r["id"] for r in rows]
    assert len(set(map(tuple, ranked.values()))) == 1  # the same 3 rows on every source

    assert run_sql("SELECT typeof(image_embedding) AS t FROM embeddings LIMIT 1", db16,
                   "embeddings", None).to_pylist() == [{"t": "FLOAT[64]"}]
    rows = len(read_output(twins / "out-float16"))
    # The table scanned twice in one query (a self-join, a UNION), and beside float32 outputs.
    twice = run_sql("SELECT count(*) AS n, min(array_cosine_similarity(a.text_embedding, "
                    "b.text_embedding)) AS low FROM embeddings a JOIN embeddings b USING (id) "
                    "WHERE a.text_embedding IS NOT NULL", db16, "embeddings", None).to_pylist()
    assert twice[0]["n"] > 0 and twice[0]["low"] > 0.9999
    union = run_sql("SELECT count(*) AS n FROM (SELECT id FROM embeddings UNION ALL "
                    "SELECT id FROM embeddings)", db16, "embeddings", None).to_pylist()
    assert union == [{"n": 2 * rows}]
    mixed = run_sql("SELECT count(*) AS n, min(array_cosine_similarity(t.image_embedding, "
                    "o.image_embedding)) AS low FROM embeddings t JOIN outputs o USING (id)",
                    db16, "embeddings", out32).to_pylist()
    assert mixed[0]["n"] > 0 and mixed[0]["low"] >= 0.999


def test_classify_gives_the_same_labels_on_both(twins, tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\ncar\nmountain\nsoup\nchildren\nsnow\nnight\n")
    labels = {}
    for vd in BOTH:
        run_classify(ClassifyConfig(db=str(twins / f"db-{vd}"), labels=(str(tmp_path / "labels.txt"),),
                                    out=str(tmp_path / vd)))
        rows = pq.read_table(tmp_path / vd / "labels.parquet").to_pylist()
        labels[vd] = {r["id"]: r["top_labels"] for r in rows}
    assert len(labels["float16"]) > 10 and labels["float16"] == labels["float32"]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_serve_finds_rows_like_a_row_on_float16(twins):
    servers = {}
    for vd in BOTH:
        httpd = make_server(Searcher(str(twins / f"db-{vd}"), "embeddings"), "127.0.0.1", 0, quiet=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers[vd] = httpd
    try:
        base = {vd: f"http://127.0.0.1:{httpd.server_address[1]}" for vd, httpd in servers.items()}
        for row_id in ("row-01", "row-07"):
            similar = {vd: _get(f"{base[vd]}/api/similar/{row_id}?k=4") for vd in BOTH}
            assert similar["float16"]["hits"][0]["id"] == row_id
            assert similar["float16"]["hits"][0]["score"] > 0.9999  # its own stored vector
            assert ([h["id"] for h in similar["float16"]["hits"]]
                    == [h["id"] for h in similar["float32"]["hits"]])
        query = urllib.parse.urlencode({"text": CAPTIONS[1], "k": 4})
        found = {vd: [h["id"] for h in _get(f"{base[vd]}/api/search?{query}")["hits"]] for vd in BOTH}
        assert found["float16"] == found["float32"] and len(found["float16"]) == 4
    finally:
        for httpd in servers.values():
            httpd.shutdown()
            httpd.server_close()


def test_report_reads_float16_outputs(twins):
    page = render_report(str(twins / "out-float16"))
    assert "nearest caption" in page and "No rows with both kinds of vectors" not in page


def test_one_output_and_one_table_hold_one_vector_type(twins, tiny_model):
    with pytest.raises(ConfigError, match="`vector_dtype` bfloat16: choose one of float32, float16"):
        EmbedConfig(manifest="m.parquet", out="out", vector_dtype="bfloat16")
    manifest = str(twins / "manifest.parquet")
    out32 = str(twins / "out-float32")
    shards = list_shards(out32)
    # Resuming float32 outputs as float16 is refused before any work.
    with pytest.raises(ConfigError, match=r"`vector_dtype` float16: `out` .* holds float32 vectors; "
                                          r"rerun with `vector_dtype` float32"):
        run_embed(EmbedConfig(manifest=manifest, out=out32, model=tiny_model, dtype="float32",
                              vector_dtype="float16", progress="quiet"))
    assert list_shards(out32) == shards

    # A table of one type takes no vectors of the other: not from reembed, not from a load.
    db32 = str(twins / "db-float32")
    version = lancedb.connect(db32).open_table("embeddings").version
    with pytest.raises(ConfigError, match="`vector_dtype` float16: table 'embeddings' holds float32 "
                                          "vectors .* rerun with `vector_dtype` float32"):
        run_reembed(ReembedConfig(EmbedConfig(manifest=manifest, out="", db=db32, model=tiny_model,
                                              dtype="float32", vector_dtype="float16")))
    with pytest.raises(ConfigError, match="holds float32 vectors, the outputs float16 ones"):
        load_outputs(str(twins / "out-float16"), db32, "embeddings")
    assert lancedb.connect(db32).open_table("embeddings").version == version

    # Of its own type, a float16 table is up to date: nothing for the towers.
    plan = run_reembed(ReembedConfig(EmbedConfig(manifest=manifest, out="", db=str(twins / "db-float16"),
                                                 model=tiny_model, dtype="float32",
                                                 vector_dtype="float16"), dry_run=True))
    assert not plan["model_stale"] and plan["unchanged"] == len(read_output(twins / "out-float16"))
