"""Project an embed run before it starts (`embed --plan`): each stage timed on a sample of the
manifest where the run would run it, then rows, bottleneck, wall time, device-hours and bytes
for the whole manifest at the cluster's size. Nothing is written, and of the run's Ray Data plan
only the manifest read starts, for one row, to time it."""

from __future__ import annotations

import dataclasses
import io
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import TOWERS, ConfigError, EmbedConfig, named
from pipeline.decode.images import preprocess_images
from pipeline.decode.text import tokenize_captions
from pipeline.embed.model import pick_device
from pipeline.embed.provenance import provenance
from pipeline.embed.towers import ImageEmbedder, TextEmbedder
from pipeline.read.manifest import Manifest
from pipeline.read.sample import count_rows, read_sample, spread_positions
from pipeline.run.prepare import Run, prepare_run
from pipeline.run.projection import Stage, cpu_task_workers, cpu_tasks_to_feed, index_bytes, output_bytes, project
from pipeline.run.stages import (
    ACTOR_START_TIMEOUT_S,
    FETCH_CALLS,
    Placement,
    actors_per_tower,
    fetch_actors,
    fetch_policy,
    manifest_rows,
)
from pipeline.timing import pop_figures, stage_records
from pipeline.write.shards import conform, errors_by_kind
from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema

# Rows timed by default. Stage costs vary with the rows (a web photo's decode time spans a
# factor of ten with its size): over 200 rows the mean's standard error is about 6% for a
# spread of 0.8 times the mean, a small part of the 25% the projection is held to; 200 rows
# are four batches of 64 through each tower, and a few seconds of decoding on one core.
DEFAULT_SAMPLE_ROWS = 200
# The towers are timed on whole batches until this many seconds are spent (one batch at
# least): the full-size towers on a CPU take a minute a batch, and more batches change little.
TOWER_BUDGET_S = 60.0
# Passes over the sample shorter than this are repeated (up to TOWER_MAX_PASSES): the tiny towers
# go through 200 rows in under a second, a window in which another process on a 2-core machine
# can halve or double their rate (torch's threads wait for each other, and for the cores).
TOWER_MIN_S = 5.0
TOWER_MAX_PASSES = 10
CPU_STAGES = ("decode", "tokenize")  # run in turn in each of the run's CPU tasks
# Fetching is its own stage (plan.ImageFetcher): each of its actors' calls a worker.
STAGES = ("fetch", *CPU_STAGES, "image_tower", "text_tower")


# --- timing the stages on the sample -------------------------------------------------------


def rows_per_second(batches: list[tuple[int, float]]) -> float:
    """One worker's rate from its (rows, seconds) on each batch: rows over the median seconds per
    row. Other work on the machine (another process holding the cores a while) slows some
    batches many times over (the tiny text tower: 0.02 to 3 s a batch at a load of 9 on 2
    cores); the median keeps them from deciding the rate."""
    return 1 / max(statistics.median(seconds / rows for rows, seconds in batches if rows), 1e-9)


def _timed(function, *args):
    started = time.perf_counter()
    return function(*args), time.perf_counter() - started


def time_inputs(batches: list[pa.Table], config: EmbedConfig, model,
                policy) -> tuple[list[pa.Table], dict, dict]:
    """Fetch, decode and tokenize each batch, one after the other, as each of the run's CPU
    tasks does (run as a Ray task reserving what theirs reserve); returns the batches ready for
    the towers, (rows, seconds) per batch of each stage, and the seconds of the first call's
    one-off work and of the whole task."""
    started = time.perf_counter()
    image, text = "image" in config.towers, "text" in config.towers
    # Once per worker, not per row: the decoding child process starts, the tokenizer loads.
    if image:
        preprocess_images(batches[0].slice(0, 1), model.preprocessing, policy, config.preprocess,
                          decode_timeout_s=config.decode_timeout_s)
    if text:
        tokenize_captions(batches[0].slice(0, 1), model)
    first_call = time.perf_counter() - started
    ready, times = [], {stage: [] for stage in ("fetch", *CPU_STAGES)}
    for batch in batches:
        if image:
            batch = preprocess_images(batch, model.preprocessing, policy, config.preprocess,
                                      decode_timeout_s=config.decode_timeout_s)
            spent = {r["stage"]: r["seconds"] for r in stage_records(batch)}
            times["fetch"].append((batch.num_rows, spent["fetch"]))
            times["decode"].append((batch.num_rows, spent["decode"]))
        if text:
            batch, seconds = _timed(tokenize_captions, batch, model)
            times["tokenize"].append((batch.num_rows, seconds))
        ready.append(batch)
    return ready, times, {"first_call": first_call, "whole": time.perf_counter() - started}


