"""`altclip export OUT --format embedding-reader DEST`, read back with the real embedding-reader."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from embedding_reader import EmbeddingReader

from pipeline.config import ConfigError
from pipeline.write.export import export_embedding_reader
from pipeline.write.shards import conform, write_shard
from schemas.embeddings import embeddings_schema
from tests.conftest import altclip, read_output
from tests.corpus import odd_images, write_corpus

META = ["id", "image_path", "caption", "url", "width", "lang"]


def export(*args, expect_exit: int = 0):
    """`altclip export ...` as a user types it."""
    return altclip("export", *args, expect_exit=expect_exit)


def read_back(dest, side: str, meta=META) -> tuple[np.ndarray, list[dict]]:
    """Every vector of one side, and the metadata row beside each, as embedding-reader reads them."""
    folder = {"image": "img_emb", "text": "text_emb"}[side]
    plain = EmbeddingReader(f"{dest}/{folder}", file_format="npy")
    vectors = np.concatenate([v for v, _ in plain(batch_size=10_000, show_progress=False)])
    aligned = EmbeddingReader(f"{dest}/{folder}", file_format="parquet_npy",
                              metadata_folder=f"{dest}/metadata", meta_columns=meta)
    rows = []
    for batch, metadata in aligned(batch_size=4, show_progress=False):  # batches span files
        np.testing.assert_array_equal(batch, vectors[metadata["i"].to_numpy()])
        rows.extend(metadata.to_dict("records"))
    assert len(rows) == len(vectors) == plain.count
    return vectors, rows


def as_float16(vector) -> np.ndarray:
    """A vector of ours as the export stores it, read back as float32 (what the reader returns)."""
    return np.asarray(vector, np.float32).astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def run(tiny_model, ray_session, tmp_path_factory):
    """A small corpus through `altclip embed`: images with captions, one image that is not one,
    one row without a caption."""
    folder = tmp_path_factory.mktemp("export")
    images = {name: data for name, data in odd_images().items()
              if name in ("landscape.jpg", "portrait.png", "grey.jpg", "rgba.png", "tiny.png")}
    images["broken.jpg"] = b"this is not an image"
    manifest = write_corpus(folder, images, extra_rows=[
        {"id": "no-caption", "image": "images/landscape.jpg", "caption": None, "lang": "fr", "rank": 99}])
    altclip("embed", manifest, "--out", folder / "out", "--model", tiny_model, "--dtype", "float32",
            "--batch-size", "3", "--rows-per-shard", "3", "--quiet")
    return folder, read_output(folder / "out")


def test_embedding_reader_reads_every_vector_back_aligned_with_its_metadata(run):
    folder, ours = run
    dest = folder / "exported"
    result = export(folder / "out", "--format", "embedding-reader", dest)  # the form users are shown
    broken = next(i for i, r in ours.items() if r["image_error"])
    assert ours[broken]["image_error"].startswith("decode_error")
    complete = {i for i, r in ours.items() if r["image_embedding"] and r["text_embedding"]}
    assert len(complete) == len(ours) - 2
    assert f"exported {len(complete)} of {len(ours)} rows" in result.output
    assert (f"left out 2 rows lacking a vector: image.decode_error 1 (e.g. {broken}); "
            "text.empty_caption 1 (e.g. no-caption)") in result.output

    for side in ("image", "text"):
        vectors, rows = read_back(dest, side)
        ids = [r["id"] for r in rows]
        assert sorted(ids) == sorted(complete)  # every complete row once, no other
        for vector, row in zip(vectors, rows):
            expected = ours[row["id"]]
            np.testing.assert_array_equal(vector, as_float16(expected[f"{side}_embedding"]))
            assert (row["image_path"], row["caption"], row["width"], row["lang"]) == (
                expected["image"], expected["caption"], expected["width"], expected["lang"])
            assert row["url"] is None  # local paths: nothing a browser could open
    # Several shards, several numbered triples, in the order the reader pairs them.
    names = sorted(p.name for p in (dest / "metadata").iterdir())
    assert len(names) > 1 and names == [f"metadata_{n}.parquet" for n in range(len(names))]
    assert sorted(p.name for p in (dest / "img_emb").iterdir()) == [
        f"img_emb_{n}.npy" for n in range(len(names))]

    # One side alone keeps every row that has it; the other side's folder is gone.
    result = export(folder / "out", dest, "--format", "embedding-reader", expect_exit=1)
    assert (f"DEST {dest} is not empty (it holds img_emb, metadata, text_emb): choose another DEST, "
            "or pass --overwrite to replace its img_emb/, text_emb/ and metadata/") in result.output
    export(folder / "out", dest, "--format", "embedding-reader", "--side", "image", "--overwrite")
    assert not (dest / "text_emb").exists()
    vectors, rows = read_back(dest, "image")
    assert sorted(r["id"] for r in rows) == sorted(i for i, r in ours.items() if r["image_embedding"])
    assert "no-caption" in [r["id"] for r in rows]

    result = export(folder / "out", dest, "--format", "embeding-reader", expect_exit=2)
    assert "'embeding-reader' is not 'embedding-reader'" in result.output


def test_embedding_reader_parquet_mode_reads_our_shards_only_without_failed_rows(run, tmp_path):
    """embedding-reader's parquet mode on the shards as they are: fine where every row has the
    vector, broken by a null vector (a failed row) anywhere."""
    folder, _ = run
    for vector_dtype in ("float32", "float16"):
        whole = tmp_path / f"whole-{vector_dtype}"
        _write_output(whole, [[_row("a", 1), _row("b", 2)], [_row("c", 3)]], vector_dtype)
        reader = EmbeddingReader(str(whole), file_format="parquet",
                                 embedding_column="image_embedding", meta_columns=["id"])
        (vectors, metadata), = list(reader(batch_size=10, show_progress=False))
        assert metadata["id"].tolist() == ["a", "b", "c"] and reader.dimension == DIM
        stored = as_float16 if vector_dtype == "float16" else np.asarray
        np.testing.assert_array_equal(vectors, np.stack([stored(_vector(s)) for s in (1, 2, 3)]))

    # The embed run's shards hold a row whose image failed: its null vector breaks the reader,
    # at opening when it is a file's first row, else when its piece is read.
    with pytest.raises((AttributeError, ValueError)):
        reader = EmbeddingReader(str(folder / "out"), file_format="parquet",
                                 embedding_column="image_embedding", meta_columns=["id"])
        list(reader(batch_size=10, show_progress=False))
    first = tmp_path / "first"
    _write_output(first, [[_row("a", 1, image=False), _row("b", 2)]], "float32")
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'shape'"):
        EmbeddingReader(str(first), file_format="parquet", embedding_column="image_embedding")
    later = tmp_path / "later"
    _write_output(later, [[_row("a", 1), _row("b", 2, image=False)]], "float32")
    reader = EmbeddingReader(str(later), file_format="parquet", embedding_column="image_embedding")
    with pytest.raises(ValueError, match="failed reading file"):
        list(reader(batch_size=10, show_progress=False))


# Generated outputs (through the writer, no model): shard sizes, failures, dtypes, copies.
DIM = 6


def _vector(seed: int, side: str = "image") -> list[float]:
    vector = np.random.default_rng([seed, side == "text"]).normal(size=DIM).astype(np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


def _row(row_id: str, seed: int, image: bool = True, text: bool = True) -> dict:
    return {"id": row_id, "image": f"https://example.com/{row_id}.jpg", "caption": f"caption {row_id}",
            "lang": "en", "width": seed, "height": 2 * seed,
            "image_embedding": _vector(seed) if image else None,
            "text_embedding": _vector(seed, "text") if text else None,
            "image_error": None if image else "decode_error: not an image",
            "text_error": None if text else "empty_caption: empty"}


def _write_output(out, shards: list[list[dict]], vector_dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    schema = embeddings_schema(DIM, [pa.field("lang", pa.string())],
                               {"model": "generated", "vector_dtype": vector_dtype})
    for n, rows in enumerate(shards):
        table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
        # Stamps in shard order: the later shard is the newer run, as the writer names them.
        write_shard(str(out), conform(table, schema, "generated"), stamp=f"{n:020d}")


def _generated(rng: random.Random) -> tuple[list[list[dict]], bool]:
    """Shards of random sizes (some empty, some all failed), some ids published again later."""
    texts = rng.random() < 0.8  # else: no text vectors at all (an image-only run)
    shards, seed = [], 0
    for _ in range(rng.randint(1, 7)):
        kind = rng.choice(["empty", "failed", "mixed", "mixed", "mixed"])
        size = 0 if kind == "empty" else rng.randint(1, 12)
        rows = []
        for _ in range(size):
            seed += 1
            image = kind != "failed" and rng.random() < 0.8
            text = texts and kind != "failed" and rng.random() < 0.8
            rows.append(_row(f"id-{seed}", seed, image, text))
        shards.append(rows)
    published = [r for rows in shards for r in rows]
    if published and rng.random() < 0.5:  # re-embedded ids: a newer copy in a later shard
        again = rng.sample(published, min(3, len(published)))
        shards.append([{**_row(r["id"], 1000 + i), "caption": "newer"} for i, r in enumerate(again)])
    return shards, texts


@pytest.mark.parametrize("seed", range(24))
def test_generated_outputs_export_every_complete_row_once_in_order(tmp_path, seed):
    rng = random.Random(seed)
    shards, texts = _generated(rng)
    vector_dtype = rng.choice(["float32", "float16"])
    sides = rng.choice([None, ("image",), ("text",), ("image", "text")] if texts
                       else [None, ("image",)])
    out = tmp_path / "out"
    _write_output(out, shards, vector_dtype)
    rows_in = sum(len(rows) for rows in shards)
    newest = {}  # id -> (shard, row) of its newest copy
    for n, rows in enumerate(shards):
        for row in rows:
            newest[row["id"]] = (n, row)
    # Sides with vectors in any published row (the footers' counts), older copies included.
    held = [s for s in ("image", "text") if any(r[f"{s}_embedding"] for rows in shards for r in rows)]
    if not held:
        with pytest.raises(ConfigError, match="holds no vectors to export"):
            export_embedding_reader(str(out), str(tmp_path / "dest"), sides)
        return
    exported_sides = sides or tuple(held)
    expected = [row for n, rows in enumerate(shards) for row in rows
                if newest[row["id"]] == (n, row) and all(row[f"{s}_embedding"] for s in exported_sides)]

    result = export_embedding_reader(str(out), str(tmp_path / "dest"), sides)
    assert result["sides"] == list(exported_sides)
    assert result["rows_in"] == rows_in == (result["rows_exported"] + result["rows_skipped"]
                                            + result["older_copies"])
    assert result["older_copies"] == rows_in - len(newest)
    assert result["rows_exported"] == len(expected)
    lacking = sum(not all(r[f"{s}_embedding"] for s in exported_sides) for _, r in newest.values())
    assert result["rows_skipped"] == lacking

    dest = tmp_path / "dest"
    folders = {"image": "img_emb", "text": "text_emb"}
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [folders[s] for s in exported_sides] + ["metadata"])
    metadata = [pq.read_table(p) for p in sorted((dest / "metadata").iterdir())]
    assert len(metadata) == result["files"] and all(t.num_rows for t in metadata)
    ids = [i for t in metadata for i in t.column("id").to_pylist()]
    assert ids == [r["id"] for r in expected] and len(set(ids)) == len(ids)
    captions = [c for t in metadata for c in t.column("caption").to_pylist()]
    assert captions == [r["caption"] for r in expected]
    for side in exported_sides:
        files = sorted((dest / folders[side]).iterdir())
        matrices = [np.load(p) for p in files]
        assert [m.shape[0] for m in matrices] == [t.num_rows for t in metadata]  # row-aligned
        assert all(m.dtype == np.float16 and m.shape[1] == DIM for m in matrices)
        if matrices:
            np.testing.assert_array_equal(
                np.concatenate(matrices).astype(np.float32),
                np.stack([as_float16(r[f"{side}_embedding"]) for r in expected]))


def test_what_cannot_be_exported_is_refused_before_writing(tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(ConfigError, match="holds no embeddings \\(no part-\\*.parquet\\): embed "
                                          "into it first"):
        export_embedding_reader(str(tmp_path / "nothing"), str(dest))
    failed = tmp_path / "failed"
    _write_output(failed, [[_row("a", 1, image=False, text=False)]], "float32")
    with pytest.raises(ConfigError, match="holds no vectors to export: none of its 1 rows has one "
                                          "\\(errors: image.decode_error 1, text.empty_caption 1\\)"):
        export_embedding_reader(str(failed), str(dest))
    images_only = tmp_path / "images-only"
    _write_output(images_only, [[_row("a", 1, text=False)]], "float32")
    with pytest.raises(ConfigError, match="holds no text vectors .*: export image only"):
        export_embedding_reader(str(images_only), str(dest), ("text",))
    (images_only / "part-notes.parquet").write_text("not a shard")
    result = altclip("export", images_only, "--format", "embedding-reader", dest, expect_exit=1)
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: {images_only}/part-notes.parquet is named as an output shard but is not one")
    assert "Traceback" not in result.stderr
    assert not dest.exists()


def test_metadata_columns_are_those_clip_retrievals_back_end_reads(tmp_path):
    """`image_path` is our image reference, `url` the manifest's own (img2dataset's) where it has
    one; a manifest column already named `image_path` keeps its values under another name."""
    out = tmp_path / "out"
    out.mkdir()
    extra = [pa.field("url", pa.string()), pa.field("image_path", pa.string())]
    schema = embeddings_schema(DIM, extra, {"model": "generated", "vector_dtype": "float32"})
    row = {**_row("a", 1), "image": "tar://a.jpg::s3://corpus/00000.tar",
           "url": "https://example.com/original.jpg", "image_path": "photos/a.jpg"}
    write_shard(str(out), conform(pa.Table.from_pylist([row], schema=schema), schema, "generated"))
    export_embedding_reader(str(out), str(tmp_path / "dest"))
    metadata = pq.read_table(tmp_path / "dest" / "metadata" / "metadata_0.parquet")
    assert metadata.column_names == ["image_path", "caption", "url", "id", "width", "height",
                                     "manifest_image_path"]
    assert metadata.to_pylist()[0] == {
        "image_path": "tar://a.jpg::s3://corpus/00000.tar", "caption": "caption a",
        "url": "https://example.com/original.jpg", "id": "a", "width": 1, "height": 2,
        "manifest_image_path": "photos/a.jpg"}
    assert b"altclip.provenance" in metadata.schema.metadata  # the vectors' origin travels along


def test_from_and_to_object_storage(s3_server, tmp_path):
    fs = s3fs.S3FileSystem()
    if not fs.exists("exports"):
        fs.mkdir("exports")
    local = tmp_path / "out"
    shards = [[_row("a", 1), _row("b", 2, text=False)], [_row("c", 3)]]
    _write_output(local, shards, "float16")
    for shard in local.glob("part-*.parquet"):
        fs.put_file(str(shard), f"exports/run/out/{shard.name}")
    result = export("s3://exports/run/out", "s3://exports/run/dest", "--format", "embedding-reader")
    assert "exported 2 of 3 rows to s3://exports/run/dest" in result.output
    vectors, rows = read_back("s3://exports/run/dest", "text", meta=["id", "url"])
    assert [r["id"] for r in rows] == ["a", "c"] and rows[0]["url"] == "https://example.com/a.jpg"
    np.testing.assert_array_equal(vectors, np.stack([as_float16(_vector(s, "text")) for s in (1, 3)]))
    export("s3://exports/run/out", "s3://exports/run/dest", "--format", "embedding-reader",
           expect_exit=1)
