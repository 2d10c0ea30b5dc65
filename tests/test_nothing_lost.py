"""Nothing lost, nothing twice: odd ids, reruns, resumes after a killed driver or actor, and
inputs the job must refuse to fetch."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import altclip, marked_environment, marked_processes, processes_left, read_output
from tests.corpus import odd_images
from tests.faults import OutageProxy


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10^10 pixels: refused from the header, never decoded."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _manifest(tmp_path, rows: list[dict], name="m.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_odd_ids_and_captions(tiny_model, ray_session, tmp_path):
    (tmp_path / "a.png").write_bytes(odd_images()["exact.png"])
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    long_caption = "una foto de un gato " * 5000  # 100 KB
    rows = [
        {"id": "a", "image": "a.png", "caption": "first a"},
        {"id": None, "image": "a.png", "caption": "no id"},
        {"id": "", "image": "a.png", "caption": "empty id"},
        {"id": "b", "image": "bomb.png", "caption": long_caption},
        {"id": "a", "image": "a.png", "caption": "second a"},
        {"id": "c", "image": "a.png", "caption": "control\x00\x07chars\u200b and emoji 🐱🐶"},
        {"id": "d", "image": "a.png", "caption": "مرحبا بالعالم שלום עולם"},
        {"id": "a", "image": "a.png", "caption": "third a"},
    ]
    out = tmp_path / "out"
    result = altclip("embed", _manifest(tmp_path, rows), "--out", out, "--model", tiny_model)
    got = read_output(out)
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"]["caption"] == "first a"  # the first row of a duplicated id wins
    assert got["b"]["image_error"].startswith("too_large: ") and "10000000000 pixels" in got["b"]["image_error"]
    assert got["b"]["caption_truncated"] is True and got["b"]["text_embedding"] is not None
    assert got["c"]["text_embedding"] is not None and got["d"]["text_embedding"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == 8 and summary["rows_out"] == 4
    assert summary["rows_rejected"] == {"missing_id": 2, "duplicate_id": 2}
    assert summary["duplicate_id_examples"] == ["a"]
    assert "rejected: 2 without id, 2 duplicate ids" in result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """200 rows over a few image files, in 10 manifest files (partitions) of 20 rows: enough
    shards (20) and partitions to kill a run between them."""
    folder = tmp_path_factory.mktemp("kill") / "manifest"
    folder.mkdir()
    images = odd_images()
    names = ["landscape.jpg", "portrait.png", "exact.png", "rgba.png", "grey.jpg"]
    for name in names:
        (folder / name).write_bytes(images[name])
    rows = [{"id": f"r{n:04d}", "image": names[n % len(names)], "caption": f"caption number {n}"}
            for n in range(ROWS)]
    for part in range(PARTITIONS):
        size = ROWS // PARTITIONS
        _manifest(folder, rows[part * size:(part + 1) * size], f"part-{part:02d}.parquet")
    return folder


ROWS = 200
PARTITIONS = 10
# One batch per shard, 20 shards: kill points between them, few tasks to start.
SMALL_SHARDS = ("--batch-size", "10", "--rows-per-shard", "10")


@pytest.fixture(scope="module")
def uninterrupted(corpus, tiny_model, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "out"
    altclip("embed", corpus, "--out", out, "--model", tiny_model, "--dtype", "float32",
            *SMALL_SHARDS)
    # --rows-per-shard is a maximum (writes are handed whole blocks, and more rows than that).
    assert max(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) <= 10
    return read_output(out)


def _same(got: dict, expected: dict):
    assert set(got) == set(expected)
    for row_id, row in expected.items():
        np.testing.assert_allclose(got[row_id]["image_embedding"], row["image_embedding"], atol=1e-6)
        np.testing.assert_allclose(got[row_id]["text_embedding"], row["text_embedding"], atol=1e-6)


def test_a_finished_job_rerun_does_no_model_work(corpus, tiny_model, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = ["embed", corpus, "--out", out, "--model", tiny_model, "--db", tmp_path / "db",
            "--dtype", "float32"]
    first = altclip(*args)
    # 5 image files under 200 rows, one tower actor: each file went through the tower once.
    assert json.loads((out / "summary.json").read_text())["images_reused"] == ROWS - 5
    assert f"({ROWS} rows: {ROWS} inserted, 0 updated; version" in first.stderr
    version = first.stderr.split("; version ")[1].split(")")[0]
    shards = sorted(out.glob("part-*.parquet"))
    result = altclip(*args)
    assert f"nothing to do: all {ROWS} rows are already in the output (no model work)" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_embedded"] == 0 and summary["rows_out"] == ROWS
    assert sorted(out.glob("part-*.parquet")) == shards
    # Nor table work: the table already holds every shard, and keeps its version.
    assert (f"({ROWS} rows: 0 inserted, 0 updated; version {version}); {len(shards)} shards already "
            "loaded") in result.stderr

    # A shard published twice (a retried write, a late worker of a killed run): one copy stays.
    twice = out / "part-published-twice.parquet"
    twice.write_bytes(shards[0].read_bytes())
    copied = pq.read_metadata(twice).num_rows
    altclip(*args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicate_rows_removed"] == copied
    assert len(read_output(out)) == ROWS == summary["rows_out"]

    result = altclip(*args[:-1], "bfloat16", expect_exit=1)
    assert "holds embeddings made differently (dtype: 'float32' there, 'bfloat16' now)" in result.stderr
    altclip(*args[:-1], "bfloat16", "--overwrite")
    assert json.loads((out / "summary.json").read_text())["provenance"]["dtype"] == "bfloat16"
    assert len(read_output(out)) == ROWS


@pytest.mark.parametrize("fraction", [0.1, 0.9])  # early and late in the run
def test_a_killed_driver_resumes_exactly_once(corpus, tiny_model, uninterrupted, tmp_path, fraction):
    out = tmp_path / "out"
    args = ["embed", str(corpus), "--out", str(out), "--model", tiny_model, "--dtype", "float32",
            *SMALL_SHARDS]
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    process = subprocess.Popen([altclip_bin, *args], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = max(1, int(PARTITIONS * fraction))  # committed partitions
    deadline = time.monotonic() + 240
    while len(_records(out)) < target and process.poll() is None:
        assert time.monotonic() < deadline, "the run never committed a partition"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    committed = sum(r["rows"] for r in _records(out).values())
    assert 0 < committed < ROWS

    result = altclip(*args)

    got = read_output(out)  # asserts no id twice
    _same(got, uninterrupted)
    summary = json.loads((out / "summary.json").read_text())
    # Ray's workers are not in the driver's process group: one in the middle of a write can
    # still publish its shard (and the ledger commit its partition) after the kill. The rerun
    # counts the partitions committed by then as done and redoes the others whole, removing
    # whatever shards of theirs the killed run published.
    done = summary["rows_already_done"]
    assert done >= committed and done % (ROWS // PARTITIONS) == 0
    assert summary["rows_embedded"] == ROWS - done  # only the partitions not committed are redone
    assert summary["rows_out"] == ROWS
    assert f"resumed: {done} rows were already done" in result.stderr
    assert sum(r["rows"] for r in _records(out).values()) == ROWS
    named = {name for r in _records(out).values() for name in r["shards"]}
    assert named == {p.name for p in out.glob("part-*.parquet")}  # every shard committed, none else
    print(f"killed at {fraction:.0%}: {committed} rows committed; the rerun embedded "
          f"{summary['rows_embedded']}, 0 twice")
    assert not list(out.glob(".part-*.tmp"))


def test_ctrl_c_late_in_a_run_keeps_the_partitions_the_towers_finished(corpus, tiny_model, uninterrupted,
                                                                         tmp_path):
    """With the default shard size (far more rows than the job has), writes and commits still
    run while the towers run: a Ctrl-C past half of the rows keeps the partitions finished by
    then, says so, leaves no process behind, and the rerun does only the rest. Its own Ray, as
    a user's command has. (At 80%, in a whole-suite run, all 200 rows reached their commit
    before the Ctrl-C did, and there was nothing left to resume.)"""
    out = tmp_path / "out"
    args = ["embed", str(corpus), "--out", str(out), "--model", tiny_model, "--dtype", "float32",
            "--batch-size", "10"]
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    env, mark = marked_environment(RAY_ADDRESS="")
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen([altclip_bin, *args, "--log-format", "json", "--progress-interval", "0.1"],
                                   start_new_session=True, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=env)
        done_at_kill, lines = 0, []
        for line in process.stdout:
            lines.append(line)
            event = json.loads(line)
            if event["event"] == "progress" and event["rows_done"] >= ROWS // 2:
                done_at_kill = event["rows_done"]
                running = marked_processes(mark)
                os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                break
        lines += process.communicate(timeout=120)[0].splitlines()
        stderr.seek(0)
        err = stderr.read()
    assert done_at_kill, "the run finished before half of its rows could be seen"
    assert process.returncode == 130, err[-2000:]
    assert "interrupted: what was written so far is kept; run the same command again to resume" in err
    # Everything on stdout, Ray's own processes' output included, is one JSON event per line.
    assert all(json.loads(line)["event"] in ("progress", "finished") for line in lines)
    # The mark reaches Ray's own processes (so what is left of them would be seen), and after
    # the exit none is left.
    assert any("raylet" in c for c in running) and any(c.startswith("ray::") for c in running), running
    assert not processes_left(mark), "processes left after Ctrl-C"
    committed = sum(r["rows"] for r in _records(out).values())
    # Writes waiting for a whole shard's rows (10,000) committed nothing before the end: "160
    # rows were through the towers, 0 committed". Rows out of the towers wait for a write task
    # and for the rest of their partition: on this machine 20 to 40 rows commonly, on a busier
    # one 110 of 170 once. What is held is that whole partitions are committed while the
    # towers run, not how far behind them.
    assert committed >= 2 * (ROWS // PARTITIONS), (
        f"{done_at_kill} rows were through the towers, {committed} committed")
    assert committed < ROWS
    print(f"Ctrl-C at {done_at_kill} rows through the towers: {committed} rows committed")

    result = altclip(*args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_already_done"] >= committed
    assert summary["rows_embedded"] == ROWS - summary["rows_already_done"]
    assert f"resumed: {summary['rows_already_done']} rows were already done" in result.stderr
    _same(read_output(out), uninterrupted)


def _records(out) -> dict[str, dict]:
    """The commit records of an output's partitions, by key."""
    return {p.stem: json.loads(p.read_text()) for p in (out / "_partitions").glob("*.json")}


