"""The stages of an embed run timed on a sample of its manifest, where the run would run them:
fetch, decode and tokenize in a Ray task reserving what the run's tasks reserve, the towers in
a Ray actor placed as the run's own. The figures `embed --plan` projects the run from."""

from __future__ import annotations

import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import ray

from pipeline.config import TOWERS, ConfigError, EmbedConfig, named
from pipeline.decode.images import preprocess_images
from pipeline.decode.text import tokenize_captions
from pipeline.embed.model import pick_device
from pipeline.embed.towers import ImageEmbedder, TextEmbedder
from pipeline.read.manifest import Manifest
from pipeline.run.projection import Stage
from pipeline.run.stages import ACTOR_START_TIMEOUT_S, Placement, fetch_policy
from pipeline.timing import stage_records

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



def time_sample(batches: list[pa.Table], config: EmbedConfig, model, dtype: str, placement: Placement,
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



def sample_policy(config: EmbedConfig, manifest: Manifest):
    policy = fetch_policy(config)
    if manifest.format == "webdataset":
        # The sample's images are members of the manifest's own shards, named by the plan.
        policy = dataclasses.replace(policy, allow_local_paths=True)
    return policy



def timed_stages(times: dict, one_tower_each: bool, fetchers: int, tasks: int, actors: int) -> list[Stage]:
    """The timed stages, each in its group of workers as the run would start them."""
    return [Stage(name, rows_per_second(times[name]),
                  "fetch" if name == "fetch" else "cpu_tasks" if name in CPU_STAGES
                  else name if one_tower_each else "towers",
                  fetchers if name == "fetch" else tasks if name in CPU_STAGES else actors)
            for name in STAGES if times.get(name)]
