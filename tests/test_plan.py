"""The plan cannot stall: on the smallest supported machine (2 CPUs) every stage can run while the
ones before it hold their reservations, however small and fast the blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import altclip, marked_environment, processes_left, read_output
from tests.corpus import write_corpus


def test_hundreds_of_tiny_blocks_finish(tiny_model, tmp_path):
    # Rows that all fail fast (a missing file, an empty caption) in blocks of 2 rows: the read,
    # decode and write stages turn over a block every few milliseconds, the shape that once left
    # the write waiting for a CPU for ever while the stages before it waited on its queue (its
    # queue fills within the first hundred blocks). Its own process and Ray, with every core of
    # this machine (2 in CI), as a user runs it.
    rows = 600  # 300 blocks
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "image": [f"missing/{i}.jpg" for i in range(rows)],
                             "caption": [""] * rows}), tmp_path / "m.parquet")
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    started = time.monotonic()
    env, mark = marked_environment(RAY_ADDRESS="")
    result = subprocess.run(
        [altclip_bin, "embed", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"),
         "--model", tiny_model, "--batch-size", "2", "--rows-per-shard", "250", "--quiet"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not processes_left(mark), "processes left after the run"
    # Ray's and Ray Data's notes about themselves are not the run's output (--verbose has them).
    for note in ("Token authentication", "Execution plan of Dataset", "execution finished",
                 "Data sink ParquetShardSink finished"):
        assert note not in result.stderr, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_out"] == rows
    assert summary["errors_by_kind"] == {"image.not_found": rows, "text.empty_caption": rows}
    print(f"\n{rows} rows in blocks of 2: {time.monotonic() - started:.0f} s")


def test_the_jobs_ray_data_settings_reach_its_datasets(tiny_model, ray_session, tmp_path):
    # Each dataset keeps the settings current when its read was made: settings applied later
    # (as the plan once did for the actor start timeout) never took effect.
    import ray

    from pipeline.config import EmbedConfig
    from pipeline.embed.model import resolve_model
    from pipeline.read.manifest import open_manifest
    from pipeline.run.stages import configure_ray_data, embed_dataset, manifest_rows, plan_placement

    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "m.parquet")
    config = EmbedConfig(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "out"),
                         model=tiny_model, towers=("text",))
    saved = ray.data.DataContext.get_current().enable_progress_bars
    try:
        configure_ray_data(progress_bars=False)
        rows = manifest_rows(open_manifest(config), None, 8)
        plan = embed_dataset(rows, config, resolve_model(tiny_model), "float32", plan_placement(config))
        # The plan starts without waiting for its tower actors (TowerStartWatch bounds the wait).
        assert plan.context.wait_for_min_actors_s <= 0
        assert plan.context.enable_progress_bars is False
        assert "Could not connect to the endpoint URL" in plan.context.retried_io_errors
    finally:
        ray.data.DataContext.get_current().enable_progress_bars = saved


def test_tower_actors_that_do_not_start_fail_the_job_and_a_rerun_finishes_it(tiny_model, ray_session,
                                                                             tmp_path, monkeypatch):
    # Reads and decodes start while the tower actors load; an actor no node can place would
    # leave the job waiting for ever. A limit shorter than any actor takes to import torch
    # stands in for that actor here.
    import pipeline.run.stages

    manifest = write_corpus(tmp_path)
    rows = pq.read_table(manifest).num_rows
    monkeypatch.setattr(pipeline.run.stages, "ACTOR_START_TIMEOUT_S", 0.3)
    # As in a job a shell started in the background (`altclip embed ... &`): SIGINT ignored.
    # The watch must not depend on SIGINT's handler (it did, and such a job waited for ever).
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = altclip("embed", manifest, "--out", tmp_path / "out", "--model", tiny_model, expect_exit=1)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert "no tower actor started in 0.3 s" in result.stderr
    assert "--num-gpus" in result.stderr and "--concurrency" in result.stderr

    monkeypatch.undo()
    altclip("embed", manifest, "--out", tmp_path / "out", "--model", tiny_model)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows_out"] == rows and len(read_output(tmp_path / "out")) == rows
