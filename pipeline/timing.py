"""Per-stage busy time, placement and timeline, carried from each stage to the writer as hidden columns."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STAGE_SECONDS_PREFIX = "__seconds_"
STAGE_NODE_PREFIX = "__node_"
STAGE_AT_PREFIX = "__at_"  # when the stage finished the batch (Unix seconds)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


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
    return _set(table, STAGE_NODE_PREFIX + stage, pa.array([_node_id()] * table.num_rows, pa.string()))


def pop_stage_seconds(table: pa.Table) -> tuple[pa.Table, dict[str, float], dict[str, list[str]],
                                                 dict[str, list[list[float]]]]:
    """Split the hidden columns off: (table without them, busy seconds per stage, nodes per
    stage, [finished at, rows] per stage and batch)."""
    seconds, nodes, timeline = {}, {}, {}
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
    return table, seconds, nodes, timeline
