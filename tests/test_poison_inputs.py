"""No input can stop a job: every damaged, malformed or hostile input ends as exactly one output
row with its error, and the job exits 0. Thousands of fuzzed files go through the stage
functions directly; a few hundred hostile rows through whole jobs."""

from __future__ import annotations

import collections
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.decode import isolation
from pipeline.decode.images import PIXELS, ImagePreprocessing, preprocess_images
from pipeline.decode.resample import resized_window
from schemas.embeddings import ERROR_KINDS, IMAGE_ERROR
from schemas.manifest import IMAGE, INLINE_IMAGE
from tests.conftest import altclip, read_output
from tests.corpus import CAPTIONS, _pattern, crash_image
from tests.fuzz import BAD_URLS, NOT_IMAGES, long_thin_png, mutants, seed_images
from tests.fuzz import CAPTIONS as ODD_CAPTIONS


@pytest.fixture(scope="module")
def prep(tiny_model) -> ImagePreprocessing:
    from transformers import AutoImageProcessor

    return ImagePreprocessing.from_image_processor(AutoImageProcessor.from_pretrained(tiny_model))


def _decode_all(cases: dict[str, bytes], prep: ImagePreprocessing) -> dict[str, str | None]:
    """name -> error kind (None: pixels), through the decode stage as the job runs it."""
    names = list(cases)
    kinds = {}
    for start in range(0, len(names), 64):
        part = names[start:start + 64]
        batch = pa.table({IMAGE: pa.nulls(len(part), pa.string()),
                          INLINE_IMAGE: pa.array([cases[n] for n in part], pa.binary())})
        out = preprocess_images(batch, prep)
        assert out.num_rows == len(part)
        for name, pixels, failure in zip(part, out.column(PIXELS).to_pylist(),
                                         out.column(IMAGE_ERROR).to_pylist()):
            assert (pixels is None) != (failure is None), name
            kinds[name] = None if failure is None else failure.split(":", 1)[0]
    return kinds


def test_every_fuzzed_file_is_one_row_with_pixels_or_its_error(prep):
    seeds = seed_images()
    cases = {**mutants(seeds), **NOT_IMAGES, **seeds}
    kinds = _decode_all(cases, prep)
    assert len(kinds) == len(cases) > 3000
    assert all(kinds[name] is None for name in seeds), {n: kinds[n] for n in seeds if kinds[n]}
    assert set(kinds.values()) - {None} <= set(ERROR_KINDS)
    assert all(kinds[name] == "decode_error" for name in NOT_IMAGES)
    counts = collections.Counter(k or "ok" for k in kinds.values())
    print(f"\n{len(seeds)} formats, {len(cases)} inputs: {dict(counts)}")
    # Cut headers are caught as such, not only as "something went wrong".
    assert counts["truncated"] > 100 and counts["decode_error"] > 100


def test_a_resize_that_would_be_enormous_is_computed_for_the_crop_alone(prep):
    thin = {"1x8000": long_thin_png(1, 8000), "8000x1": long_thin_png(8000, 1),
            "3x40000": long_thin_png(3, 40000)}
    assert _decode_all(thin, prep) == {name: None for name in thin}


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
                                      Image.Resampling.BOX])
def test_the_crop_window_of_a_resize_equals_pillows_resize_bit_for_bit(resample):
    rng = np.random.default_rng(int(resample))
    sizes = [(1, 9), (3, 700), (20, 2000), (2000, 20), (7, 5), (1000, 61), (45, 700), (2, 3000),
             (300, 517), (640, 480), (1, 225), (225, 1), (223, 500), (224, 224), (2240, 224), (526, 2439)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(25)]
    for width, height in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        short, long = sorted((width, height))
        new_long = int(224 * long / short)
        size = (224, new_long) if width <= height else (new_long, 224)
        left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
        if left < 0 or top < 0:
            continue
        full = np.asarray(image.resize(size, resample=resample))[top:top + 224, left:left + 224]
        window = resized_window(image, size, (left, top, left + 224, top + 224), resample)
        np.testing.assert_array_equal(window, full, err_msg=f"{width}x{height}")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern(40 + seed % 30, 30 + seed % 20, seed)).save(buf, "PNG")
    return buf.getvalue()


