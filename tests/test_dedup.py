"""`altclip dedup`: near-duplicate images and captions marked in the table, found from its vectors.

Two kinds of input. Pictures embedded with the tiny random-weight model (through `altclip embed`)
check what that model can tell apart: exact copies, JPEG re-encodes and half-size copies of a
picture land within 0.001 of it, while other pictures (and 70% crops) stay further off, so those
groups are found at a threshold between the two, measured in the test. At the default threshold (0.94)
the tiny model groups unrelated pictures too (its unrelated pictures reach 0.99), so grouping at
the default, crops-like pairs near the threshold, the keep policies and incremental runs are
checked on vectors written into a table directly, at planted cosines.
"""

from __future__ import annotations

import io
import json

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.config import DEFAULT_THRESHOLD
from pipeline.table.near_duplicates import KEPT, Clusters, group_rows
from tests.conftest import altclip
from tests.corpus import CAPTIONS

DIM = 64  # the tiny model's: `search --model` embeds nothing for --vector, but checks the size


def _picture(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A gradient with a few filled shapes: each seed a different picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    t = x / width * np.cos(angle) + y / height * np.sin(angle)
    t = ((t - t.min()) / np.ptp(t))[..., None]
    colours = rng.integers(0, 256, (2, 3))
    pixels = colours[0] * (1 - t) + colours[1] * t + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


PICTURES = 4  # planted: each as q95, an exact copy of that file, q60, half size, a 70% crop
UNRELATED = 6
CAPTION_GROUPS = {"a red circle on a white wall": 3, "una foto de un gato en la nieve": 2}
# Captions far enough apart for the tiny text tower (<= 0.99994 between them; copies >= 0.9999998).
OTHER_CAPTIONS = [c for c in CAPTIONS if c not in CAPTION_GROUPS] + [
    "zebra", "mountains at dawn over a quiet lake with two boats", "3 + 4 = 7", "東京の夜景",
    "une voiture rouge", "la bicicleta azul", "Berliner Dom im Regen", "ночной город",
    "παιδιά στην παραλία", "नीला आसमान", "a lighthouse"]


@pytest.fixture(scope="module")
def corpus(tiny_model, ray_session, tmp_path_factory):
    """Pictures with planted copies, embedded by `altclip embed` into a table."""
    folder = tmp_path_factory.mktemp("dedup")
    (folder / "images").mkdir()
    files = {}
    for p in range(PICTURES):
        image = _picture(p)
        w, h = image.size
        files[f"p{p}-a-q95"] = files[f"p{p}-b-copy"] = _jpeg(image)
        files[f"p{p}-c-q60"] = _jpeg(image, quality=60)
        files[f"p{p}-d-half"] = _jpeg(image.resize((w // 2, h // 2), Image.BICUBIC))
        files[f"p{p}-e-crop"] = _jpeg(image.crop((w * 3 // 20, h * 3 // 20, w * 17 // 20, h * 17 // 20)))
    for u in range(UNRELATED):
        files[f"u{u}"] = _jpeg(_picture(100 + u))
    captions = [c for c, n in CAPTION_GROUPS.items() for _ in range(n)] + OTHER_CAPTIONS
    rows = []
    for n, (row_id, data) in enumerate(sorted(files.items())):
        (folder / "images" / f"{row_id}.jpg").write_bytes(data)
        rows.append({"id": row_id, "image": f"images/{row_id}.jpg", "caption": captions[n]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    altclip("embed", folder / "manifest.parquet", "--out", folder / "out", "--model", tiny_model,
            "--db", folder / "db", "--dtype", "float32")
    return folder / "db", rows


def _rows(db) -> dict[str, dict]:
    table = lancedb.connect(str(db)).open_table("embeddings")
    rows = table.to_arrow().to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "an id appears twice"
    return {r["id"]: r for r in rows}


def _groups(rows: dict, prefix: str = "") -> set[frozenset]:
    """Kept row + the rows marked its duplicates, for every kept row (a group of one included)."""
    members = {i: {i} for i, r in rows.items() if r[f"{prefix}dup_checked"] and r[f"{prefix}dup_of"] is None}
    for i, r in rows.items():
        if r[f"{prefix}dup_of"] is not None:
            members[r[f"{prefix}dup_of"]].add(i)
    return {frozenset(m) for m in members.values()}


def _split(vectors: dict, same) -> tuple[float, float]:
    """(lowest cosine within planted groups, highest cosine between anything else)."""
    ids = sorted(vectors)
    inside, outside = [], []
    for n, a in enumerate(ids):
        for b in ids[n + 1:]:
            (inside if same(a, b) else outside).append(float(np.dot(vectors[a], vectors[b])))
    return min(inside), max(outside)


def _tiny_threshold(rows: dict) -> float:
    """A threshold between the tiny model's cosines of a picture's copies and of the rest."""
    vectors = {i: np.asarray(r["image_embedding"], np.float32) for i, r in rows.items()}

    def planted(a: str, b: str) -> bool:  # the same picture, crops aside
        return a[:2] == b[:2] and a[0] == "p" and "crop" not in a + b

    lowest_planted, highest_other = _split(vectors, planted)
    # What the tiny model can tell apart (measured): copies, q60 re-encodes and half sizes
    # 0.9994 and up to their picture; 70% crops 0.987 to 0.997, other pictures up to 0.990.
    assert lowest_planted > 0.999 > highest_other
    return (lowest_planted + highest_other) / 2


def test_tiny_model_copies_reencodes_and_resizes_are_grouped(corpus):
    db, _ = corpus
    rows = _rows(db)
    threshold = _tiny_threshold(rows)
    result = altclip("dedup", db, "--threshold", threshold)
    out = result.stderr
    assert "test model of RANDOM WEIGHTS" in result.stderr  # as the demo says, these groups mean nothing
    expected = {frozenset(f"p{p}-{v}" for v in ("a-q95", "b-copy", "c-q60", "d-half"))
                for p in range(PICTURES)}
    expected |= {frozenset([i]) for i in rows if "crop" in i or i[0] == "u"}
    found = _rows(db)
    assert _groups(found) == expected
    assert (f"checked {len(rows)} image vectors (full): {3 * PICTURES} near-duplicates marked in "
            f"{PICTURES} groups") in out
    assert all(found[f"p{p}-b-copy"]["dup_score"] == pytest.approx(1.0) for p in range(PICTURES))
    # --keep largest: the full-size JPEGs outweigh the half size; between equal sizes, the smaller id.
    altclip("dedup", db, "--threshold", threshold, "--keep", "largest", "--full")
    half_sizes_kept_as = {r["dup_of"] for i, r in _rows(db).items() if i.endswith("d-half")}
    assert half_sizes_kept_as == {f"p{p}-a-q95" for p in range(PICTURES)}


def test_caption_duplicates_against_text(corpus):
    db, rows = corpus
    before = {i: (r["dup_of"], r["dup_checked"]) for i, r in _rows(db).items()}
    vectors = {i: np.asarray(r["text_embedding"], np.float32) for i, r in _rows(db).items()}
    caption = {r["id"]: r["caption"] for r in rows}
    lowest_planted, highest_other = _split(vectors, lambda a, b: caption[a] == caption[b])
    # The tiny text tower puts every caption within 0.9999 of every other (measured): only
    # identical captions are told apart, at cosine 1.
    assert lowest_planted > highest_other
    out = altclip("dedup", db, "--against", "text", "--keep", "longest",
                  "--threshold", (lowest_planted + highest_other) / 2).stderr
    assert "checked 26 text vectors (full): 3 near-duplicates marked in 2 groups" in out
    after = _rows(db)
    by_caption = {}
    for i in caption:
        by_caption.setdefault(caption[i], set()).add(i)
    assert _groups(after, "caption_") == {frozenset(ids) for ids in by_caption.values()}
    assert {i: (r["dup_of"], r["dup_checked"]) for i, r in after.items()} == before  # image side untouched


def test_reembed_clears_the_marks_of_changed_rows(corpus, tiny_model):
    db, _ = corpus
    threshold = _tiny_threshold(_rows(db))
    altclip("dedup", db, "--threshold", threshold, "--full")
    before = _rows(db)
    assert before["p1-c-q60"]["dup_of"] == "p1-a-q95"
    # The q60 copy's file is replaced in place by another picture; reembed upserts its row.
    (db.parent / "images" / "p1-c-q60.jpg").write_bytes(_jpeg(_picture(200), quality=60))
    altclip("reembed", db.parent / "manifest.parquet", "--db", db, "--model", tiny_model,
            "--dtype", "float32")
    upserted = _rows(db)["p1-c-q60"]
    assert (upserted["dup_of"], upserted["dup_score"], upserted["dup_checked"]) == (None, None, None)
    result = altclip("dedup", db, "--threshold", threshold)
    out = result.stderr
    assert "test model of RANDOM WEIGHTS" in result.stderr  # as the demo says, these groups mean nothing
    assert "checked 1 image vectors (incremental): 0 near-duplicates marked in 0 groups" in out
    after = _rows(db)
    assert after["p1-c-q60"]["dup_checked"] and after["p1-c-q60"]["dup_of"] is None
    assert {i: r["dup_of"] for i, r in after.items()} == {
        i: (None if i == "p1-c-q60" else r["dup_of"]) for i, r in before.items()}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _around(centre: np.ndarray, cosines: list[float], rng) -> list[np.ndarray]:
    """Vectors at exactly these cosines to `centre`, along directions orthogonal to it and to
    each other (so that two of them are at cosine c1 * c2, further apart than either is from it)."""
    basis = np.linalg.qr(np.column_stack([centre, rng.standard_normal((DIM, len(cosines)))]))[0]
    return [_unit(c * centre + np.sqrt(1 - c * c) * basis[:, k + 1]) for k, c in enumerate(cosines)]


def _vector_table(db, rows: list[dict]):
    table = pa.table({
        "id": [r["id"] for r in rows], "caption": [r.get("caption", r["id"]) for r in rows],
        "width": [r.get("width", 100) for r in rows], "height": [r.get("height", 100) for r in rows],
        "image_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r["v"] for r in rows])), DIM),
        "text_embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([r.get("t", r["v"]) for r in rows])), DIM)})
    return lancedb.connect(str(db)).create_table("embeddings", data=table)


def _planted(rng) -> tuple[list[dict], set[frozenset]]:
    """Groups around the default threshold: members at 0.999 down to just above it, a decoy
    just below it (a group of its own), exact copies; and unrelated vectors."""
    rows, groups = [], set()
    t = DEFAULT_THRESHOLD
    for g in range(5):
        centre = _unit(rng.standard_normal(DIM))
        near = _around(centre, [0.999, 0.97, t + 0.002, t - 0.004], rng)
        group = [{"id": f"g{g}-0", "v": centre}, {"id": f"g{g}-1-copy", "v": centre.copy()},
                 {"id": f"g{g}-2", "v": near[0]}, {"id": f"g{g}-3", "v": near[1]},
                 {"id": f"g{g}-4", "v": near[2]}]
        rows += group + [{"id": f"g{g}-5-decoy", "v": near[3]}]
        groups |= {frozenset(r["id"] for r in group), frozenset([f"g{g}-5-decoy"])}
    for u in range(20):
        rows.append({"id": f"u{u:02d}", "v": _unit(rng.standard_normal(DIM))})
        groups.add(frozenset([f"u{u:02d}"]))
    return rows, groups


def test_groups_at_the_default_threshold_and_one_row_per_group(tmp_path, tiny_model):
    rows, planted = _planted(np.random.default_rng(0))
    _vector_table(tmp_path / "db", rows)
    out = altclip("dedup", tmp_path / "db").stderr
    found = _rows(tmp_path / "db")
    assert _groups(found) == planted
    assert "20 near-duplicates marked in 5 groups" in out
    vectors = {r["id"]: r["v"] for r in rows}
    for i, r in found.items():
        if r["dup_of"] is not None:
            assert r["dup_score"] >= DEFAULT_THRESHOLD
            assert r["dup_score"] == pytest.approx(float(vectors[i] @ vectors[r["dup_of"]]), abs=1e-5)
            assert found[r["dup_of"]]["dup_of"] is None  # groups never chain
    assert all(r["dup_checked"] for r in found.values())

    np.save(tmp_path / "q.npy", rows[0]["v"])
    hits = [json.loads(line) for line in altclip(
        "search", tmp_path / "db", "--vector", tmp_path / "q.npy", "--model", tiny_model,
        "--where", "dup_of IS NULL", "--k", 100, "--json").stdout.splitlines()]
    assert sorted(h["id"] for h in hits) == sorted(min(g) for g in planted)

    versions = altclip("table", "versions", tmp_path / "db").stdout
    assert "dedup: against image, duplicates 20, groups 5, keep first, mode full" in versions


def test_keep_policies(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for g in range(3):  # tight groups: every member within 0.99 of every other
        members = _around(_unit(rng.standard_normal(DIM)), [0.999, 0.998, 0.997, 0.996], rng)
        for m, v in enumerate(members):
            rows.append({"id": f"g{g}-{m}", "v": v, "t": v, "width": [10, 40, 20, 40][m],
                         "height": 10, "caption": ["ab", "abcd", "abcd", "a"][m]})
    _vector_table(tmp_path / "db", rows)

    def kept(prefix: str = "") -> set[str]:
        return {r[f"{prefix}dup_of"] for r in _rows(tmp_path / "db").values()} - {None}

    altclip("dedup", tmp_path / "db", "--keep", "first")
    assert kept() == {"g0-0", "g1-0", "g2-0"}
    altclip("dedup", tmp_path / "db", "--keep", "largest", "--full")
    assert kept() == {"g0-1", "g1-1", "g2-1"}  # 40 x 10; g*-3 ties it and has the larger id
    altclip("dedup", tmp_path / "db", "--keep", "longest", "--against", "text")
    assert kept("caption_") == {"g0-1", "g1-1", "g2-1"}
    result = altclip("dedup", tmp_path / "db", "--keep", "nearest", expect_exit=2)
    assert "--keep" in result.stderr


def test_incremental_after_load(tmp_path):
    rng = np.random.default_rng(2)
    a0, b0, lone = (_unit(rng.standard_normal(DIM)) for _ in range(3))
    a1, a2, a_new = _around(a0, [0.99, 0.97, 0.96], rng)
    b1 = _around(b0, [0.98], rng)[0]
    rows = [{"id": "a0", "v": a0}, {"id": "a1", "v": a1}, {"id": "a2", "v": a2},
            {"id": "b0", "v": b0}, {"id": "b1", "v": b1}, {"id": "lone", "v": lone}]
    _vector_table(tmp_path / "db", rows)
    altclip("dedup", tmp_path / "db")
    before = _rows(tmp_path / "db")
    assert before["a2"]["dup_of"] == "a0" and before["b1"]["dup_of"] == "b0"
    # New rows: "a" copies a0 and sorts before it; n1, n2 copy each other; b0 (kept) changes.
    n1 = _unit(rng.standard_normal(DIM))
    changed = [{"id": "a", "v": a_new}, {"id": "n1", "v": n1}, {"id": "n2", "v": _around(n1, [0.98], rng)[0]},
               {"id": "b0", "v": _unit(rng.standard_normal(DIM))}]
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"id": r["id"], "caption": r["id"], "width": 100, "height": 100,
         "image_embedding": r["v"].tolist(), "text_embedding": r["v"].tolist()} for r in changed],
        schema=_rows_schema()), out / "part-00000.parquet")
    altclip("load", out, "--db", tmp_path / "db")
    loaded = _rows(tmp_path / "db")
    assert loaded["b0"]["image_embedding"] != before["b0"]["image_embedding"]
    assert loaded["b0"]["dup_checked"] is None  # the upsert cleared its marks
    assert loaded["b1"]["dup_of"] == "b0"  # still pointing at the row that changed, until dedup
    version = lancedb.connect(str(tmp_path / "db")).open_table("embeddings").version

    result = altclip("dedup", tmp_path / "db").stderr
    # a, n1, n2, b0 (unchecked) and b1 (its kept row changed): nothing else is read again.
    assert "checked 5 image vectors (incremental): 2 near-duplicates marked in 2 groups" in result
    after = _rows(tmp_path / "db")
    assert after["a"]["dup_of"] == "a0"  # a row kept before is never demoted by a newcomer
    assert after["n2"]["dup_of"] == "n1" and after["n1"]["dup_of"] is None
    assert after["b1"]["dup_of"] is None and after["b0"]["dup_of"] is None  # b0 is no longer like b1
    for i in ("a0", "a1", "a2", "lone"):
        assert after[i] == before[i]
    assert lancedb.connect(str(tmp_path / "db")).open_table("embeddings").version == version + 1
    # The lines for a person on stderr; with --json the result alone on stdout, for a program.
    again = altclip("dedup", tmp_path / "db", "--json")
    assert "nothing to check" in again.stderr
    assert json.loads(again.stdout) == {**json.loads(again.stdout), "changed": False, "rows_checked": 0}

    altclip("dedup", tmp_path / "db", "--full")  # the keep policy across everything again
    assert _rows(tmp_path / "db")["a0"]["dup_of"] == "a"


def _rows_schema() -> pa.Schema:
    vector = pa.list_(pa.float32(), DIM)
    return pa.schema([("id", pa.string()), ("caption", pa.string()), ("width", pa.int64()),
                      ("height", pa.int64()), ("image_embedding", vector), ("text_embedding", vector)])


def _reference(vectors: np.ndarray, ranks: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy SemDeDup over one cluster, row by row."""
    target, kept = np.full(len(vectors), KEPT), []
    cutoff = np.float32(threshold)
    for row in np.argsort(ranks):
        cosines = vectors[kept] @ vectors[row] if kept else np.zeros(0)
        if len(cosines) and cosines.max() >= cutoff:
            target[row] = kept[int(cosines.argmax())]
        else:
            kept.append(row)
    return target


@pytest.mark.parametrize("seed", range(6))
def test_grouping_properties(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((40, DIM)))
    picks = rng.integers(0, 40, 600)
    vectors = _unit(centres[picks] + rng.uniform(0.05, 0.4, (600, 1)) * rng.standard_normal((600, DIM)) / 8)
    vectors[rng.integers(0, 600, 30)] = vectors[rng.integers(0, 600, 30)]  # exact copies
    ranks = rng.permutation(600)
    threshold = float(rng.uniform(0.9, 0.99))

    def run(clusters, batch: int, block_rows: int = 1024):
        return group_rows((vectors[s:s + batch] for s in range(0, 600, batch)), ranks, threshold,
                          clusters, block_rows=block_rows)

    one_cluster = run(Clusters.train(vectors, 600, cluster_rows=10_000), 600)
    assert np.array_equal(one_cluster.target, _reference(vectors, ranks, threshold))
    clusters = Clusters.train(vectors[::3], 600, cluster_rows=50, spill_rows=100)
    assert clusters.centroids is not None and clusters.spill_group.max() > 0
    # Many rows compared in two clusters, so that settling across clusters is exercised.
    monkeypatch.setattr("pipeline.table.near_duplicates.GUEST_MARGIN", 0.4)
    assert (clusters.assign(vectors)[1] >= 0).mean() > 0.2
    clustered = run(clusters, 64, block_rows=16)
    assert len(np.unique(clustered.target[clustered.target >= 0])) > 1
    for other in (run(clusters, 600), run(Clusters.train(vectors[::3], 600, 50, 30), 7, 5)):
        assert np.array_equal(other.target, clustered.target)  # batch, block, spill sizes change nothing
        assert np.allclose(other.score, clustered.score, equal_nan=True)
    for grouping in (one_cluster, clustered):
        dups = np.flatnonzero(grouping.target >= 0)
        assert np.all(grouping.target[grouping.target[dups]] == KEPT)  # dup_of is always a kept row
        assert np.all(grouping.score[dups] >= threshold)
        assert np.all(ranks[grouping.target[dups]] < ranks[dups])
        assert np.allclose(grouping.score[dups], np.einsum("ij,ij->i", vectors[dups],
                                                            vectors[grouping.target[dups]]), atol=1e-5)
        assert np.isnan(grouping.score[grouping.target == KEPT]).all()
