"""WebDataset shards as users have them: keys that later shards reuse, members out of order; every
row's image named by a URI that the project opens again (thumbnails, report, reembed)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import lancedb
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipeline.decode.barrier import ImageError
from pipeline.decode.fetch import FetchPolicy, read_bytes
from pipeline.serve.searcher import Searcher
from tests.conftest import altclip, read_output
from tests.corpus import odd_images, tar_of, webdataset_members, webdataset_shard

IMAGES = [odd_images()[name] for name in ("landscape.jpg", "portrait.png", "wide.jpg", "grey.jpg",
                                          "rgba.png", "exact.png", "cmyk.jpg")]


def _shards(folder, shards: list[list[tuple[str, bytes, str]]]) -> str:
    """Shards 00000, 00001, ... in `folder`; the manifest pattern that names them all."""
    for n, samples in enumerate(shards):
        (folder / f"{n:05d}.tar").write_bytes(webdataset_shard(samples))
    return str(folder / f"{{00000..{len(shards) - 1:05d}}}.tar")


def _members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture(scope="module")
def reused_keys(tiny_model, ray_session, tmp_path_factory):
    """Four shards of three samples; each shard numbers its samples from the one before's second
    key, as separate img2dataset runs do: keys 001..004 each come again in a later shard."""
    folder = tmp_path_factory.mktemp("webdataset")
    shards = [[(f"{first + n:03d}", IMAGES[(first + 2 * n) % len(IMAGES)], f"shard {first} sample {n}")
               for n in range(3)] for first in range(4)]
    manifest = _shards(folder, shards)
    result = altclip("embed", manifest, "--out", folder / "out", "--model", tiny_model,
                     "--db", folder / "db", "--dtype", "float32")
    return folder, shards, result


def test_keys_reused_by_later_shards_are_rows_once_the_first_shards(reused_keys):
    folder, shards, result = reused_keys
    got = read_output(folder / "out")  # asserts each id once
    first = {}
    for n, samples in enumerate(shards):
        for key, image, caption in samples:
            first.setdefault(key, (n, image, caption))
    assert set(got) == set(first) == {f"{k:03d}" for k in range(6)}
    for key, (n, image, caption) in first.items():
        assert got[key]["caption"] == caption
        assert got[key]["image"] == f"tar://{key}.jpg::{folder}/{n:05d}.tar"
        assert got[key]["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert got[key]["image_embedding"] is not None and got[key]["text_embedding"] is not None
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["rows_in"] == 12 and summary["rows_out"] == 6
    # 001 and 004 come twice, 002 and 003 three times: 6 later copies, as tables count them.
    assert summary["rows_rejected"] == {"missing_id": 0, "duplicate_id": 6}
    assert sorted(summary["duplicate_id_examples"]) == ["001", "002", "003", "004"]
    assert "rejected: 0 without id, 6 duplicate ids" in result.stderr


def test_every_image_opens_again_as_the_bytes_in_its_shard(reused_keys):
    folder, _, _ = reused_keys
    rows = pads.dataset(sorted(str(p) for p in (folder / "out").glob("part-*.parquet"))).to_table()
    for key, uri in zip(rows.column("id").to_pylist(), rows.column("image").to_pylist()):
        assert uri is not None and uri.startswith(f"tar://{key}.jpg::")
        assert read_bytes(uri) == _members(uri.split("::", 1)[1])[f"{key}.jpg"]
    # Where a manifest may not name local files, it may not name members of local tars either.
    remote = FetchPolicy(allow_local_paths=False, job_schemes=frozenset({"s3"}))
    with pytest.raises(ImageError, match="^forbidden: "):
        read_bytes(uri, remote)
    with pytest.raises(ImageError, match="^not_found: "):
        read_bytes(f"tar://no-such-key.jpg::{folder}/00000.tar")


def test_the_report_shows_the_images_of_webdataset_rows(reused_keys, tmp_path):
    folder, _, _ = reused_keys
    page = tmp_path / "report.html"
    altclip("report", folder / "out", "--html", page, "--samples", "6")
    text = page.read_text()
    distinct = {r["image_sha256"] for r in read_output(folder / "out").values()}  # 5 of 6 rows
    assert text.count('src="data:image/jpeg;base64,') == len(distinct) and "(no image)" not in text


def test_serve_thumbnails_webdataset_rows(reused_keys):
    folder, shards, _ = reused_keys
    searcher = Searcher(str(folder / "db"), "embeddings")
    data, _ = searcher.thumbnail("003", 96)
    thumbnail = Image.open(io.BytesIO(data))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 96
    # The first shard's 003 (shard 1) wins: its image, not shard 2's or 3's.
    original = Image.open(io.BytesIO(shards[1][2][1]))
    assert abs(thumbnail.size[0] / thumbnail.size[1] - original.size[0] / original.size[1]) < 0.05


def test_members_out_of_order_do_not_stop_the_job(tiny_model, ray_session, tmp_path):
    """Ray's own reader fails the whole job on a key whose members are not adjacent."""
    a, b = webdataset_members("a", IMAGES[0], "cap a"), webdataset_members("b", IMAGES[1], "cap b")
    c = webdataset_members("c", IMAGES[2], "cap c")
    members = [a[0], b[0], a[1], b[1], ("README", b"not a sample"), *c, a[2], b[2]]
    (tmp_path / "00000.tar").write_bytes(tar_of(members))
    altclip("embed", tmp_path / "00000.tar", "--out", tmp_path / "out", "--model", tiny_model)
    got = read_output(tmp_path / "out")
    assert set(got) == {"a", "b", "c"}
    for key, caption in (("a", "cap a"), ("b", "cap b"), ("c", "cap c")):
        assert got[key]["caption"] == caption and got[key]["url"] == f"https://example.com/{key}.jpg"
        assert got[key]["image_embedding"] is not None and got[key]["text_embedding"] is not None
        assert read_bytes(got[key]["image"]) == dict(members)[f"{key}.jpg"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == 3


def test_reembed_finds_the_one_image_a_shard_changed(tiny_model, ray_session, tmp_path):
    def day(changed: bool) -> str:
        shards = [[("k0", IMAGES[0], "zero"), ("k1", IMAGES[1], "one")],
                  [("k1", IMAGES[2], "one again"), ("k2", IMAGES[4 if changed else 3], "two")]]
        return _shards(tmp_path, shards)

    def reembed(manifest) -> dict:
        result = altclip("reembed", manifest, "--db", tmp_path / "db", "--model", tiny_model,
                         "--dtype", "float32", "--json")
        return json.loads(result.stdout)

    first = reembed(day(False))
    assert first["new"] == 3 and first["rows_rejected"]["duplicate_id"] == 1
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings").to_arrow()
    k2 = table.filter(pc.equal(table.column("id"), "k2")).column("image")[0].as_py()
    assert read_bytes(k2) == IMAGES[3]
    second = reembed(day(True))
    assert second["image_changed"] == 1 and second["caption_changed"] == second["new"] == 0
    assert second["image_tower_rows"] == 1 and second["text_tower_rows"] == 0
    assert second["unchanged"] == 2 and second["rows_upserted"] == 1
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings").to_arrow().to_pylist()
    rows = {r["id"]: r for r in table}
    assert len(rows) == len(table) == 3
    assert rows["k1"]["caption"] == "one"  # the first shard's
    assert rows["k2"]["image"] == k2 and read_bytes(k2) == IMAGES[4]  # the shard's new bytes
    assert rows["k2"]["image_sha256"] == hashlib.sha256(IMAGES[4]).hexdigest()


def test_image_only_shards_are_a_corpus_of_images(tiny_model, ray_session, tmp_path):
    """A peer's shards of images with metadata and no `.txt` member: every row an image, none an
    error of an empty caption; reembed takes them the same way."""
    members = [m for n in range(4) for m in webdataset_members(f"{n:03d}", IMAGES[n], "unused")
               if not m[0].endswith(".txt")]
    (tmp_path / "00000.tar").write_bytes(tar_of(members))
    result = altclip("embed", tmp_path / "00000.tar", "--out", tmp_path / "out", "--model", tiny_model)
    assert "no captions: image tower only (name a column of captions with --caption-col)" in result.stderr
    got = read_output(tmp_path / "out")
    assert set(got) == {f"{n:03d}" for n in range(4)}
    for row in got.values():
        assert row["image_embedding"] is not None and row["image_error"] is None
        assert row["text_embedding"] is None and row["text_error"] is None and row["caption"] is None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_out"] == 4 and not summary["errors_by_kind"]

    planned = altclip("embed", tmp_path / "00000.tar", "--out", tmp_path / "planned", "--model", tiny_model,
                      "--plan", "--plan-rows", "4", "--json")  # the plan says it as the run does
    assert "no captions: image tower only" in planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["towers"] == ["image"] and list(plan["notes"]) == [
        "no captions: image tower only (name a column of captions with --caption-col)"]

    result = altclip("reembed", tmp_path / "00000.tar", "--db", tmp_path / "db", "--model", tiny_model,
                     "--json")
    assert "no captions: image tower only" in result.stderr
    reembedded = json.loads(result.stdout)
    assert reembedded["new"] == 4 and reembedded["image_tower_rows"] == 4 and reembedded["text_tower_rows"] == 0
    rows = lancedb.connect(str(tmp_path / "db")).open_table("embeddings").to_arrow().to_pylist()
    assert len(rows) == 4 and all(r["image_embedding"] is not None and r["text_error"] is None for r in rows)
