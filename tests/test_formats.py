"""Manifests in every format and layout give the same vectors; foreign column names map by option."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import altclip, embedded_corpus, read_output
from tests.corpus import odd_images


@pytest.fixture(scope="module")
def baseline(standard_run, tmp_path_factory):
    folder = embedded_corpus(standard_run, tmp_path_factory, "formats")
    return folder, pq.read_table(folder / "manifest.parquet"), read_output(folder / "out")


def _same_vectors(got: dict, expected: dict):
    assert set(got) == set(expected)
    for row_id, row in expected.items():
        for column in ("image_embedding", "text_embedding"):
            np.testing.assert_allclose(got[row_id][column], row[column], atol=1e-6)


def test_csv_jsonl_folder_and_glob(tiny_model, baseline, tmp_path):
    folder, table, expected = baseline
    pacsv.write_csv(table, folder / "manifest.csv")
    with open(folder / "manifest.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    parts = folder / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 4), parts / "a.parquet")
    pq.write_table(table.slice(4), parts / "b.parquet")
    (parts / "_SUCCESS").write_text("")
    # Images are relative to the manifest's own folder: copy them beside the parts.
    (parts / "images").symlink_to(folder / "images")

    for n, manifest in enumerate([folder / "manifest.csv", folder / "manifest.jsonl", parts,
                                  f"{parts}/*.parquet"]):
        out = tmp_path / f"out{n}"
        altclip("embed", manifest, "--out", out, "--model", tiny_model, "--dtype", "float32")
        _same_vectors(read_output(out), expected)


def test_foreign_column_names_and_inline_bytes(tiny_model, baseline, tmp_path):
    folder, table, expected = baseline
    images = odd_images()
    names = [p.split("/")[-1] for p in table.column("image").to_pylist()]
    foreign = pa.table({
        "key": table.column("id"),
        "jpg": pa.array([images[n] for n in names], pa.binary()),
        "TEXT": table.column("caption"),
    })
    pq.write_table(foreign, tmp_path / "foreign.parquet")
    out = tmp_path / "out"
    altclip("embed", tmp_path / "foreign.parquet", "--out", out, "--model", tiny_model,
            "--dtype", "float32", "--id-col", "key", "--image-col", "jpg", "--caption-col", "TEXT")
    got = read_output(out)
    _same_vectors(got, expected)
    assert all(r["image"] is None for r in got.values())  # inline bytes are not copied out


def test_one_tower_only(tiny_model, baseline, tmp_path):
    folder, table, expected = baseline
    out = tmp_path / "out"
    altclip("embed", folder / "manifest.parquet", "--out", out, "--model", tiny_model,
            "--dtype", "float32", "--towers", "text")
    got = read_output(out)
    assert all(r["image_embedding"] is None and r["image_error"] is None for r in got.values())
    for row_id, row in expected.items():
        np.testing.assert_allclose(got[row_id]["text_embedding"], row["text_embedding"], atol=1e-6)


def test_an_autoscaling_actor_pool(tiny_model, baseline, tmp_path):
    folder, table, expected = baseline
    out = tmp_path / "out"
    altclip("embed", folder / "manifest.parquet", "--out", out, "--model", tiny_model,
            "--dtype", "float32", "--concurrency", "1,2", "--batch-size", "4")
    _same_vectors(read_output(out), expected)
    result = altclip("embed", folder / "manifest.parquet", "--out", tmp_path / "bad", "--model",
                     tiny_model, "--concurrency", "3,1", expect_exit=1)
    assert "N, or MIN,MAX with 1 <= MIN <= MAX" in result.stderr


def test_a_folder_of_images_is_a_manifest(tiny_model, baseline, tmp_path):
    """`altclip embed FOLDER` of image files, as clip-retrieval takes one: ids their paths under
    it, captions from same-named .txt files; hidden folders, markers and other files are not
    rows, nor is an OUT inside the folder; the rerun resumes."""
    folder, _, expected = baseline
    by_name = {row["image"].rsplit("/", 1)[1]: row for row in expected.values()}
    corpus = tmp_path / "photos"
    (corpus / "00000" / "deeper").mkdir(parents=True)
    (corpus / ".thumbnails").mkdir()
    where = {}
    for n, (name, data) in enumerate(sorted(odd_images().items())):
        relative = [name, f"00000/{name}", f"00000/deeper/{name}"][n % 3]
        (corpus / relative).write_bytes(data)
        where[relative] = name
    at = {name: relative for relative, name in where.items()}
    # img2dataset's `files` output puts KEY.json beside KEY.jpg, and a shard's metadata beside its
    # folder (00000.parquet, 00000_stats.json beside 00000/): they describe images, not a manifest.
    for name in ("landscape.jpg", "wide.jpg"):
        (corpus / at[name]).with_suffix(".json").write_text(json.dumps({"key": name, "status": "success"}))
    pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), corpus / "00000.parquet")
    (corpus / "00000_stats.json").write_text(json.dumps({"count": 1}))
    (corpus / at["landscape.jpg"]).with_suffix(".txt").write_text("un paisaje\n")
    (corpus / at["portrait.png"]).with_suffix(".txt").write_bytes(b"\xff\xfe not utf-8")
    (corpus / ".thumbnails" / "landscape.jpg").write_bytes(odd_images()["landscape.jpg"])
    (corpus / "_SUCCESS").write_text("")
    (corpus / "notes.md").write_text("not an image")
    args = ["embed", corpus, "--out", corpus / "out", "--model", tiny_model, "--dtype", "float32"]

    result = altclip(*args)
    assert "no captions" not in result.stderr
    got = read_output(corpus / "out")
    assert set(got) == set(where)
    for relative, name in where.items():
        row, same_image = got[relative], by_name[name]
        assert row["image"] == str(corpus / relative)
        assert row["image_error"] == same_image["image_error"]
        if same_image["image_embedding"] is not None:
            np.testing.assert_allclose(row["image_embedding"], same_image["image_embedding"], atol=1e-6)
    captioned = got[at["landscape.jpg"]]
    assert captioned["caption"] == "un paisaje" and captioned["text_embedding"] is not None
    assert got[at["portrait.png"]]["text_error"].startswith("invalid_caption")
    assert got[at["tiny.png"]]["text_error"] == "empty_caption: caption is null"

    result = altclip(*args)
    assert "nothing to do" in result.stderr
    assert json.loads((corpus / "out" / "summary.json").read_text())["rows_embedded"] == 0


def test_which_manifest_files_describe_images():
    from pipeline.read.image_folder import ImageNames

    names = ImageNames(["c/00000/000000001.jpg", "c/00000/000000002.jpg", "c/photos/a.png"])
    assert names.describe("c/00000/000000001.json")  # a sidecar
    assert names.describe("c/00000.parquet") and names.describe("c/00000_stats.json")
    assert not names.describe("c/photos.parquet")  # a manifest beside its images' folder
    assert not names.describe("c/manifest.csv") and not names.describe("c/00001.parquet")