class TowerTimer:
    """The towers as the run's actors hold them (the same classes, dtype, device and torch
    threads), started as a Ray actor placed as the run places its own, so it runs where and
    as they run: on a node with a GPU, with the worker environment Ray gives them."""

    def __init__(self, model, dtype: str, towers: tuple[str, ...], threads: int):
        started = time.perf_counter()
        self.towers = [(kind, {"image": ImageEmbedder, "text": TextEmbedder}[kind](model, dtype, threads))
                       for kind in TOWERS if kind in towers]
        self.load_seconds = time.perf_counter() - started

    def loaded(self) -> tuple[float, str]:
        """Seconds loading the weights took, and the device the towers run on."""
        return self.load_seconds, pick_device().type

    def time(self, batches: list[pa.Table]) -> tuple[list[pa.Table], dict]:
        """Each tower on whole batches; returns the batches embedded and (rows, seconds) per
        batch of each tower.

        Run in a thread of its own, as Ray Data calls a map actor's function (not from the
        actor's main thread, where __init__ ran): from the main thread the tiny towers ran at a
        tenth of the rate under load (text tower 130 against 2,200 rows/s, alternating runs
        at a load of 5 on 2 cores), as they never do inside a run."""
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(self._time, batches).result()

    def _time(self, batches: list[pa.Table]) -> tuple[list[pa.Table], dict]:
        """Passes over the sample, each tower on each batch in turn, while they add up to less
        than TOWER_MIN_S (up to TOWER_MAX_PASSES); none starts once TOWER_BUDGET_S is spent (one
        batch at least). The first pass pays one-off set-up per input shape (torch's kernels
        for each caption length), which a run spreads over thousands of batches: its times count
        only when no other pass fits."""
        passes, spent, embedded = [], 0.0, []
        while len(passes) < TOWER_MAX_PASSES and spent < (TOWER_MIN_S if passes else TOWER_BUDGET_S):
            times = {f"{kind}_tower": [] for kind, _ in self.towers}
            for kind, tower in self.towers:
                if kind == "image":
                    tower.recent.clear()  # every pass embeds the images again, none is reused
            for n, batch in enumerate(batches):
                if n and spent >= TOWER_BUDGET_S:
                    break
                for kind, tower in self.towers:
                    batch, seconds = _timed(tower, batch)
                    times[f"{kind}_tower"].append((batch.num_rows, seconds))
                    spent += seconds
                if not passes:
                    embedded.append(batch)
            passes.append(times)
        timed = passes[1:] or passes
        return embedded, {stage: [t for p in timed for t in p[stage]] for stage in passes[0]}


# --- the plan ------------------------------------------------------------------------------


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


def _time_sample(batches: list[pa.Table], config: EmbedConfig, model, dtype: str, placement: Placement,
                 policy) -> tuple[list[pa.Table], dict, dict, str]:
    """The sample through the stages, on the cluster as the run would place them: fetch, decode
    and tokenize in a Ray task reserving a CPU, as the run's tasks do; then the towers in a Ray
    actor with the run's actors' resources. Returns the batches embedded, (rows, seconds) per
    batch of each stage, how long the task and the actor took to start (a worker, its imports;
    the actor's weights apart), and the device the towers ran on."""
    submitted = time.perf_counter()
    inputs = ray.remote(time_inputs).options(num_cpus=1)
    ready, times, inside = ray.get(inputs.remote(batches, config, model, policy))
    # The task's time outside its function (placing it, a worker starting and importing the
    # stages' code, moving its batches) and its first call (the decoding process starting, the
    # tokenizer loading): what the run's first CPU task pays before its first batch.
    task_start = time.perf_counter() - submitted - inside["whole"] + inside["first_call"]
    starting = time.perf_counter()
    timer = ray.remote(TowerTimer).options(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus).remote(
        model, dtype, config.towers, placement.torch_threads)
    try:
        try:
            load_seconds, device = ray.get(timer.loaded.remote(), timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"no tower actor could start in {ACTOR_START_TIMEOUT_S} s (it asks "
                              f"{placement.num_gpus:g} GPUs, {placement.num_cpus:g} CPUs): check "
                              f"{named('num_gpus')} and the cluster's free resources") from None
        actor_start = time.perf_counter() - starting
        embedded, tower_times = ray.get(timer.time.remote(ready))
    finally:
        ray.kill(timer)
    started_in = {"worker": actor_start - load_seconds, "model_load": load_seconds, "cpu_task": task_start}
    return embedded, {**times, **tower_times}, started_in, device


