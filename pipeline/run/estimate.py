"""Project an embed run before it starts (`embed --plan`): each stage timed on a sample of the
manifest where the run would run it, then rows, bottleneck, wall time, device-hours and bytes
for the whole manifest at the cluster's size. Nothing is written, and of the run's Ray Data plan
only the manifest read starts, for one row, to time it. The result is an Estimate: its text for
a person, its dict for `--json`; the timing itself is sample_timing's."""

from __future__ import annotations

import dataclasses
import io
import math
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import DEFAULT_SAMPLE_ROWS, ConfigError, EmbedConfig, named
from pipeline.embed.provenance import provenance
from pipeline.read.manifest import Manifest
from pipeline.read.sample import count_rows, read_sample, spread_positions
from pipeline.run.prepare import Run, prepare_run
from pipeline.run.projection import Stage, cpu_task_workers, cpu_tasks_to_feed, index_bytes, output_bytes, project
from pipeline.run.sample_timing import sample_policy, time_sample, timed_stages
from pipeline.run.stages import (
    FETCH_CALLS,
    actors_per_tower,
    fetch_actors,
    manifest_rows,
)
from pipeline.timing import pop_figures
from pipeline.write.shards import conform, errors_by_kind
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema


def _parquet_bytes(table: pa.Table) -> int:
    """Bytes of `table` as the writer writes a shard (zstd), written to memory."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.tell()


def _id_scan_seconds(manifest: Manifest, counts: list[int], count_seconds: float) -> float:
    """How long the run's reading of every id takes before any work (manifest.scan_ids). The
    count pass of CSV, JSON Lines and WebDataset read what it reads; for Parquet, the ids of one
    row group are read and timed, and the time scaled to the manifest's rows."""
    if manifest.format != "parquet":
        return count_seconds
    fs = manifest.filesystem()
    path = next(p for p, n in zip(manifest.files, counts) if n)
    started = time.perf_counter()
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        group = parquet.metadata.row_group(0).num_rows
        parquet.read_row_group(0, columns=[manifest.id_col])
    return (time.perf_counter() - started) * sum(counts) / max(1, group)


def _read_start_seconds(manifest: Manifest, batch_size: int) -> float:
    """Seconds until the run's read of the manifest (plan.manifest_rows: Ray Data's tasks
    listing and reading the files, one after the other) gives its first row: a few seconds on 2
    cores. Only this read runs, for one row: not the run's plan."""
    started = time.perf_counter()
    manifest_rows(manifest, None, batch_size).limit(1).take(1)
    return time.perf_counter() - started


def _lance_bytes(table: pa.Table) -> int:
    """Bytes of `table` as a Lance dataset holds it (LanceDB's table format), written to Lance's
    in-memory store: nothing on disk."""
    import lance

    dataset = lance.write_dataset(table, f"memory://altclip-plan/{uuid.uuid4().hex}.lance")
    return sum(f.file_size_bytes for fragment in dataset.get_fragments() for f in fragment.data_files())


def _output_sizes(table: pa.Table, rows: int, config: EmbedConfig, manifest: Manifest, model,
                  dtype: str) -> dict:
    """Bytes of the outputs, the table and its ANN indexes, from the sample's rows as the writer
    would write them (to memory) in each --vector-dtype.

    The table's bytes are the rows' as Lance stores them, which compresses text as it goes: a
    row costs less the more rows there are (the 2,000-row check: 893 bytes a row over the first
    200, 742 over all). So the sample's second half is what a row adds, the rest is the file's
    own, and the two scale apart (projected from 200 rows: 1.67 MB; loaded: 1.49 MB)."""
    sizes = {"output_bytes": {}, "table_bytes": {}}
    half = table.num_rows // 2
    for vector_dtype in ("float32", "float16"):
        recorded = provenance(model, dtype, config.towers, config.preprocess, vector_dtype)
        schema = embeddings_schema(model.dim, list(manifest.metadata_fields), recorded)
        out = conform(table, schema, model.label)
        per_shard = _parquet_bytes(out.slice(0, 0))
        per_row = (_parquet_bytes(out) - per_shard) / out.num_rows
        sizes["output_bytes"][vector_dtype] = output_bytes(rows, per_row, per_shard, config.rows_per_shard)
        whole = _lance_bytes(out)
        per_row = ((whole - _lance_bytes(out.slice(0, half))) / (out.num_rows - half) if half
                   else whole / out.num_rows)
        sizes["table_bytes"][vector_dtype] = round(max(whole - per_row * out.num_rows, 0) + per_row * rows)
    # Rows with a vector in the sample, in proportion (a tower not run: none).
    vectors = {c: round(rows * (1 - table.column(c).null_count / table.num_rows)) if c in table.column_names
               else 0 for c in (IMAGE_EMBEDDING, TEXT_EMBEDDING)}
    sizes["vectors"] = vectors
    sizes["ann_index_bytes"] = index_bytes(vectors, model.dim)
    return sizes