def test_a_row_that_crashes_the_decoder_fails_alone(tiny_model, ray_session, tmp_path):
    isolation.stop()  # a new decoding process for this test's own decodes, with the hook set
    rows = [{"id": f"r{i:03d}", "image_bytes": crash_image() if i == 117 else _png(i),
             "caption": CAPTIONS[i % len(CAPTIONS)]} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")

    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model,
            "--batch-size", "16")

    got = read_output(tmp_path / "out")
    assert len(got) == 200
    assert sum(r["image_embedding"] is not None for r in got.values()) == 199
    assert sum(r["text_embedding"] is not None for r in got.values()) == 200
    crashed = got["r117"]["image_error"]
    assert crashed.startswith("worker_crash: the decoding process was killed by SIGSEGV"), crashed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors_by_kind"] == {"image.worker_crash": 1}


def test_hostile_rows_through_the_job(tiny_model, ray_session, tmp_path):
    """Fuzzed files under awkward names, things that are not files, malformed URLs and foreign
    schemes, odd captions: one row each, and the job exits 0."""
    images = tmp_path / "images"
    images.mkdir()
    seeds = seed_images()
    fuzzed = {**seeds, **dict(list(mutants(seeds, flips=2).items())[::25]), **NOT_IMAGES}
    awkward = ["with space", "ünïcødé 猫", "per%20cent", "hash#tag", "question?mark", "[brackets]", "-dash"]
    rows, expected = [], {}
    for n, (name, data) in enumerate(sorted(fuzzed.items())):
        filename = f"{awkward[n % len(awkward)]} {n}.{name.split('.')[1] if '.' in name else 'bin'}"
        (images / filename).write_bytes(data)
        rows.append({"id": f"file-{n}", "image": f"images/{filename}"})
        expected[f"file-{n}"] = None if name in seeds else "any"
    os.mkfifo(images / "pipe.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    (images / "folder.jpg").mkdir()
    (images / "thin.png").write_bytes(long_thin_png(1, 8000))
    for row_id, ref, kind in [("fifo", "images/pipe.jpg", "read_error"),
                              ("dev-zero", "/dev/zero", "read_error"),
                              ("loop", "images/loop.jpg", "read_error"),
                              ("folder", "images/folder.jpg", "read_error"),
                              ("missing", "images/nope.jpg", "not_found"),
                              ("thin", "images/thin.png", None)]:
        rows.append({"id": row_id, "image": ref})
        expected[row_id] = kind
    for n, url in enumerate(BAD_URLS):
        rows.append({"id": f"url-{n}", "image": url})
        expected[f"url-{n}"] = "any"
    for n, row in enumerate(rows):
        row["caption"] = ODD_CAPTIONS[n % len(ODD_CAPTIONS)]
    manifest = tmp_path / "hostile.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)

    altclip("embed", manifest, "--out", tmp_path / "out", "--model", tiny_model, "--batch-size", "32")

    got = read_output(tmp_path / "out")
    assert set(got) == {r["id"] for r in rows}
    for row_id, kind in expected.items():
        failure = got[row_id]["image_error"]
        found = None if failure is None else failure.split(":", 1)[0]
        assert found in ERROR_KINDS or found is None, failure
        if kind != "any":
            assert found == kind, (row_id, failure)
        assert (got[row_id]["image_embedding"] is None) == (failure is not None), row_id
    assert all(got[f"url-{n}"]["image_error"] for n in range(len(BAD_URLS)))
    # Captions of numbers, NULs, bidi marks, escapes, 1 MB of text: each has a vector, but for
    # the caption of whitespace alone.
    text_errors = {r["caption"]: r["text_error"] for r in got.values() if r["text_embedding"] is None}
    assert set(text_errors) == {"\t\n\r"}, text_errors
    assert all(e.startswith("empty_caption") for e in text_errors.values())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(rows)
    print(f"\n{len(rows)} hostile rows: {summary['errors_by_kind']}")


def test_manifest_values_of_every_shape(tiny_model, ray_session, tmp_path):
    png = _png(3)
    (tmp_path / "a.png").write_bytes(png)

    # Parquet: a caption column of lists, one of numbers; metadata named like internal columns.
    table = pa.table({
        "id": ["l1", "l2"], "image": ["a.png", "a.png"],
        "caption": pa.array([["a", "list"], None], pa.list_(pa.string())),
        "pixels": [1, 2], "input_ids": ["x", "y"], "image_bytes": [b"\x00", b"\x01"],
        "width": [11, 12], "manifest_width": [21, 22], "__altclip_seconds_fetch": [3.5, 4.5],
        "__altclip_pixels": ["p", "q"],
    })
    pq.write_table(table, tmp_path / "lists.parquet")
    altclip("embed", tmp_path / "lists.parquet", "--out", tmp_path / "lists", "--model", tiny_model)
    got = read_output(tmp_path / "lists")
    assert got["l1"]["text_error"].startswith("invalid_caption: the caption is a list<")
    assert got["l2"]["text_error"].startswith("empty_caption")
    assert got["l1"]["image_embedding"] is not None and got["l1"]["width"] == 43  # the image's own
    row = got["l1"]
    # Names of the stages' own columns are no one's: the manifest keeps them as they are.
    assert (row["pixels"], row["input_ids"], row["image_bytes"]) == (1, "x", b"\x00")
    assert (row["manifest_manifest_width"], row["manifest_width"]) == (11, 21)
    assert row["manifest___altclip_seconds_fetch"] == 3.5 and row["manifest___altclip_pixels"] == "p"

    pq.write_table(pa.table({"id": [1, 2], "image": ["a.png", "a.png"], "caption": [2024, 7]}),
                   tmp_path / "numbers.parquet")
    altclip("embed", tmp_path / "numbers.parquet", "--out", tmp_path / "numbers", "--model", tiny_model)
    got = read_output(tmp_path / "numbers")
    assert got["1"]["caption"] == "2024" and got["1"]["text_embedding"] is not None

    # CSV: one Latin-1 line, a quoted caption over two lines, a column numeric then not.
    (tmp_path / "m.csv").write_bytes(
        b'id,image,caption,rank\n'
        b'c1,a.png,plain,1\n'
        b'c2,a.png,caf\xe9 au lait,2\n'
        b'c3,a.png,"two\nlines",n/a\n')
    altclip("embed", tmp_path / "m.csv", "--out", tmp_path / "csv", "--model", tiny_model)
    got = read_output(tmp_path / "csv")
    assert got["c1"]["text_embedding"] is not None and got["c1"]["rank"] == "1"
    assert got["c2"]["text_error"].startswith("invalid_caption: the caption is not UTF-8 text (byte 0xe9")
    assert got["c2"]["image_embedding"] is not None
    assert got["c3"]["caption"] == "two\nlines" and got["c3"]["rank"] == "n/a"

    # JSON Lines: types that change between lines, a list caption, bytes that are not UTF-8,
    # a lone surrogate.
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([
        b'{"id": 1, "image": "a.png", "caption": "one", "rank": 1}',
        b'{"id": "two", "image": "a.png", "caption": ["a", "list"], "rank": "n/a"}',
        b'{"id": 3.5, "image": "a.png", "caption": "caf\xe9", "rank": 3}',
        b'{"id": "4", "image": 7, "caption": "lone \\ud800 surrogate", "rank": null}',
        b'',
    ]))
    altclip("embed", tmp_path / "m.jsonl", "--out", tmp_path / "json", "--model", tiny_model)
    got = read_output(tmp_path / "json")
    assert set(got) == {"1", "two", "3.5", "4"}
    # `rank` holds numbers and text: it is text, nothing lost.
    assert (got["1"]["rank"], got["two"]["rank"], got["4"]["rank"]) == ("1", "n/a", None)
    assert got["1"]["text_embedding"] is not None
    assert got["two"]["text_error"].startswith("invalid_caption: a JSON list, not text")
    assert got["3.5"]["text_error"].startswith("invalid_caption")
    assert got["4"]["image_error"].startswith("not_found")  # 7 is a (relative) path, not found
    assert got["4"]["text_error"].startswith("invalid_caption: not UTF-8 text")