def _sample_policy(config: EmbedConfig, manifest: Manifest):
    policy = fetch_policy(config)
    if manifest.format == "webdataset":
        # The sample's images are members of the manifest's own shards, named by the plan.
        policy = dataclasses.replace(policy, allow_local_paths=True)
    return policy


def _stages(times: dict, one_tower_each: bool, fetchers: int, tasks: int, actors: int) -> list[Stage]:
    """The timed stages, each in its group of workers as the run would start them."""
    return [Stage(name, rows_per_second(times[name]),
                  "fetch" if name == "fetch" else "cpu_tasks" if name in CPU_STAGES
                  else name if one_tower_each else "towers",
                  fetchers if name == "fetch" else tasks if name in CPU_STAGES else actors)
            for name in STAGES if times.get(name)]


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
        # The CPU tasks that would keep the towers fed: beside workers.cpu_tasks, it says whether
        # this cluster has CPUs enough per accelerator (on CPUs the two share the cores instead).
        "cpu_tasks_to_feed_towers": cpu_tasks_to_feed(stages) if on_gpu else None,
        "rows_per_second": round(projection.rows_per_second, 2),
        "bottleneck": projection.bottleneck,
        "bottleneck_cause": projection.bottleneck_cause,
        "device": "gpu" if on_gpu else "cpu",
        "devices": devices,
        "rows_per_second_per_device": round(projection.rows_per_second / devices, 3),
        "startup_seconds": {**{k: round(v, 2) for k, v in startup.items()},
                            "total": round(sum(startup.values()), 2)},
        "wall_seconds": round(projection.wall_seconds, 1),
        "device_hours": float(f"{projection.device_hours:.4g}"),
    }


def estimate_run(config: EmbedConfig, sample_rows: int = DEFAULT_SAMPLE_ROWS) -> dict:
    """The plan of `altclip embed` with `config`: what the run would take, from `sample_rows`
    rows spread over the manifest, timed in a Ray task and a Ray actor placed as the run's own.
    Writes nothing (OUT is not even created) and does not start the run's Ray Data plan; loads
    the towers once, to time them."""
    if sample_rows < 1:
        raise ConfigError(f"{named('plan_rows')} {sample_rows}: must be at least 1")
    started = time.perf_counter()
    run = prepare_run(config, progress_bars=False, check_out=False)
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
    embedded, times, started_in, device = _time_sample(batches, config, model, dtype, placement,
                                                       _sample_policy(config, manifest))
    # On CPUs one actor holds both towers (towers.TowersEmbedder); on GPUs each has its own.
    one_tower_each = placement.on_gpu or len(config.towers) == 1
    actors = actors_per_tower(placement)  # one tower's
    tasks = cpu_task_workers(cpus, placement, len(config.towers))
    stages = _stages(times, one_tower_each, fetch_actors(cpus) * FETCH_CALLS, tasks, actors)
    startup = _startup(run, scan_seconds, read_start_seconds, started_in,
                       sum(min(config.batch_size, rows) / s.rows_per_second for s in stages))
    devices = gpus if placement.on_gpu else cpus
    projection = project(stages, rows, not placement.on_gpu, sum(startup.values()), devices)
    out, _ = pop_figures(pa.concat_tables(embedded, promote_options="default"))
    return {
        "manifest": config.manifest,
        "rows": rows,
        "rows_counted_by": counted_by,
        "sample_rows": sample.num_rows,
        "sample_rows_through_towers": out.num_rows,
        "sample_errors": dict(sorted(errors_by_kind(out).items())),
        "model": model.label,
        "dtype": dtype,
        "towers": list(config.towers),
        "batch_size": config.batch_size,
        "cluster": {"cpus": cpus, "gpus": gpus, "nodes": sum(1 for n in ray.nodes() if n["Alive"])},
        "workers": {"cpu_tasks": tasks,
                    "tower_actors": actors * (len(config.towers) if one_tower_each else 1),
                    "towers_per_actor": 1 if one_tower_each else len(config.towers),
                    "torch_threads": placement.torch_threads, "num_gpus_per_actor": placement.num_gpus},
        "towers_timed_on": device,
        **_projected(stages, projection, placement.on_gpu, devices, startup),
        **_output_sizes(out, rows, config, manifest, model, dtype),
        "plan_seconds": round(time.perf_counter() - started, 1),
    }