def _startup(run: Run, scan_seconds: float, read_start_seconds: float, started_in: dict,
             first_batch: float) -> dict:
    """Before the first row is out, one after the other (as Ray Data's log of a run shows): the
    manifest and model opened, Ray, the id scan; Ray Data waits for its tower actors (a worker,
    its imports, the weights), then its tasks list and read the manifest's files, then a CPU
    task starts and decodes the first batch, which goes through the towers."""
    return {"setup": run.setup_seconds, "ray": run.ray_seconds, "id_scan": scan_seconds,
            "tower_worker": started_in["worker"], "model_load": started_in["model_load"],
            "read_start": read_start_seconds, "cpu_task_start": started_in["cpu_task"],
            "first_batch": first_batch}


def _projected(stages: list[Stage], projection, on_gpu: bool, devices: float, startup: dict) -> dict:
    return {
        "stages": {s.name: {"rows_per_second_per_worker": round(s.rows_per_second, 2),
                            "workers": s.workers,
                            "rows_per_second": round(s.rows_per_second * s.workers, 2)} for s in stages},
        "cpu_tasks_to_feed_towers": cpu_tasks_to_feed(stages) if on_gpu else None,
        "rows_per_second": round(projection.rows_per_second, 2),
        "bottleneck": projection.bottleneck,
        "bottleneck_cause": projection.bottleneck_cause,
        "device": "gpu" if on_gpu else "cpu",
        "devices": devices,
        "rows_per_second_per_device": round(projection.rows_per_second / devices, 3),
        "startup_seconds": {**{k: round(v, 2) for k, v in startup.items()},
                            "total": round(sum(startup.values()), 2)},
        "wall_seconds": round(projection.wall_seconds, 2),
        "device_hours": float(f"{projection.device_hours:.4g}"),
    }


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What `altclip embed` with a config would take: `embed --plan` prints `text()`, and
    `--plan --json` prints `to_dict()` (every figure, under these names)."""

    manifest: str
    rows: int
    rows_counted_by: str  # parquet_metadata or count_pass
    sample_rows: int
    sample_rows_through_towers: int
    sample_errors: dict  # error kind -> rows of the sample
    model: str
    dtype: str
    towers: list
    batch_size: int
    cluster: dict  # cpus, gpus, nodes
    workers: dict  # cpu_tasks, tower_actors, towers_per_actor, torch_threads, num_gpus_per_actor
    towers_timed_on: str
    stages: dict  # name -> rows_per_second_per_worker, workers, rows_per_second
    # The CPU tasks that would keep the towers fed: beside workers.cpu_tasks, it says whether
    # this cluster has CPUs enough per accelerator (on CPUs the two share the cores instead).
    cpu_tasks_to_feed_towers: int | None
    rows_per_second: float
    bottleneck: str
    bottleneck_cause: str
    device: str  # cpu or gpu
    devices: float
    rows_per_second_per_device: float
    startup_seconds: dict  # each step before the first row, and their total
    wall_seconds: float
    device_hours: float
    output_bytes: dict  # --vector-dtype -> bytes
    table_bytes: dict  # --vector-dtype -> bytes
    vectors: dict  # vector column -> rows with a vector
    ann_index_bytes: int
    plan_seconds: float
    notes: tuple = ()  # what the run would settle that was not asked for (prepare.Run.notes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        """The plan as a short table for a person; `to_dict()` gives every figure."""
        cluster, workers, startup = self.cluster, self.workers, self.startup_seconds
        device = self.device.upper()
        holds = "both towers" if workers["towers_per_actor"] > 1 else "one tower"
        lines = [
            f"plan: {self.rows:,} rows (counted {_COUNTED_BY[self.rows_counted_by]}); "
            f"{self.sample_rows} rows spread over the manifest timed (towers on "
            f"{self.towers_timed_on}, {self.dtype}, batch {self.batch_size})",
            f"cluster: {cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs, {cluster['nodes']} node(s); the run "
            f"would start {workers['cpu_tasks']} decode/tokenize task(s) at a time and "
            f"{workers['tower_actors']} tower actor(s), each with {holds}",
            "",
            f"{'stage':<13}{'rows/s/worker':>15}{'workers':>9}{'rows/s':>10}",
        ]
        for name, stage in self.stages.items():
            lines.append(f"{name:<13}{stage['rows_per_second_per_worker']:>15.1f}{stage['workers']:>9}"
                         f"{stage['rows_per_second']:>10.1f}")
        cause = ("its workers are the slowest" if self.bottleneck_cause == "workers"
                 else "the towers and the CPU tasks take turns on the same cores, and it takes the most time")
        lines += [
            "",
            f"rate: {self.rows_per_second:.1f} rows/s ({self.rows_per_second_per_device:.2f} per "
            f"{device}); bottleneck: {self.bottleneck} ({cause})",
            f"wall: {_duration(self.wall_seconds)} at this cluster's size, with {startup['total']:.1f} s "
            f"of start-up (Ray {startup['ray']:.1f}, id scan {startup['id_scan']:.1f}, tower worker "
            f"{startup['tower_worker']:.1f}, model load {startup['model_load']:.1f}, manifest read "
            f"{startup['read_start']:.1f}, CPU task start {startup['cpu_task_start']:.1f}, first batch "
            f"{startup['first_batch']:.1f}); "
            f"{self.device_hours:.3g} {device}-hours on {self.devices:g} {device}s",
            f"output: {_bytes(self.output_bytes['float32'])} (with --vector-dtype float16: "
            f"{_bytes(self.output_bytes['float16'])}); table: {_bytes(self.table_bytes['float32'])} "
            f"({_bytes(self.table_bytes['float16'])}); ANN indexes: {_bytes(self.ann_index_bytes)}",
        ]
        feed = self.feed_line()
        if feed:
            lines.append(feed)
        if self.sample_errors:
            errors = ", ".join(f"{k} {v}" for k, v in self.sample_errors.items())
            lines.append(f"errors in the sample: {errors}")
        return "\n".join(lines)

    def feed_line(self) -> str | None:
        """On GPUs: whether this cluster runs CPU tasks enough to keep the towers busy."""
        feed, tasks = self.cpu_tasks_to_feed_towers, self.workers["cpu_tasks"]
        if not feed:
            return None
        per_gpu = feed / self.cluster["gpus"]
        verdict = ("enough" if tasks >= feed else
                   f"too few: the towers will wait for their rows; give each GPU {math.ceil(per_gpu)} "
                   "free CPUs, or decode faster with --preprocess fast")
        return (f"feed: {feed} decode/tokenize task(s) keep the towers busy ({per_gpu:.1f} CPUs "
                f"per GPU); this cluster runs {tasks} at a time: {verdict}")


_COUNTED_BY = {"parquet_metadata": "from the Parquet footers", "count_pass": "in a pass over the files"}


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_run(config: EmbedConfig, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> Estimate:
    """The plan of `altclip embed` with `config`: what the run would take, from `sample_rows`
    rows spread over the manifest, timed in a Ray task and a Ray actor placed as the run's own.
    Writes nothing (OUT is not even created) and does not start the run's Ray Data plan; loads
    the towers once, to time them."""
    if sample_rows < 1:
        raise ConfigError(f"{named('plan_rows')} {sample_rows}: must be at least 1")
    started = time.perf_counter()
    run = prepare_run(config, progress_bars=False, check_out=False)
    config = run.config
    manifest, model, placement, dtype = run.manifest, run.model, run.placement, run.dtype
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)

    counting = time.perf_counter()
    counts, counted_by = count_rows(manifest)
    rows = sum(counts)
    if rows == 0:
        raise ConfigError(f"manifest {config.manifest} has no rows: there is no run to plan")
    scan_seconds = _id_scan_seconds(manifest, counts, time.perf_counter() - counting)
    read_start_seconds = _read_start_seconds(manifest, config.batch_size)
    sample = read_sample(manifest, counts, spread_positions(rows, sample_rows))
    batches = [sample.slice(i, config.batch_size) for i in range(0, sample.num_rows, config.batch_size)]
    embedded, times, started_in, device = time_sample(batches, config, model, dtype, placement,
                                                       sample_policy(config, manifest))
    # On CPUs one actor holds both towers (towers.TowersEmbedder); on GPUs each has its own.
    one_tower_each = placement.on_gpu or len(config.towers) == 1
    actors = actors_per_tower(placement)  # one tower's
    tasks = cpu_task_workers(cpus, placement, len(config.towers))
    stages = timed_stages(times, one_tower_each, fetch_actors(cpus) * FETCH_CALLS, tasks, actors)
    startup = _startup(run, scan_seconds, read_start_seconds, started_in,
                       sum(min(config.batch_size, rows) / s.rows_per_second for s in stages))
    devices = gpus if placement.on_gpu else cpus
    projection = project(stages, rows, not placement.on_gpu, sum(startup.values()), devices)
    out, _ = pop_figures(pa.concat_tables(embedded, promote_options="default"))
    return Estimate(
        manifest=config.manifest,
        rows=rows,
        rows_counted_by=counted_by,
        sample_rows=sample.num_rows,
        sample_rows_through_towers=out.num_rows,
        sample_errors=dict(sorted(errors_by_kind(out).items())),
        model=model.label,
        dtype=dtype,
        towers=list(config.towers),
        batch_size=config.batch_size,
        cluster={"cpus": cpus, "gpus": gpus, "nodes": sum(1 for n in ray.nodes() if n["Alive"])},
        workers={"cpu_tasks": tasks,
                 "tower_actors": actors * (len(config.towers) if one_tower_each else 1),
                 "towers_per_actor": 1 if one_tower_each else len(config.towers),
                 "torch_threads": placement.torch_threads, "num_gpus_per_actor": placement.num_gpus},
        towers_timed_on=device,
        **_projected(stages, projection, placement.on_gpu, devices, startup),
        **_output_sizes(out, rows, config, manifest, model, dtype),
        plan_seconds=round(time.perf_counter() - started, 1),
        notes=run.notes,
    )
