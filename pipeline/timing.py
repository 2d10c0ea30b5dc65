"""Per-stage busy time, carried from each stage to the writer as hidden per-row columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

STAGE_SECONDS_PREFIX = "__seconds_"


def add_stage_seconds(table: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread a batch's busy time over its rows; the writer sums the column and drops it."""
    share = seconds / max(1, table.num_rows)
    column = STAGE_SECONDS_PREFIX + stage
    values = pa.array(np.full(table.num_rows, share), pa.float64())
    if column in table.column_names:
        return table.set_column(table.column_names.index(column), column, values)
    return table.append_column(column, values)


def pop_stage_seconds(table: pa.Table) -> tuple[pa.Table, dict[str, float]]:
    """Split the hidden timing columns off a table: (table without them, seconds per stage)."""
    seconds = {}
    for name in [n for n in table.column_names if n.startswith(STAGE_SECONDS_PREFIX)]:
        seconds[name[len(STAGE_SECONDS_PREFIX):]] = float(
            np.nansum(table.column(name).to_numpy(zero_copy_only=False))
        )
        table = table.drop_columns([name])
    return table, seconds
