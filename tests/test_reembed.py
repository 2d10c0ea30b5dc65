"""Nightly re-embedding: only what changed runs through the towers; the table ends as a fresh
embed of the new manifest would; versions can be listed and restored."""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import altclip, read_output


def _image(path, seed: int):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)


def _write(folder, rows, name):
    path = folder / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _table_rows(db) -> dict[str, dict]:
    table = lancedb.connect(str(db)).open_table("embeddings")
    return {r["id"]: r for r in table.to_arrow().to_pylist()}


def _reembed(*args) -> dict:
    result = altclip("reembed", *args, "--json")
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reembed")
    (folder / "images").mkdir()
    day1 = []
    for n in range(200):
        _image(folder / "images" / f"{n:03d}.png", seed=n)
        day1.append({"id": f"r{n:03d}", "image": f"images/{n:03d}.png", "caption": f"photo number {n}"})
    day1_manifest = _write(folder, day1, "day1.parquet")
    return folder, day1, day1_manifest


def test_day_two_embeds_only_what_changed(days, tiny_model, ray_session, tmp_path):
    folder, day1, day1_manifest = days
    db = tmp_path / "db"
    first = _reembed(day1_manifest, "--db", db, "--model", tiny_model, "--dtype", "float32")
    assert first["new"] == 200 and first["image_tower_rows"] == 200 and first["text_tower_rows"] == 200
    day1_rows = _table_rows(db)

    # Day 2: 10 removed, 10 captions changed, 10 images replaced in place, 20 new rows with new
    # images, 5 new rows whose images are copies of existing ones (with new captions).
    day2 = [dict(r) for r in day1[10:]]
    for r in day2[:10]:
        r["caption"] += " (edited)"
    for n in range(20, 30):
        _image(folder / "images" / f"{n:03d}.png", seed=1000 + n)  # the same file name, new bytes
    for n in range(200, 220):
        _image(folder / "images" / f"{n:03d}.png", seed=n)
        day2.append({"id": f"r{n:03d}", "image": f"images/{n:03d}.png", "caption": f"photo number {n}"})
    for n in range(5):
        day2.append({"id": f"copy{n}", "image": f"images/{100 + n:03d}.png", "caption": f"a copy {n}"})
    day2_manifest = _write(folder, day2, "day2.parquet")

    dry = altclip("reembed", day2_manifest, "--db", db, "--model", tiny_model, "--dtype", "float32",
                  "--prune", "--dry-run")
    assert "dry run, nothing changed: new 25, image changed 10, caption changed 10" in dry.stderr
    assert "would embed 30 images and 35 captions, reuse 5 image vectors" in dry.stderr
    assert dry.stdout == ""  # without --json, stdout is for results alone
    assert len(_table_rows(db)) == 200

    second = _reembed(day2_manifest, "--db", db, "--model", tiny_model, "--dtype", "float32",
                      "--prune")
    assert second["image_tower_rows"] == 30  # 20 new + 10 replaced; the copies reuse vectors
    assert second["text_tower_rows"] == 35  # 20 new + 10 edited + the copies' 5 captions
    assert second["images_reused"] == 5 and second["rows_deleted"] == 10

    # The table equals a fresh full embed of day 2's manifest.
    fresh = tmp_path / "fresh"
    altclip("embed", day2_manifest, "--out", fresh, "--model", tiny_model, "--dtype", "float32")
    expected, got = read_output(fresh), _table_rows(db)
    assert set(got) == set(expected)
    for row_id, row in expected.items():
        for column in ("image_embedding", "text_embedding"):
            np.testing.assert_allclose(got[row_id][column], row[column], atol=1e-6, err_msg=row_id)
        for column in ("caption", "image_sha256", "caption_sha256", "width", "height", "model"):
            assert got[row_id][column] == row[column], (row_id, column)

    # Nothing changed: nothing embedded.
    third = _reembed(day2_manifest, "--db", db, "--model", tiny_model, "--dtype", "float32")
    assert third["image_tower_rows"] == third["text_tower_rows"] == third["rows_upserted"] == 0
    assert third["unchanged"] == 215

    # Versions: listed with what each run changed; day 1 restored gives day 1's rows.
    listing = altclip("table", "versions", db).stdout
    assert "reembed" in listing and "image_changed 10" in listing
    header, *lines = listing.splitlines()
    assert header.split() == ["version", "time", "rows", "made", "by"]
    assert len(lines) > 3 and all(len(line.split()) > 3 for line in lines)  # each says what made it
    assert "table created" in listing and "(no record)" not in listing
    day1_version = next(int(line.split()[0]) for line in listing.splitlines()
                        if "reembed" in line and "new 200" in line)
    altclip("table", "restore", db, str(day1_version))
    restored = _table_rows(db)
    assert set(restored) == set(day1_rows)
    for row_id in ("r015", "r025"):
        np.testing.assert_allclose(restored[row_id]["text_embedding"], day1_rows[row_id]["text_embedding"])
        np.testing.assert_allclose(restored[row_id]["image_embedding"], day1_rows[row_id]["image_embedding"])


def test_another_model_re_embeds_everything(days, tiny_model, ray_session, tmp_path):
    folder, day1, day1_manifest = days
    db = tmp_path / "db"
    small = _write(folder, day1[:20], "small.parquet")
    _reembed(small, "--db", db, "--model", tiny_model, "--dtype", "float32")
    other = tmp_path / "other-model"
    altclip("make-test-model", other, "--seed", "1")
    summary = _reembed(small, "--db", db, "--model", other, "--dtype", "float32")
    assert summary["model_stale"] is True
    assert summary["image_tower_rows"] == 20 and summary["text_tower_rows"] == 20
    assert {r["model"].split("@")[0] for r in _table_rows(db).values()} == {str(other)}
