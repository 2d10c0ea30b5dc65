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
def db(tiny_model, ray_session, tmp_path_factory):
    return embedded_corpus(tmp_path_factory, "sql", tiny_model)


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


def test_zero_shot_labels_equal_altclip_logits(db, tiny_model, tmp_path):
    from transformers import AltCLIPModel, AltCLIPProcessor, CLIPImageProcessorPil

    labels = ["cat", "dog", "car", "mountain", "soup", "children"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    result = altclip("classify", db / "db", "--labels", tmp_path / "labels.txt")
    assert "labelled" in result.stdout

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
