"""Per-batch records of each stage's work (busy time, where, when), carried to the writer beside
the rows: one small record per stage and batch, not a column per row."""

from __future__ import annotations

import collections
import json
import time

import pyarrow as pa

from schemas.manifest import INTERNAL_PREFIX

# One string column: null on every row but the first of a batch, which holds the JSON list of
# the records the stages so far made for that batch. Ray may split and join blocks between
# stages; a record stays on its row, and whoever reads them collects every non-null value.
FIGURES = INTERNAL_PREFIX + "figures"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _actor_id() -> str:
    import ray

    if not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_actor_id() or ""


def add_stage_record(table: pa.Table, stage: str, seconds: float, **extra) -> pa.Table:
    """Note that `stage` spent `seconds` on this batch: with the rows, the node, the actor (""
    for tasks), the time it finished, and `extra` (`device`: what the accelerator reported;
    `counts`: counts of things, summed over batches)."""
    if not table.num_rows:
        return table
    record = {"stage": stage, "seconds": seconds, "rows": table.num_rows, "at": time.time(),
              "worker": _actor_id(), "node": _node_id(), **extra}
    if FIGURES in table.column_names:
        values = table.column(FIGURES).to_pylist()
        values[0] = json.dumps(json.loads(values[0]) + [record]) if values[0] else json.dumps([record])
        return table.set_column(table.column_names.index(FIGURES), FIGURES, pa.array(values, pa.string()))
    values = [json.dumps([record])] + [None] * (table.num_rows - 1)
    return table.append_column(FIGURES, pa.array(values, pa.string()))


def stage_records(table: pa.Table) -> list[dict]:
    """Every record the rows of `table` carry."""
    if FIGURES not in table.column_names:
        return []
    return [r for value in table.column(FIGURES).drop_null().to_pylist() for r in json.loads(value)]


def summarize_records(records: list[dict]) -> dict:
    """The figures records add up to: `seconds` (busy, per stage), `nodes` (per stage),
    `timeline` ([finished at, rows] per stage and batch), `workers` ({actor: [rows, busy
    seconds]} per stage), `devices` ({stage: {actor: latest report}}), `counts` (summed)."""
    return merge_figures([{
        "seconds": {r["stage"]: r["seconds"]}, "nodes": {r["stage"]: [r["node"]]},
        "timeline": {r["stage"]: [[r["at"], r["rows"]]]},
        "workers": {r["stage"]: {r["worker"]: [r["rows"], r["seconds"]]}} if r["worker"] else {},
        "devices": {r["stage"]: {r["worker"]: r["device"]}} if r["worker"] and r.get("device") else {},
        "counts": r.get("counts") or {},
    } for r in sorted(records, key=lambda r: r["at"])])


def merge_figures(parts: list[dict]) -> dict:
    """Figures of several batches or shards (see summarize_records) as one."""
    seconds = collections.Counter()
    nodes = collections.defaultdict(set)
    timeline = collections.defaultdict(list)
    workers = collections.defaultdict(dict)
    devices = collections.defaultdict(dict)
    counts = collections.Counter()
    for part in parts:
        seconds.update(part["seconds"])
        counts.update(part["counts"])
        for stage, stage_nodes in part["nodes"].items():
            nodes[stage].update(stage_nodes)
        for stage, points in part["timeline"].items():
            timeline[stage].extend(points)
        for stage, per_actor in part["workers"].items():
            for actor, (rows, busy) in per_actor.items():
                entry = workers[stage].setdefault(actor, [0, 0.0])
                entry[0] += rows
                entry[1] += busy
        for stage, per_actor in part["devices"].items():
            devices[stage].update(per_actor)
    return {"seconds": dict(seconds), "nodes": {k: sorted(v) for k, v in nodes.items()},
            "timeline": {k: sorted(v) for k, v in timeline.items()}, "workers": dict(workers),
            "devices": dict(devices), "counts": dict(counts)}


def pop_figures(table: pa.Table) -> tuple[pa.Table, dict]:
    """Split the records off: the table without them, and what they add up to."""
    figures = summarize_records(stage_records(table))
    if FIGURES in table.column_names:
        table = table.drop_columns([FIGURES])
    return table, figures
