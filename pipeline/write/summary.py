"""The run's summary: counts over the whole output that add up to the rows in, and this run's
work per stage, written beside the shards as summary.json."""

from __future__ import annotations

import collections
import json

from pipeline import storage
from pipeline.timing import merge_figures

SUMMARY_NAME = "summary.json"


def _bucketed(timeline: dict[str, list], start: float | None, buckets: int = 60) -> dict[str, list[list[float]]]:
    """Rows each stage finished per time bucket, as [seconds since `start` (the run's; None: the
    first row's), rows]."""
    points = [p for stage in timeline.values() for p in stage]
    if not points:
        return {}
    start = min(p[0] for p in points) if start is None else min(start, *(p[0] for p in points))
    width = max((max(p[0] for p in points) - start) / buckets, 1e-6)
    result = {}
    for stage, stage_points in sorted(timeline.items()):
        counts = collections.Counter()
        for at, rows in stage_points:
            counts[min(buckets - 1, int((at - start) / width))] += rows
        result[stage] = [[round((b + 1) * width, 3), counts[b]] for b in range(buckets) if counts[b]]
    return result


def summarize(shards: list[dict], totals: dict, scan, rows_done_before: int, seconds_total: float,
              provenance: dict, started_at: float | None = None) -> dict:
    """The run's summary: counts over the whole output that add up to the rows in, plus this
    run's work (rows embedded, busy seconds per stage, rows/s, and how long after `started_at`
    (Unix seconds) the first batch came out of a tower)."""
    figures = merge_figures(shards)
    stage_seconds, timeline, actors = figures["seconds"], figures["timeline"], figures["workers"]
    devices = collections.defaultdict(dict, figures["devices"])
    towers = [at for stage in ("image_tower", "text_tower") for at, _ in timeline.get(stage, [])]
    rows_embedded = sum(s["rows"] for s in shards)
    return {
        "rows_in": scan.rows,
        "rows_out": totals["rows"],
        "rows_rejected": {"missing_id": scan.missing_ids, "duplicate_id": scan.duplicate_rows},
        "duplicate_id_examples": scan.duplicated_ids.to_pylist()[:10],
        "image_ok": totals["image_ok"],
        "text_ok": totals["text_ok"],
        "errors_by_kind": totals["errors"],
        "error_examples": dict(sorted(totals["error_examples"].items())),  # ids, a few per kind
        "rows_already_done": rows_done_before,
        "rows_embedded": rows_embedded,
        "seconds_total": round(seconds_total, 3),
        "stage_busy_seconds": {k: round(v, 3) for k, v in sorted(stage_seconds.items())},
        # Rows per busy second of each stage (summed over its workers), and the stage with the
        # most busy time: the one to give more resources.
        "stage_rows_per_busy_second": {k: round(rows_embedded / v, 2) for k, v in
                                       sorted(stage_seconds.items()) if v > 0},
        "bottleneck": max(stage_seconds, key=stage_seconds.get) if stage_seconds else None,
        # Per tower actor: rows (images or captions), rows per busy second, and what its
        # accelerator reported last (memory, utilisation; nothing on a CPU).
        "tower_actors": {stage: [{"actor": actor[:16], "rows": rows,
                                  "rows_per_busy_second": round(rows / busy, 2) if busy else None,
                                  **({"device": devices[stage][actor]} if devices[stage].get(actor) else {})}
                                 for actor, (rows, busy) in sorted(per_actor.items())]
                         for stage, per_actor in sorted(actors.items())},
        "rows_per_second": round(rows_embedded / seconds_total, 2) if seconds_total else None,
        # Start-up as a user waits it: imports are before the clock; Ray, the manifest scan,
        # model loading and the first batch's decode are in it.
        "seconds_to_first_row": round(min(towers) - started_at, 2) if towers and started_at else None,
        # Image rows whose vector an actor had already made for the same bytes (not embedded again).
        "images_reused": figures["counts"].get("images_reused", 0),
        # Images embedded by a tower compiled with --compile (0 without it).
        "images_compiled": figures["counts"].get("images_compiled", 0),
        # Which Ray nodes ran each stage (decode, tokenize, image_tower, text_tower, write).
        "stage_nodes": dict(sorted(figures["nodes"].items())),
        # Rows each stage finished over time: [seconds since the run started, rows], per time
        # bucket, so that the start-up shows as the time before the first rows.
        "stage_timeline": _bucketed(timeline, started_at),
        "shards_written": sorted(n for s in shards for n in s["shards"]),
        "provenance": provenance,
    }


def write_summary(out: str, summary: dict, storage_options: dict | None = None) -> str:
    fs, path = storage.filesystem(out, storage_options)
    target = f"{path.rstrip('/')}/{SUMMARY_NAME}"
    with fs.open(target, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return storage.unstrip(fs, target)
