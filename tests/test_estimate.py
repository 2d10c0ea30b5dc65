"""`altclip embed --plan`: a run's projection from a timed sample, with nothing written."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import EmbedConfig
from pipeline.read.manifest import open_manifest
from pipeline.read.sample import count_rows, read_sample, spread_positions
from pipeline.run.projection import (
    ANN_INDEX_BYTES_PER_VECTOR,
    Stage,
    cpu_task_workers,
    cpu_tasks_to_feed,
    index_bytes,
    output_bytes,
    project,
)
from pipeline.run.stages import Placement, cpu_task_cpus
from tests.conftest import altclip
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    gone = {"id": "row-gone", "image": "images/gone.jpg", "caption": "a cat", "lang": "en", "rank": 99}
    return write_corpus(folder, extra_rows=[gone])


def test_plan_projects_the_run_and_writes_nothing(manifest, tiny_model, ray_session, tmp_path):
    out = tmp_path / "out"
    result = altclip("embed", manifest, "--out", out, "--model", tiny_model, "--batch-size", "4",
                     "--plan", "--json")
    assert not out.exists()
    plan = json.loads(result.stdout)
    rows = pq.ParquetFile(manifest).metadata.num_rows
    assert plan["rows"] == rows and plan["rows_counted_by"] == "parquet_metadata"
    assert plan["sample_rows"] == rows  # the default sample is larger than this manifest
    assert plan["sample_errors"] == {"image.not_found": 1}
    assert set(plan["stages"]) == {"fetch", "decode", "tokenize", "image_tower", "text_tower"}
    for stage in plan["stages"].values():
        assert stage["rows_per_second_per_worker"] > 0 and stage["workers"] >= 1
    assert plan["bottleneck"] in plan["stages"]
    assert plan["bottleneck_cause"] == "shared_cores"  # no GPU: the towers share the cores
    assert plan["device"] == "cpu" and plan["devices"] == 2
    assert plan["rows_per_second_per_device"] == pytest.approx(plan["rows_per_second"] / 2, rel=0.01)
    startup = plan["startup_seconds"]
    assert startup["total"] == pytest.approx(sum(v for k, v in startup.items() if k != "total"), abs=0.05)
    assert plan["wall_seconds"] == pytest.approx(startup["total"] + rows / plan["rows_per_second"], rel=0.01)
    assert plan["device_hours"] == pytest.approx(plan["wall_seconds"] * 2 / 3600, rel=0.01)
    assert 0 < plan["output_bytes"]["float16"] < plan["output_bytes"]["float32"]
    assert 0 < plan["table_bytes"]["float16"] < plan["table_bytes"]["float32"]
    assert plan["vectors"] == {"image_embedding": rows - 1, "text_embedding": rows}
    assert plan["ann_index_bytes"] == 0  # below the rows an ANN index is built from

    text = altclip("embed", manifest, "--out", out, "--model", tiny_model, "--batch-size", "4",
                   "--plan", "--plan-rows", "5").stdout
    assert not out.exists()
    assert f"plan: {rows} rows (counted from the Parquet footers); 5 rows" in text
    for name in ("fetch", "decode", "tokenize", "image_tower", "text_tower"):
        assert f"\n{name} " in text
    for label in ("rate: ", "bottleneck: ", "wall: ", "CPU-hours", "output: ",
                  "--vector-dtype float16", "table: ", "ANN indexes: "):
        assert label in text, label
    # On CPUs the tasks and the towers share the cores: no feed to size, no line for it.
    assert plan["cpu_tasks_to_feed_towers"] is None and "feed:" not in text

    # On GPUs the plan says whether the cluster's CPUs keep them busy.
    from pipeline.run.estimate import Estimate

    on_gpus = {**plan, "device": "gpu", "cluster": {**plan["cluster"], "gpus": 4},
               "cpu_tasks_to_feed_towers": 35, "workers": {**plan["workers"], "cpu_tasks": 20}}
    assert ("feed: 35 decode/tokenize task(s) keep the towers busy (8.8 CPUs per GPU); this "
            "cluster runs 20 at a time: too few: the towers will wait for their rows; give each "
            "GPU 9 free CPUs") in Estimate(**on_gpus).text()
    on_gpus["workers"]["cpu_tasks"] = 35
    assert "this cluster runs 35 at a time: enough" in Estimate(**on_gpus).text()


def test_plan_flags_are_checked(manifest, tiny_model, tmp_path):
    result = altclip("embed", manifest, "--out", tmp_path / "out", "--plan", "--retry-errors", expect_exit=2)
    assert "--plan" in result.stderr and "--retry-errors" in result.stderr
    result = altclip("embed", manifest, "--out", tmp_path / "out", "--model", tiny_model, "--plan",
                     "--plan-rows", "0", expect_exit=1)
    assert "--plan-rows 0" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_sample_spreads_over_every_file(tmp_path):
    # CSV: counted by reading the ids (no footer to ask); Parquet: from footers, and only the
    # row groups holding the sample are read.
    (tmp_path / "csv").mkdir()
    for name, ids in (("a.csv", range(0, 7)), ("b.csv", range(7, 12))):
        pacsv.write_csv(pa.table({"id": [f"r{i}" for i in ids], "caption": [f"c{i}" for i in ids]}),
                         tmp_path / "csv" / name)
    csv = open_manifest(EmbedConfig(manifest=str(tmp_path / "csv"), out="", towers=("text",)))
    counts, counted_by = count_rows(csv)
    assert (counts, counted_by) == ([7, 5], "count_pass")
    sample = read_sample(csv, counts, spread_positions(12, 4))
    assert sample.column("id").to_pylist() == ["r1", "r4", "r7", "r10"]
    assert sample.column("caption").to_pylist() == ["c1", "c4", "c7", "c10"]

    pq.write_table(pa.table({"id": [f"p{i}" for i in range(10)], "caption": ["x"] * 10}),
                   tmp_path / "m.parquet", row_group_size=3)
    parquet = open_manifest(EmbedConfig(manifest=str(tmp_path / "m.parquet"), out="", towers=("text",)))
    counts, counted_by = count_rows(parquet)
    assert (counts, counted_by) == ([10], "parquet_metadata")
    sample = read_sample(parquet, counts, spread_positions(10, 3))
    assert sample.column("id").to_pylist() == ["p1", "p5", "p8"]


def test_spread_positions():
    assert spread_positions(10, 3) == [1, 5, 8]
    assert spread_positions(2, 5) == [0, 1]  # never more rows than the manifest has
    positions = spread_positions(1_000_000, 200)
    assert len(set(positions)) == 200 and positions[0] < 5000 and positions[-1] > 995_000


def _stages(decode: float, image: float, text: float, tasks: int, actors: int,
            one_actor: bool) -> list[Stage]:
    towers = "towers" if one_actor else None
    return [Stage("fetch", 1000.0, "cpu_tasks", tasks), Stage("decode", decode, "cpu_tasks", tasks),
            Stage("tokenize", 2000.0, "cpu_tasks", tasks),
            Stage("image_tower", image, towers or "image_tower", actors),
            Stage("text_tower", text, towers or "text_tower", actors)]


def test_on_gpus_the_slowest_group_of_workers_sets_the_pace():
    # 10 CPU tasks, each fetching, decoding and tokenizing in turn: 10 / (1/1000 + 1/50 + 1/2000)
    # = 465.1 rows/s; 4 actors per tower, each tower on its own: 1,600 and 4,800 rows/s.
    stages = _stages(decode=50.0, image=400.0, text=1200.0, tasks=10, actors=4, one_actor=False)
    projection = project(stages, rows=1_000_000, shared_cores=False, startup_seconds=30.0, devices=8)
    assert projection.rows_per_second == pytest.approx(10 / (1 / 1000 + 1 / 50 + 1 / 2000))
    assert (projection.bottleneck, projection.bottleneck_cause) == ("decode", "workers")
    assert projection.wall_seconds == pytest.approx(30 + 1_000_000 / projection.rows_per_second)
    assert projection.device_hours == pytest.approx(projection.wall_seconds * 8 / 3600)

    # Fewer actors than the image tower needs: it holds the run back.
    slow_towers = _stages(decode=50.0, image=40.0, text=1200.0, tasks=10, actors=4, one_actor=False)
    projection = project(slow_towers, rows=1000, shared_cores=False, startup_seconds=0.0, devices=8)
    assert projection.rows_per_second == pytest.approx(160.0)
    assert projection.bottleneck == "image_tower"


def test_on_shared_cores_the_groups_times_add():
    # One CPU task and one actor with both towers on the same cores: seconds per row add up.
    stages = _stages(decode=80.0, image=600.0, text=2000.0, tasks=1, actors=1, one_actor=True)
    projection = project(stages, rows=2000, shared_cores=True, startup_seconds=15.0, devices=2)
    per_row = 1 / 1000 + 1 / 80 + 1 / 2000 + 1 / 600 + 1 / 2000
    assert projection.rows_per_second == pytest.approx(1 / per_row)
    assert (projection.bottleneck, projection.bottleneck_cause) == ("decode", "shared_cores")
    assert projection.wall_seconds == pytest.approx(15 + 2000 * per_row)
    assert projection.device_hours == pytest.approx(projection.wall_seconds * 2 / 3600)
    # The same stages streaming side by side would go at the decoding's pace, faster.
    assert project(stages, 2000, False, 15.0, 2).rows_per_second > projection.rows_per_second

    big_model = _stages(decode=80.0, image=2.0, text=5.0, tasks=1, actors=1, one_actor=True)
    assert project(big_model, 2000, True, 0.0, 2).bottleneck == "image_tower"


def test_workers_and_sizes():
    gpu = Placement(num_gpus=0.5, num_cpus=1.0, concurrency=4, torch_threads=0)
    # 64 - 8 actors' CPUs - 8 fetch actors' quarters - a read's quarter
    assert cpu_task_workers(64, gpu, towers=2) == 53
    cpu = Placement(num_gpus=0.0, num_cpus=0.5, concurrency=1, torch_threads=2)
    assert cpu_task_workers(2, cpu, towers=2) == 2  # a task per core, the actors' shares taken from them
    assert cpu_task_workers(2, Placement(0.0, 0.5, (1, 4), 1), towers=2) == 1  # never fewer than 1
    # A decode task never asks what the tower actor asks: Ray Data would fuse it into the actor.
    assert cpu_task_cpus(2, cpu, towers=2) != cpu.num_cpus

    assert output_bytes(25_000, bytes_per_row=100.0, bytes_per_shard=500, rows_per_shard=10_000) == 2_501_500
    vectors = {"image_embedding": 4_999, "text_embedding": 10_000}  # the first below the index's threshold
    assert index_bytes(vectors, dim=768) == 10_000 * (768 + ANN_INDEX_BYTES_PER_VECTOR)


def test_json_stands_alone_on_stdout_whatever_ray_prints(manifest, tmp_path, monkeypatch):
    import sys
    import types

    import pipeline.run.estimate

    def noisy_estimate(config, rows):  # as Ray's log monitor prints its processes' lines
        print("(raylet) WARNING: 8 PYTHON worker processes have been started on node ...", file=sys.stdout)
        return types.SimpleNamespace(to_dict=lambda: {"rows": 3}, notes=())

    monkeypatch.setattr(pipeline.run.estimate, "estimate_run", noisy_estimate)
    result = altclip("embed", manifest, "--out", tmp_path / "out", "--plan", "--json")
    assert json.loads(result.stdout) == {"rows": 3, "notes": []}
    assert "(raylet) WARNING" in result.stderr


def test_the_cpu_tasks_that_keep_the_towers_fed():
    # One CPU task: 1 / (1/1000 + 1/50 + 1/2000) = 46.5 rows/s. Four actors per tower on GPUs:
    # the image tower's 1,600 rows/s is the slower; 1600 / 46.5 = 34.4, so 35 tasks.
    stages = _stages(decode=50.0, image=400.0, text=1200.0, tasks=10, actors=4, one_actor=False)
    assert cpu_tasks_to_feed(stages) == 35
    # Decoding twice as fast halves it; towers without CPU tasks (nothing to feed) give none.
    assert cpu_tasks_to_feed(_stages(decode=100.0, image=400.0, text=1200.0, tasks=10, actors=4,
                                     one_actor=False)) == 19
    assert cpu_tasks_to_feed([s for s in stages if s.group != "cpu_tasks"]) is None
