"""Per-stage busy time, placement and timeline, carried from each stage to the writer as hidden columns."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STAGE_SECONDS_PREFIX = "__seconds_"
STAGE_NODE_PREFIX = "__node_"
STAGE_AT_PREFIX = "__at_"  # when the stage finished the batch (Unix seconds)
STAGE_WORKER_PREFIX = "__worker_"  # the actor that ran the batch ("" for tasks)


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


def pop_stage_seconds(table: pa.Table) -> tuple[pa.Table, dict[str, float], dict[str, list[str]],
                                                 dict[str, list[list[float]]], dict[str, dict]]:
    """Split the hidden columns off: (table without them, busy seconds per stage, nodes per
    stage, [finished at, rows] per stage and batch, {actor: [rows, busy seconds]} per stage)."""
    seconds, nodes, timeline, workers = {}, {}, {}, {}
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
        if name.startswith(STAGE_SECONDS_PREFIX):
            seconds[name[len(STAGE_SECONDS_PREFIX):]] = float(
                np.nansum(table.column(name).to_numpy(zero_copy_only=False)))
        elif name.startswith(STAGE_NODE_PREFIX):
            nodes[name[len(STAGE_NODE_PREFIX):]] = sorted(set(table.column(name).drop_null().to_pylist()))
        elif name.startswith(STAGE_AT_PREFIX):
            counts = pc.value_counts(table.column(name).drop_null())
            timeline[name[len(STAGE_AT_PREFIX):]] = sorted(
                [float(c["values"]), int(c["counts"])] for c in counts.to_pylist())
        else:
            continue
        table = table.drop_columns([name])
    table = table.drop_columns([n for n in table.column_names if n.startswith(STAGE_WORKER_PREFIX)])
    return table, seconds, nodes, timeline, workers
