"""Per-stage busy time, placement and timeline, carried from each stage to the writer as hidden columns."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import INTERNAL_PREFIX

STAGE_SECONDS_PREFIX = INTERNAL_PREFIX + "seconds_"
STAGE_NODE_PREFIX = INTERNAL_PREFIX + "node_"
STAGE_AT_PREFIX = INTERNAL_PREFIX + "at_"  # when the stage finished the batch (Unix seconds)
STAGE_WORKER_PREFIX = INTERNAL_PREFIX + "worker_"  # the actor that ran the batch ("" for tasks)
STAGE_DEVICE_PREFIX = INTERNAL_PREFIX + "device_"  # JSON: what the actor's accelerator reported
STAGE_COUNT_PREFIX = INTERNAL_PREFIX + "count_"  # a batch's count of something (first row), summed


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _actor_id() -> str:
    import ray

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_actor_id() or ""


def _set(table: pa.Table, column: str, values: pa.Array) -> pa.Table:
    if column in table.column_names:
        return table.set_column(table.column_names.index(column), column, values)
    return table.append_column(column, values)


def add_stage_seconds(table: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread a batch's busy time over its rows and note the node that did it; the writer sums
    the times, collects the nodes and drops both columns."""
    share = seconds / max(1, table.num_rows)
    table = _set(table, STAGE_SECONDS_PREFIX + stage,
                 pa.array(np.full(table.num_rows, share), pa.float64()))
    table = _set(table, STAGE_AT_PREFIX + stage, pa.array(np.full(table.num_rows, time.time()), pa.float64()))
    table = _set(table, STAGE_WORKER_PREFIX + stage, pa.array([_actor_id()] * table.num_rows, pa.string()))
    return _set(table, STAGE_NODE_PREFIX + stage, pa.array([_node_id()] * table.num_rows, pa.string()))


def add_device_stats(table: pa.Table, stage: str, stats: dict) -> pa.Table:
    """Note what the stage's accelerator reported (memory, utilisation) on every row."""
    return _set(table, STAGE_DEVICE_PREFIX + stage, pa.array([json.dumps(stats)] * table.num_rows))


def add_stage_count(table: pa.Table, name: str, count: int) -> pa.Table:
    """Note a count for the batch (e.g. images whose vector was reused); the writer sums them."""
    values = np.zeros(table.num_rows, dtype=np.int64)
    if table.num_rows:
        values[0] = count
    return _set(table, STAGE_COUNT_PREFIX + name, pa.array(values))


def stage_seconds(table: pa.Table) -> dict[str, float]:
    """Busy seconds per stage the rows of `table` carry so far."""
    return {name[len(STAGE_SECONDS_PREFIX):]: float(np.nansum(table.column(name).to_numpy(zero_copy_only=False)))
            for name in table.column_names if name.startswith(STAGE_SECONDS_PREFIX)}


def device_stats(table: pa.Table) -> dict[str, dict[str, dict]]:
    """{stage: {actor: the latest stats its accelerator reported}} from the rows of `table`."""
    devices = {}
    for name in table.column_names:
        if name.startswith(STAGE_DEVICE_PREFIX):
            stage = name[len(STAGE_DEVICE_PREFIX):]
            actors = table.column(STAGE_WORKER_PREFIX + stage).to_pylist()
            for actor, stats in zip(actors, table.column(name).to_pylist()):
                if actor and stats:
                    devices.setdefault(stage, {})[actor] = json.loads(stats)
    return devices


def pop_stage_seconds(table: pa.Table) -> tuple[pa.Table, dict]:
    """Split the hidden columns off: the table without them, and the figures they carried:
    `seconds` (busy, per stage), `nodes` (per stage), `timeline` ([finished at, rows] per stage
    and batch), `workers` ({actor: [rows, busy seconds]} per stage), `devices` (see device_stats),
    `counts` (see add_stage_count)."""
    seconds, nodes, timeline, workers = stage_seconds(table), {}, {}, {}
    batch_counts = {name[len(STAGE_COUNT_PREFIX):]: int(pc.sum(table.column(name)).as_py() or 0)
                    for name in table.column_names if name.startswith(STAGE_COUNT_PREFIX)}
    devices = device_stats(table)
    for name in table.column_names:
        if name.startswith(STAGE_WORKER_PREFIX):
            stage = name[len(STAGE_WORKER_PREFIX):]
            busy = table.column(STAGE_SECONDS_PREFIX + stage).to_pylist()
            per_actor = {}
            for actor, share in zip(table.column(name).to_pylist(), busy):
                if actor:
                    entry = per_actor.setdefault(actor, [0, 0.0])
                    entry[0] += 1
                    entry[1] += share or 0.0
            if per_actor:
                workers[stage] = per_actor
    for name in list(table.column_names):
        if name.startswith(STAGE_NODE_PREFIX):
            nodes[name[len(STAGE_NODE_PREFIX):]] = sorted(set(table.column(name).drop_null().to_pylist()))
        elif name.startswith(STAGE_AT_PREFIX):
            counts = pc.value_counts(table.column(name).drop_null())
            timeline[name[len(STAGE_AT_PREFIX):]] = sorted(
                [float(c["values"]), int(c["counts"])] for c in counts.to_pylist())
    hidden = (STAGE_SECONDS_PREFIX, STAGE_NODE_PREFIX, STAGE_AT_PREFIX, STAGE_WORKER_PREFIX,
              STAGE_DEVICE_PREFIX, STAGE_COUNT_PREFIX)
    table = table.drop_columns([n for n in table.column_names if n.startswith(hidden)])
    return table, {"seconds": seconds, "nodes": nodes, "timeline": timeline, "workers": workers,
                   "devices": devices, "counts": batch_counts}
