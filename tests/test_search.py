"""Load outputs into LanceDB and search them, as `altclip load` and `altclip search` do."""

from __future__ import annotations

import json

import lancedb
import pytest

from tests.conftest import altclip, embedded_corpus, read_output


@pytest.fixture(scope="module")
def db(tiny_model, ray_session, tmp_path_factory):
    return embedded_corpus(tmp_path_factory, "search", tiny_model)


def _hits(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_image_query_finds_itself_first(db):
    hits = _hits(altclip("search", db / "db", "--image", db / "images" / "rgba.png", "--k", "3",
                         "--json"))
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
    assert "0 inserted" in result.stdout
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
    assert "too few vectors for an ANN index: search is exact" in result.stdout
    table = altclip("search", db / "db", "--text", "un gato", "--k", "2").stdout.splitlines()
    assert len(table) == 3 and table[0].split()[0] == "rank" and table[1].split()[0] == "1"
