"""Every manifest row ends in the output once: with its vectors, or with a precise error."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import altclip, read_output
from tests.corpus import odd_images


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_rows_get_errors_and_the_job_succeeds(tiny_model, ray_session, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    good = _jpeg()
    (images / "good.jpg").write_bytes(good)
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "random.jpg").write_bytes(bytes(range(256)) * 10)
    (images / "page.jpg").write_bytes(b"<html><body>404 Not Found</body></html>")
    (images / "empty.jpg").write_bytes(b"")
    (images / "folder.jpg").mkdir()
    rows = [
        {"id": "good", "image": "images/good.jpg", "caption": "a red rectangle"},
        {"id": "missing", "image": "images/nope.jpg", "caption": "still has a caption"},
        {"id": "truncated", "image": "images/truncated.jpg", "caption": "cut short"},
        {"id": "random", "image": "images/random.jpg", "caption": "noise"},
        {"id": "html", "image": "images/page.jpg", "caption": "an error page"},
        {"id": "empty-file", "image": "images/empty.jpg", "caption": "zero bytes"},
        {"id": "directory", "image": "images/folder.jpg", "caption": "a folder"},
        {"id": "no-image", "image": None, "caption": "text only"},
        {"id": "null-caption", "image": "images/good.jpg", "caption": None},
        {"id": "blank-caption", "image": "images/good.jpg", "caption": "  \t "},
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"

    result = altclip("embed", manifest, "--out", out, "--model", tiny_model, "--batch-size", "3")

    got = read_output(out)
    assert set(got) == {r["id"] for r in rows}
    kinds = {i: (r["image_error"] or "").split(":")[0] or None for i, r in got.items()}
    assert kinds == {
        "good": None, "missing": "not_found", "truncated": "truncated", "random": "decode_error",
        "html": "decode_error", "empty-file": "decode_error", "directory": "read_error",
        "no-image": "no_image", "null-caption": None, "blank-caption": None,
    }
    for row_id, row in got.items():
        assert (row["image_embedding"] is None) == (kinds[row_id] is not None), row_id
        assert len(row["text_embedding"] or []) in (0, 64)
    assert got["missing"]["text_embedding"] is not None  # a failed image keeps its caption's vector
    assert got["null-caption"]["text_error"].startswith("empty_caption:")
    assert got["blank-caption"]["text_error"].startswith("empty_caption:")
    assert got["blank-caption"]["image_embedding"] is not None
    assert got["good"]["image_sha256"] is not None and got["good"]["width"] == 320

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    assert summary["image_ok"] == 3 and summary["text_ok"] == 8
    assert summary["errors_by_kind"] == {
        "image.decode_error": 3, "image.no_image": 1, "image.not_found": 1,
        "image.read_error": 1, "image.truncated": 1, "text.empty_caption": 2,
    }
    assert "output: 10 of 10 manifest rows" in result.stderr

    # Each shard's writer put its own totals in its footer: the summary adds those up, reading
    # no rows; a shard without them (written by an older version) is counted from its rows.
    from pipeline.write.shards import TOTALS_KEY, output_totals, shard_totals

    shards = sorted(out.glob("part-*.parquet"))
    for shard in shards:
        assert json.loads(pq.read_schema(shard).metadata[TOTALS_KEY]) == shard_totals(pq.read_table(shard))
    before = output_totals(str(out))
    old = pq.read_table(shards[0])
    pq.write_table(old.replace_schema_metadata({k: v for k, v in old.schema.metadata.items()
                                                if k != TOTALS_KEY}), shards[0])
    assert TOTALS_KEY not in pq.read_schema(shards[0]).metadata
    assert output_totals(str(out)) == before
    assert before["rows"] == 10 and before["errors"] == summary["errors_by_kind"]


def test_metadata_columns_are_carried_through(tiny_model, ray_session, tmp_path):
    (tmp_path / "a.png").write_bytes(odd_images()["exact.png"])
    table = pa.table({
        "id": ["a"], "image": ["a.png"], "caption": ["un gato"],
        "lang": ["es"], "score": [0.5], "width": [999],  # `width` clashes with an output column
    })
    pq.write_table(table, tmp_path / "m.parquet")
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model)
    row = read_output(tmp_path / "out")["a"]
    assert row["lang"] == "es" and row["score"] == 0.5
    assert row["manifest_width"] == 999 and row["width"] == 224


def test_a_file_without_read_permission_is_its_rows_read_error(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.decode.barrier import ImageError
    from pipeline.decode.fetch import read_bytes

    path = tmp_path / "locked.jpg"
    path.write_bytes(_jpeg())
    path.chmod(0)
    if os.geteuid() == 0:
        # Root reads any file: make the open fail the way it does for every other user.
        real_open = LocalFileSystem._open

        def refuse(self, p, *args, **kwargs):
            if str(p).endswith("locked.jpg"):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(self, p, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "_open", refuse)
    with pytest.raises(ImageError) as raised:
        read_bytes(str(path))
    assert str(raised.value) == f"read_error: {path}: permission denied"


def test_an_out_shared_by_two_manifests_says_whose_rows_it_holds(tiny_model, ray_session, tmp_path):
    (tmp_path / "a.png").write_bytes(odd_images()["exact.png"])
    first = tmp_path / "first.parquet"
    second = tmp_path / "second.parquet"
    pq.write_table(pa.table({"id": ["a1", "a2", "a3"], "image": ["a.png"] * 3, "caption": ["x"] * 3}), first)
    pq.write_table(pa.table({"id": ["b1", "b2"], "image": ["a.png"] * 2, "caption": ["y"] * 2}), second)
    out = tmp_path / "out"
    altclip("embed", first, "--out", out, "--model", tiny_model, "--towers", "text")
    result = altclip("embed", second, "--out", out, "--model", tiny_model, "--towers", "text")
    assert ("output: 2 of 2 manifest rows, and 3 rows of other manifests embedded into this OUT "
            "before") in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_out"] == 5 and summary["rows_of_other_manifests"] == 3
    assert len(read_output(out)) == 5
    again = altclip("embed", second, "--out", out, "--model", tiny_model, "--towers", "text")
    assert "nothing to do: all 2 rows are already in the output" in again.stderr
