"""Manifests, images, model, outputs and table all in S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.decode.fetch import read_bytes
from pipeline.table.indexes import full_text_index
from pipeline.table.store import open_table
from tests.conftest import SECRET_ACCESS_KEY, _free_port, altclip, embedded_corpus, read_output
from tests.corpus import CAPTIONS, odd_images, webdataset_shard


@pytest.fixture(scope="module")
def s3(s3_server):
    fs = s3fs.S3FileSystem()
    for bucket in ("corpus", "models", "out", "tables"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return fs


@pytest.fixture(scope="module")
def local_run(standard_run, tmp_path_factory):
    folder = embedded_corpus(standard_run, tmp_path_factory, "local")
    return folder, read_output(folder / "out")


def _read_s3_output(fs, prefix: str) -> dict[str, dict]:
    rows = []
    for path in fs.glob(f"{prefix}/part-*.parquet"):
        with fs.open(path, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return {r["id"]: r for r in rows}


def _assert_same_vectors(got: dict, expected: dict):
    assert set(got) == set(expected)
    for row_id, row in expected.items():
        for column in ("image_embedding", "text_embedding"):
            np.testing.assert_allclose(got[row_id][column], row[column], atol=1e-6)


def test_everything_in_s3_equals_the_local_run(s3, tiny_model, local_run, tmp_path):
    folder, expected = local_run
    s3.put(str(folder / "images"), "corpus/run/images", recursive=True)
    s3.put(str(folder / "manifest.parquet"), "corpus/run/manifest.parquet")
    s3.put(tiny_model, "models/tiny", recursive=True)
    result = altclip("embed", "s3://corpus/run/manifest.parquet", "--out", "s3://out/run",
                     "--model", "s3://models/tiny/", "--db", "s3://tables/db", "--dtype", "float32")

    got = _read_s3_output(s3, "out/run")
    _assert_same_vectors(got, expected)
    assert got["row-00"]["image"] == "s3://corpus/run/images/" + sorted(odd_images())[0]
    summary = json.loads(s3.cat("out/run/summary.json"))
    assert summary["rows_out"] == len(expected) and summary["provenance"]["model"] == "s3://models/tiny/"
    cached = os.path.join(os.environ["ALTCLIP_CACHE"], "models")
    assert len(os.listdir(cached)) == 1  # copied once into this node's cache, used by every worker
    assert "table: s3://tables/db" in result.stderr

    hits = [json.loads(line) for line in altclip(
        "search", "s3://tables/db", "--image", "s3://corpus/run/images/rgba.png", "--k", "2", "--json"
    ).stdout.splitlines()]
    assert hits[0]["image"].endswith("images/rgba.png") and hits[0]["score"] > 0.9999
    counted = altclip("sql", "s3://tables/db", "SELECT count(*) AS n FROM embeddings", "--json")
    assert json.loads(counted.stdout) == {"n": len(expected)}

    # A later load on S3 takes only the shard it lacks, into indexes it extends in place.
    shards = s3.glob("out/run/part-*.parquet")
    with s3.open(shards[0], "rb") as f:
        more = pq.read_table(f)
    more = more.set_column(more.schema.get_field_index("id"), more.schema.field("id"),
                           pa.array([f"more-{i}" for i in range(more.num_rows)]))
    pq.write_table(more, tmp_path / "more.parquet")
    s3.put(str(tmp_path / "more.parquet"), f"out/run/part-{time.time_ns():020d}-more.parquet")
    loaded = altclip("load", "s3://out/run", "--db", "s3://tables/db").stderr
    assert f"{more.num_rows} inserted, 0 updated" in loaded and f"{len(shards)} shards already loaded" in loaded
    counted = altclip("sql", "s3://tables/db", "SELECT count(*) AS n FROM embeddings", "--json")
    assert json.loads(counted.stdout) == {"n": len(expected) + more.num_rows}
    table = open_table("s3://tables/db", "embeddings")
    captions = table.index_stats(full_text_index(table).name)
    assert (captions.num_indexed_rows, captions.num_unindexed_rows) == (len(expected) + more.num_rows, 0)


def test_webdataset_shards_in_s3(s3, tiny_model, local_run):
    folder, expected = local_run
    images = odd_images()
    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    samples = [(r["id"], images[r["image"].split("/")[-1]], r["caption"]) for r in manifest]
    s3.pipe("corpus/wds/00000.tar", webdataset_shard(samples[:6]))
    s3.pipe("corpus/wds/00001.tar", webdataset_shard(samples[6:]))

    altclip("embed", "s3://corpus/wds/{00000..00001}.tar", "--out", "s3://out/wds",
            "--model", tiny_model, "--dtype", "float32")

    got = _read_s3_output(s3, "out/wds")
    _assert_same_vectors(got, expected)
    assert got["row-03"]["url"] == "https://example.com/row-03.jpg"
    assert got["row-03"]["manifest_width"] == 123  # img2dataset's width, beside ours
    assert got["row-03"]["caption"] == CAPTIONS[3]
    # Each image is named by its member of its shard, which opens again with the job's settings.
    assert got["row-03"]["image"] == "tar://row-03.jpg::s3://corpus/wds/00000.tar"
    assert got["row-08"]["image"] == "tar://row-08.jpg::s3://corpus/wds/00001.tar"
    assert read_bytes(got["row-08"]["image"]) == samples[8][1]


def test_a_folder_of_images_in_s3(s3, tiny_model, local_run):
    """Images with their captions beside them as .txt objects: the same vectors as the manifest's
    rows, the listing written into OUT."""
    folder, expected = local_run
    by_name = {r["image"].split("/")[-1]: r for r in expected.values()}
    for name, data in odd_images().items():
        s3.pipe(f"corpus/folder/{name}", data)
        s3.pipe(f"corpus/folder/{name.rsplit('.', 1)[0]}.txt", by_name[name]["caption"].encode())

    altclip("embed", "s3://corpus/folder/", "--out", "s3://out/folder", "--model", tiny_model, "--dtype", "float32")

    got = _read_s3_output(s3, "out/folder")
    _assert_same_vectors(got, {name: by_name[name] for name in odd_images()})
    assert got["rgba.png"]["image"] == "s3://corpus/folder/rgba.png"
    assert got["rgba.png"]["caption"] == by_name["rgba.png"]["caption"]
    assert len(s3.glob("out/folder/_images-*.parquet")) == 1


def test_storage_problems_fail_before_work_and_name_the_cause(s3, tiny_model, local_run, tmp_path):
    folder, _ = local_run
    manifest = str(folder / "manifest.parquet")

    result = altclip("embed", manifest, "--out", "s3://no-such-bucket/run", "--model", tiny_model,
                     expect_exit=1)
    assert "--out s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist" in result.stderr

    result = altclip("embed", "s3://no-such-bucket/m.parquet", "--out", tmp_path / "o",
                     "--model", tiny_model, expect_exit=1)
    assert "manifest s3://no-such-bucket/m.parquet" in result.stderr

    started = time.monotonic()
    result = altclip("embed", "s3://corpus/run/manifest.parquet", "--out", tmp_path / "o2",
                     "--model", tiny_model, "--storage-option", "endpoint_url=http://127.0.0.1:9",
                     expect_exit=1)
    assert "cannot list manifest s3://corpus/run/manifest.parquet" in result.stderr
    assert time.monotonic() - started < 60  # a timeout, not a hang

    for output in (result.stdout, result.stderr):
        assert SECRET_ACCESS_KEY not in output


def test_missing_objects_fail_their_rows_only(s3, tiny_model, ray_session, tmp_path):
    s3.pipe("corpus/rows/a.png", odd_images()["exact.png"])
    table = pa.table({"id": ["a", "b"], "image": ["a.png", "s3://corpus/rows/gone.png"],
                      "caption": ["un gato", "un perro"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.pipe("corpus/rows/manifest.parquet", buf.getvalue())
    altclip("embed", "s3://corpus/rows/manifest.parquet", "--out", "s3://out/rows", "--model", tiny_model)
    got = _read_s3_output(s3, "out/rows")
    assert got["a"]["image_embedding"] is not None
    assert got["b"]["image_error"] == "not_found: s3://corpus/rows/gone.png does not exist"
    assert got["b"]["text_embedding"] is not None
    for path in s3.find("out/rows"):
        assert SECRET_ACCESS_KEY.encode() not in s3.cat(path)


def test_wrong_credentials_fail_before_work(tiny_model, local_run, tmp_path):
    """A second S3 server that checks credentials (moto's IAM enforcement, on from the first
    request): keys it does not know are refused, and the job says so before any work."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from moto.server import ThreadedMotoServer; "
         f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}).start(); time.sleep(3600)"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        folder, _ = local_run
        result = altclip("embed", folder / "manifest.parquet", "--out", "s3://any-bucket/run",
                         "--model", tiny_model, "--storage-option", f"endpoint_url=http://127.0.0.1:{port}",
                         "--storage-option", "key=NOT-A-KEY", "--storage-option", "secret=NOT-A-SECRET",
                         expect_exit=1)
        assert "--out s3://any-bucket/run: access denied, check the credentials" in result.stderr
        assert "NOT-A-SECRET" not in result.stderr
    finally:
        server.kill()