def test_unreadable_manifest_lines_are_named(tiny_model, tmp_path):
    (tmp_path / "bad.csv").write_text("id,image,caption\nx,a.png,fine\ny,a.png,too,many\n")
    result = altclip("embed", tmp_path / "bad.csv", "--out", tmp_path / "o1", "--model", tiny_model,
                     expect_exit=1)
    assert "bad.csv, line 3: expected 3 fields, found 4" in result.stderr
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "caption": "x"}\n{"id": "b",, }\n[1, 2]\n')
    result = altclip("embed", tmp_path / "bad.jsonl", "--out", tmp_path / "o2", "--model", tiny_model,
                     "--towers", "text", expect_exit=1)
    assert "bad.jsonl, line 2: not JSON" in result.stderr and "(and 1 more like it)" in result.stderr


def test_ids_of_every_arrow_type_are_one_text_each(tiny_model, ray_session, tmp_path):
    from pipeline.read.formats import id_text

    columns = {
        "int8": pa.array([1, -2, None], pa.int8()), "uint64": pa.array([2**64 - 1, 0, 1], pa.uint64()),
        "float": pa.array([1.0, 2.5, float("nan")]), "bool": pa.array([True, False, None]),
        "binary": pa.array([b"abc", b"\xff\xfe", b""]), "large": pa.array(["a", "b", "c"], pa.large_string()),
        "date": pa.array([0, 1, 2], pa.date32()), "timestamp": pa.array([0, 1, 2], pa.timestamp("ms", "UTC")),
        "decimal": pa.array([1, 2, 3], pa.decimal128(10, 2)),
        "list": pa.array([[1, 2], [], None], pa.list_(pa.int64())),
        "struct": pa.array([{"a": 1}, {"a": 2}, None], pa.struct([("a", pa.int64())])),
        "dictionary": pa.array(["x", "y", "x"]).dictionary_encode(),
        "null": pa.nulls(3),
    }
    for name, column in columns.items():
        text = id_text(column)
        assert text.type == pa.string() and len(text) == 3, name
        assert text.null_count == column.null_count, name
    assert id_text(columns["binary"]).to_pylist() == ["abc", "0xfffe", ""]
    assert id_text(columns["list"]).to_pylist() == ["[1, 2]", "[]", None]

    # Through a whole job: struct ids, each row once, found again by a resume.
    (tmp_path / "a.png").write_bytes(_png(5))
    table = pa.table({"id": columns["struct"], "image": ["a.png"] * 3, "caption": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "m.parquet")
    result = altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model)
    got = read_output(tmp_path / "out")
    assert set(got) == {'{"a": 1}', '{"a": 2}'}
    assert "1 without id" in result.stderr
    again = altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model)
    assert "nothing to do" in again.stderr


