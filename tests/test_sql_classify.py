"""SQL over the table and outputs, and zero-shot classification, through the CLI."""

from __future__ import annotations

import io
import json

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import altclip, embedded_corpus, read_output
from tests.corpus import odd_images


@pytest.fixture(scope="module")
def db(standard_run, tmp_path_factory):
    return embedded_corpus(standard_run, tmp_path_factory, "sql")


def test_sql_over_the_table_and_the_outputs(db):
    rows = [json.loads(line) for line in altclip(
        "sql", db / "db", "SELECT lang, count(*) AS n FROM embeddings GROUP BY lang ORDER BY lang",
        "--json").stdout.splitlines()]
    outputs = read_output(db / "out")
    expected = {}
    for r in outputs.values():
        expected[r["lang"]] = expected.get(r["lang"], 0) + 1
    assert {r["lang"]: r["n"] for r in rows} == expected

    probe = outputs["row-02"]["image_embedding"]
    query = ("SELECT id, array_cosine_similarity(image_embedding, "
             f"{probe}::FLOAT[64]) AS score FROM outputs ORDER BY score DESC LIMIT 1")
    top = json.loads(altclip("sql", query, "--parquet", db / "out", "--json").stdout.splitlines()[0])
    assert top["id"] == "row-02" and top["score"] > 0.9999

    csv = altclip("sql", db / "db", "SELECT id FROM embeddings WHERE width > 600 ORDER BY id",
                  "--csv").stdout.splitlines()
    assert csv[0] == "\"id\"" and len(csv) - 1 == sum(r["width"] > 600 for r in outputs.values())

    result = altclip("sql", db / "db", "SELECT nope FROM embeddings", expect_exit=1)
    assert "SQL: " in result.stderr and "nope" in result.stderr


REFUSED = "which is refused unless --allow-file-access"


@pytest.mark.parametrize("statement, touches", [
    ("SELECT * FROM read_csv('{tmp}/secret.csv')", None),
    ("COPY (SELECT id FROM embeddings) TO '{tmp}/copied.csv'", "copied.csv"),
    ("ATTACH '{tmp}/attached.duckdb' AS other", "attached.duckdb"),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
    ("LOAD '{tmp}/planted.duckdb_extension'", None),
], ids=["read_csv", "copy-to", "attach", "install", "load", "load-file"])
def test_sql_refuses_files_and_extensions(db, tmp_path, statement, touches):
    (tmp_path / "secret.csv").write_text("password\nhunter2\n")
    (tmp_path / "planted.duckdb_extension").write_bytes(b"not an extension")
    result = altclip("sql", db / "db", statement.format(tmp=tmp_path), expect_exit=1)
    assert result.stderr.startswith("Error: SQL: the query tried to read or write files or load "
                                    "extensions") and REFUSED in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "hunter2" not in result.stdout
    if touches:
        assert not (tmp_path / touches).exists()


@pytest.mark.parametrize("statement", [
    "SET enable_external_access = true",
    "PRAGMA enable_external_access = true",
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    # Not a file access itself, but spilling would write into any folder.
    "SET temp_directory = '/'",
    "SET lock_configuration = false",
])
def test_sql_settings_cannot_reopen_file_access(db, statement):
    result = altclip("sql", db / "db", statement, expect_exit=1)
    assert result.stderr.startswith("Error: SQL: the query tried to change the DuckDB setting ")
    assert REFUSED in result.stderr and len(result.stderr.splitlines()) == 1


def test_sql_allow_file_access_opts_back_in(db, tmp_path):
    (tmp_path / "extra.csv").write_text("id,note\nrow-02,kept\n")
    query = (f"SELECT e.id, x.note FROM embeddings e JOIN read_csv('{tmp_path}/extra.csv') x "
             "USING (id)")
    joined = [json.loads(line) for line in altclip(
        "sql", db / "db", query, "--allow-file-access", "--json").stdout.splitlines()]
    assert joined == [{"id": "row-02", "note": "kept"}]
    altclip("sql", db / "db", f"COPY (SELECT id FROM embeddings) TO '{tmp_path}/ids.csv'",
            "--allow-file-access")
    assert (tmp_path / "ids.csv").read_text().splitlines()[0] == "id"

    # With the lock on, the table and the outputs are still read, together and as --csv.
    both = altclip("sql", db / "db", "SELECT count(*) AS n FROM embeddings JOIN outputs USING (id)",
                   "--parquet", db / "out", "--csv").stdout.splitlines()
    assert both == ["\"n\"", str(len(read_output(db / "out")))]


def test_zero_shot_labels_equal_altclip_logits(db, tiny_model, tmp_path):
    from transformers import AltCLIPModel, AltCLIPProcessor, CLIPImageProcessorPil

    labels = ["cat", "dog", "car", "mountain", "soup", "children"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    result = altclip("classify", db / "db", "--labels", tmp_path / "labels.txt")
    assert "labelled" in result.stderr
    assert "test model of RANDOM WEIGHTS" in result.stderr and "MEANINGLESS" in result.stderr

    table = lancedb.connect(str(db / "db")).open_table("embeddings")
    got = {r["id"]: r for r in table.to_arrow().to_pylist()}
    model = AltCLIPModel.from_pretrained(tiny_model).eval()
    tokenizer = AltCLIPProcessor.from_pretrained(tiny_model).tokenizer
    image_processor = CLIPImageProcessorPil.from_pretrained(tiny_model)
    text = tokenizer([f"a photo of a {label}" for label in labels], padding=True, return_tensors="pt")
    images = odd_images()
    checked = 0
    for row_id, row in got.items():
        name = row["image"].split("/")[-1]
        pixels = image_processor(images=Image.open(io.BytesIO(images[name])), return_tensors="pt")
        with torch.inference_mode():
            logits = model(**text, pixel_values=pixels["pixel_values"]).logits_per_image[0]
        assert row["label"] == labels[int(logits.argmax())], row_id
        assert len(row["top_labels"]) == 3 and row["top_labels"][0] == row["label"]
        assert row["label_score"] == pytest.approx(max(row["top_scores"]))
        checked += 1
    assert checked == len(read_output(db / "out"))

    # Several languages: the same classes line by line, averaged; or to Parquet instead.
    (tmp_path / "labels.es.txt").write_text("gato\nperro\ncoche\nmontaña\nsopa\nniños\n")
    altclip("classify", db / "db", "--labels", tmp_path / "labels.txt", "--labels",
            tmp_path / "labels.es.txt", "--template", "a photo of a {}", "--template", "{}",
            "--out", tmp_path / "labels-out")
    written = pq.read_table(tmp_path / "labels-out" / "labels.parquet").to_pylist()
    assert len(written) == checked and {r["label"] for r in written} <= set(labels)
    assert np.all(np.diff([r["top_scores"] for r in written], axis=1) <= 0)