def test_an_unreachable_store_is_an_outage_when_pyarrow_opens_a_file_not_a_missing_file():
    """pyarrow's fsspec handler asks isfile() before opening, and fsspec answers False on any
    error: the handler the readers use lets the store's own error through."""
    import fsspec
    import fsspec.implementations.memory as memory
    import pyarrow.parquet as pq

    from pipeline import storage

    class Unreachable(memory.MemoryFileSystem):
        protocol = ("unreachable",)
        isfile = fsspec.AbstractFileSystem.isfile  # as s3fs has it: False on any error

        def _open(self, path, mode="rb", **kwargs):
            raise ConnectionRefusedError(111, "Connection refused")

        def info(self, path, **kwargs):
            raise ConnectionRefusedError(111, "Connection refused")

    store = memory.MemoryFileSystem()
    with store.open("/bucket/m.parquet", "wb") as f:
        pq.write_table(__import__("pyarrow").table({"id": ["a"]}), f)
    assert pq.read_table("/bucket/m.parquet", filesystem=storage.arrow_filesystem(store)).num_rows == 1
    with pytest.raises(FileNotFoundError):
        pq.read_table("/bucket/missing.parquet", filesystem=storage.arrow_filesystem(store))
    # Ray Data's readers open the files they were given, as this does.
    with pytest.raises(FileNotFoundError):
        storage.arrow_filesystem(store).open_input_file("/bucket/missing.parquet")
    with pytest.raises(ConnectionRefusedError) as raised:
        storage.arrow_filesystem(Unreachable()).open_input_file("/bucket/m.parquet")
    assert storage.is_unavailable(raised.value)


