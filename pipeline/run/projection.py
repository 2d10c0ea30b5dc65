"""A run projected from its stages' measured rates: rate, bottleneck, wall time, device-hours,
the CPU tasks that feed the towers, and the bytes of outputs and indexes. Pure arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.run.stages import (
    FETCH_CPUS,
    READ_CPUS,
    Placement,
    cpu_task_cpus,
    fetch_actors,
    tower_actor_count,
)
from schemas.table import ANN_INDEX_MIN_ROWS

# The ANN index (pipeline/table/indexes.py `index_table`: IVF_HNSW_SQ per vector column from
# ANN_INDEX_MIN_ROWS vectors on) holds per vector one byte per dimension (8-bit scalar
# quantisation, whatever --vector-dtype is) and this much more: its HNSW links, row id and
# partition bookkeeping. Measured with lance 14 on 10,000 and 20,000 unit vectors of 64 and
# 768 dimensions: 196 bytes each time.
ANN_INDEX_BYTES_PER_VECTOR = 196


@dataclass(frozen=True)
class Stage:
    """A stage as the projection sees it."""

    name: str
    rows_per_second: float  # one worker's rate, as measured
    group: str  # the stages of a group run one after the other in each of the group's workers
    workers: int  # how many the run's plan starts for the group on this cluster


@dataclass(frozen=True)
class Projection:
    rows_per_second: float
    bottleneck: str  # the stage that holds the run back
    bottleneck_cause: str  # "workers": its group's workers are the slowest; "shared_cores": see project
    wall_seconds: float
    device_hours: float


def project(stages: list[Stage], rows: int, shared_cores: bool, startup_seconds: float,
            devices: float) -> Projection:
    """The run's rate, bottleneck, wall time and device-hours, from each stage's rate.

    A group's workers each take a batch through the group's stages in turn (a CPU task fetches,
    decodes and tokenizes it; a CPU actor runs the image tower, then the text tower), so a group
    does workers / (sum of its stages' seconds per row) rows/s. With the towers on accelerators
    the groups work side by side, streaming, and the slowest group sets the pace.

    With `shared_cores` (the towers on the CPUs), the groups take turns instead: the tower actor
    runs its torch threads on every core the decoding tasks use, and a forward pass goes at the
    pace of its slowest thread, so while it runs it has the machine, and while it waits the
    decoding has it. Seconds per row then add up over the groups, as times. Checked against
    real runs on 2 cores (bench/plan_check.py, web-sized JPEGs): the tiny towers at 528 rows/s
    and decoding at 87 add up to 72 rows/s, where the run of 2,000 rows went at 77 to 80 after
    its start-up and the slowest group alone would say 84; the full-size towers at 3.3 rows/s
    and decoding at 76 add up to 3.1, where the run of 64 rows went at 2.7.
    """
    groups: dict[str, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    group_rates = {name: members[0].workers / sum(1 / s.rows_per_second for s in members)
                   for name, members in groups.items()}
    # Each stage's seconds per row once its workers share the rows: what it adds to the whole.
    share = {s.name: 1 / (s.rows_per_second * s.workers) for s in stages}
    if shared_cores:
        rate, cause = 1 / sum(1 / r for r in group_rates.values()), "shared_cores"
        bottleneck = max(share, key=share.get)
    else:
        slowest = min(group_rates, key=group_rates.get)
        rate, cause = group_rates[slowest], "workers"
        bottleneck = min(groups[slowest], key=lambda s: s.rows_per_second).name
    wall = startup_seconds + rows / rate
    return Projection(rate, bottleneck, cause, wall, wall * devices / 3600)


def cpu_tasks_to_feed(stages: list[Stage]) -> int | None:
    """How many decode/tokenize tasks keep the towers' actors busy: the towers' rate (the
    slower tower group's, every actor counted) over one CPU task's rate. None without CPU stages
    or towers timed. On GPUs the run starts a task on every CPU the actors leave free, so a
    cluster with fewer CPUs than this has idle accelerators; more CPUs per GPU than this buy
    nothing (see `--plan`'s "feed" line)."""
    groups: dict[str, list[Stage]] = {}
    for stage in stages:
        groups.setdefault(stage.group, []).append(stage)
    tasks = groups.pop("cpu_tasks", None)
    if not tasks or not groups:
        return None
    per_task = 1 / sum(1 / s.rows_per_second for s in tasks)
    towers = min(members[0].workers / sum(1 / s.rows_per_second for s in members) for members in groups.values())
    return math.ceil(towers / per_task)


def cpu_task_workers(cpus: float, placement: Placement, towers: int) -> int:
    """How many decode/tokenize tasks run at once: each reserves plan.cpu_task_cpus, out of what
    the tower actors, the fetch actors and a manifest read (READ_CPUS) leave."""
    light = tower_actor_count(placement, towers) * placement.num_cpus + fetch_actors(cpus) * FETCH_CPUS
    return max(1, math.floor((cpus - light - READ_CPUS) / cpu_task_cpus(cpus, placement, towers) + 1e-9))


def output_bytes(rows: int, bytes_per_row: float, bytes_per_shard: float, rows_per_shard: int) -> int:
    """Bytes of the Parquet shards: each row's share, and each shard's own (schema, footer)."""
    return round(rows * bytes_per_row + math.ceil(rows / rows_per_shard) * bytes_per_shard)


def index_bytes(vectors: dict[str, int], dim: int) -> int:
    """Bytes of the ANN indexes `index_table` builds: a column with ANN_INDEX_MIN_ROWS vectors or
    more gets one of vectors x (dim + ANN_INDEX_BYTES_PER_VECTOR) bytes."""
    return sum(n * (dim + ANN_INDEX_BYTES_PER_VECTOR) for n in vectors.values() if n >= ANN_INDEX_MIN_ROWS)