def test_an_outage_of_the_jobs_own_image_store_stops_the_job_with_its_message(ray_session, prep):
    import socket

    import ray

    from pipeline.decode.fetch import FetchPolicy
    from pipeline.storage import outage_in

    with socket.socket() as probe:  # nothing listens here: the store is down
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    policy = FetchPolicy({"endpoint_url": endpoint, "key": "k", "secret": "s"}, patience_s=1,
                         job_schemes=frozenset({"s3"}))
    rows = pa.table({IMAGE: ["s3://corpus/a.jpg?X-Amz-Signature=SECRET"] * 2,
                     INLINE_IMAGE: pa.nulls(2, pa.binary())})
    ds = ray.data.from_arrow(rows).map_batches(
        preprocess_images, fn_kwargs={"preprocessing": prep, "policy": policy}, batch_format="pyarrow")
    with pytest.raises(Exception) as raised:
        ds.materialize()
    outage = outage_in(raised.value)
    assert outage is not None, "the outage was not recognised through Ray's wrapping"
    assert "s3://corpus/a.jpg" in str(outage) and "SECRET" not in str(outage)
    assert "SECRET" not in str(raised.value)


def test_a_long_caption_is_tokenized_from_its_start_with_the_same_ids(tiny_model):
    from pipeline.decode.text import load_tokenizer, token_ids

    tokenizer = load_tokenizer(tiny_model)
    words = "una foto de un gato en la nieve кошка в снегу ein Hund im Schnee ".split()
    captions = [
        " ".join(words[i % len(words)] for i in range(200_000)),  # 1 MB of words
        "猫の写真" * 50_000,  # no spaces at all
        " " * 100_000 + "a red car at night",  # spaces the tokenizer drops, then words
        "x" * 300_000,  # one word
        "short caption",
    ]
    for max_tokens in (64, 8):
        got_ids, got_cut = token_ids(tokenizer, captions, max_tokens)
        for caption, ids, cut in zip(captions, got_ids, got_cut):
            whole = tokenizer([caption], truncation=True, max_length=max_tokens + 1)["input_ids"][0]
            expected = whole[: max_tokens - 1] + [tokenizer.eos_token_id] if len(whole) > max_tokens else whole
            assert ids == expected and cut == (len(whole) > max_tokens), caption[:30]