def test_a_store_client_whose_first_import_was_interrupted_loads_on_the_next_task():
    """Ray Data cancels a stopped stage's tasks with a KeyboardInterrupt, which can land in a
    worker's first import of s3fs: aiohttp's finished submodules stay cached without the
    package, and a plain import again finds `aiohttp` without them. The next task's store
    must still open (in a child: the test tears this process's module cache on purpose)."""
    script = """
import sys
import aiohttp.http_exceptions
for name in [n for n in sys.modules if n.split(".")[0] in ("aiohttp", "aiobotocore", "s3fs")
             and "." not in n]:
    del sys.modules[name]  # as an interrupted import of the package leaves it
from pipeline import storage
fs, path = storage.filesystem("s3://bucket/manifest.parquet", {"anon": True})
print(type(fs).__name__, path)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["S3FileSystem", "bucket/manifest.parquet"]


@pytest.mark.parametrize("error, words", [
    (ValueError('Failed to connect to namespace: IO { source: Generic { store: "S3", source: ListRequest { source: '
                'RetryError(RetryErrorImpl { method: GET, uri: Some(http://10.0.0.7:9000/bucket?list-type=2&prefix=db), '
                'inner: Http(HttpError { kind: Connect, source: ConnectError("tcp connect error", 10.0.0.7:9000, '
                'Os { code: 111, kind: ConnectionRefused, message: "Connection refused" })) }) } }'),
     "connection refused at http://10.0.0.7:9000"),
    (OSError("Generic S3 error: Error performing GET https://s3.nowhere.example/b/x in 1s: error sending "
             "request: dns error: failed to lookup address information"), "name not resolved at https://s3.nowhere.example"),
    (TimeoutError("read timed out"), "timed out"),
])
def test_an_unreachable_store_is_said_in_a_few_words(error, words):
    from pipeline.storage import why_unavailable

    assert why_unavailable(error) == words