def test_a_killed_tower_actor_loses_nothing(corpus, tiny_model, uninterrupted, ray_session, tmp_path):
    out = tmp_path / "out"
    killed = []

    def kill_text_actor():
        # Ray names an actor's process after it: "ray::MapWorker(MapBatches(TowersEmbedder))..."
        # (both towers in one actor on CPUs).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            pids = [int(line.split()[0]) for line in listing.splitlines()
                    if "Embedder" in line and "ray::" in line]
            if pids and list(out.glob("part-*.parquet")):  # after it has embedded some rows
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_text_actor)
    killer.start()
    altclip("embed", corpus, "--out", out, "--model", tiny_model, "--dtype", "float32",
            *SMALL_SHARDS)
    killer.join()
    assert killed, "no text actor was found to kill"
    _same(read_output(out), uninterrupted)


def test_a_manifest_from_object_storage_may_not_read_local_files(s3_server, tiny_model, ray_session,
                                                                 tmp_path):
    import s3fs

    local_image = tmp_path / "local.png"
    local_image.write_bytes(odd_images()["exact.png"])
    fs = s3fs.S3FileSystem()
    if not fs.exists("untrusted"):
        fs.mkdir("untrusted")
    fs.pipe("untrusted/ok.png", odd_images()["exact.png"])
    table = pa.table({"id": ["etc", "file", "local", "remote"],
                      "image": ["/etc/passwd", "file:///etc/hostname", str(local_image), "ok.png"],
                      "caption": ["a", "b", "c", "d"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe("untrusted/manifest.parquet", buf.getvalue())

    altclip("embed", "s3://untrusted/manifest.parquet", "--out", tmp_path / "out", "--model", tiny_model)
    got = read_output(tmp_path / "out")
    for row_id in ("etc", "file", "local"):
        assert got[row_id]["image_error"].startswith("forbidden: "), got[row_id]
        assert got[row_id]["image_sha256"] is None  # not even read
    assert got["remote"]["image_embedding"] is not None

    altclip("embed", "s3://untrusted/manifest.parquet", "--out", tmp_path / "allowed", "--model",
            tiny_model, "--allow-local-paths")
    assert read_output(tmp_path / "allowed")["local"]["image_embedding"] is not None


@pytest.fixture
def flaky_store(s3_server, corpus):
    """The corpus in S3, reached through a proxy the test can take down: (proxy, fs, bucket)."""
    import s3fs

    proxy = OutageProxy(int(s3_server.rsplit(":", 1)[1]))
    fs = s3fs.S3FileSystem()  # straight to the server, for the test's own reads
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    for path in corpus.iterdir():
        fs.put_file(str(path), f"{bucket}/manifest/{path.name}")
    yield proxy, fs, bucket
    proxy.down()


def _flaky_args(proxy, bucket, tiny_model, *extra):
    return ["embed", f"s3://{bucket}/manifest", "--out", f"s3://{bucket}/out",
            "--model", tiny_model, "--dtype", "float32", *SMALL_SHARDS,
            "--storage-option", f"endpoint_url={proxy.endpoint}", *extra]


def _in_background(*args):
    """`altclip ARGS` in a thread; once joined, results["run"] is its result."""
    results = {}
    thread = threading.Thread(target=lambda: results.update(run=altclip(*args, expect_exit=None)))
    thread.start()
    return thread, results


def _exited(results, code: int):
    run = results["run"]
    assert run.exit_code == code, f"exit {run.exit_code}\nstdout: {run.stdout}\nstderr: {run.stderr}"
    return run


def _wait_for_a_shard(fs, bucket, thread, pattern=None):
    """Until the run publishes a shard (or a file matching `pattern`)."""
    deadline = time.monotonic() + 180
    while True:
        fs.invalidate_cache()  # s3fs keeps listings: a folder first seen empty would stay so
        if fs.glob(pattern or f"{bucket}/out/part-*.parquet"):
            return
        assert thread.is_alive(), "the run ended before it published a shard"
        assert time.monotonic() < deadline, "the run never published a shard"
        time.sleep(0.05)


def _s3_output(fs, bucket) -> dict[str, dict]:
    rows = []
    for path in fs.glob(f"{bucket}/out/part-*.parquet"):
        with fs.open(path, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    got = {r["id"]: r for r in rows}
    assert len(got) == len(rows), "an id twice"
    return got


def test_a_storage_outage_mid_run_is_waited_out(flaky_store, tiny_model, uninterrupted, ray_session):
    proxy, fs, bucket = flaky_store
    thread, results = _in_background(*_flaky_args(proxy, bucket, tiny_model))
    _wait_for_a_shard(fs, bucket, thread)
    # Longer than one storage call's own retries (about 10 s): the job's patience carries it.
    proxy.down()
    time.sleep(15)
    assert thread.is_alive(), "the run ended during the outage"
    proxy.up()
    thread.join(300)
    _exited(results, 0)
    got = _s3_output(fs, bucket)
    _same(got, uninterrupted)  # every row has its vectors: none was failed for the outage
    summary = json.loads(fs.cat(f"{bucket}/out/summary.json"))
    assert summary["rows_out"] == ROWS and summary["errors_by_kind"] == {}


def test_a_storage_outage_past_the_patience_stops_the_job_and_a_rerun_resumes(
        flaky_store, tiny_model, uninterrupted, ray_session):
    proxy, fs, bucket = flaky_store
    args = _flaky_args(proxy, bucket, tiny_model, "--storage-patience", "2")
    thread, results = _in_background(*args)
    _wait_for_a_shard(fs, bucket, thread, f"{bucket}/out/_partitions/*.json")
    proxy.down()
    thread.join(300)
    message = _exited(results, 75).stderr  # EX_TEMPFAIL: a scheduler may rerun it
    assert "storage unavailable for" in message and "rerun the same command" in message
    assert "Traceback" not in message
    proxy.up()
    committed = sum(json.loads(fs.cat(p))["rows"] for p in fs.glob(f"{bucket}/out/_partitions/*.json"))
    assert 0 < committed < ROWS

    altclip(*args)
    got = _s3_output(fs, bucket)
    _same(got, uninterrupted)
    summary = json.loads(fs.cat(f"{bucket}/out/summary.json"))
    assert summary["rows_already_done"] >= committed and summary["rows_out"] == ROWS
    assert summary["rows_embedded"] == ROWS - summary["rows_already_done"]
