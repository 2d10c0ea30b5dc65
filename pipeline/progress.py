"""Progress of a running job: rows through the towers, as a line per interval (text or JSON)."""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import pyarrow as pa
import ray

from pipeline.timing import stage_records, summarize_records


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows that came out of the last tower stage, and the busy time each stage spent on them,
    gathered across the cluster while the job runs."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.rows = 0
        self.stage_rows = collections.Counter()
        self.stage_seconds = collections.Counter()
        self.devices: dict[str, dict[str, dict]] = {}
        self.started = collections.Counter()  # tower actors ready, by stage
        # Exported the Ray way: where the cluster has Prometheus, it scrapes these.
        self.metric = Counter("altclip_rows_embedded", description="Rows through the towers.")
        self.busy_metric = Counter("altclip_stage_busy_seconds", description="Busy seconds per stage.",
                                   tag_keys=("stage",))

    def add(self, rows: int, stage_seconds: dict[str, float] | None = None,
            devices: dict[str, dict[str, dict]] | None = None) -> None:
        self.rows += rows
        self.metric.inc(rows)
        self.add_stages(rows, stage_seconds or {})
        for stage, per_actor in (devices or {}).items():
            self.devices.setdefault(stage, {}).update(per_actor)

    def add_stages(self, rows: int, stage_seconds: dict[str, float]) -> None:
        for stage, seconds in stage_seconds.items():
            self.stage_rows[stage] += rows
            self.stage_seconds[stage] += seconds
            if seconds > 0:
                self.busy_metric.inc(seconds, tags={"stage": stage})

    def tower_started(self, stage: str) -> None:
        self.started[stage] += 1

    def towers_started(self) -> dict[str, int]:
        return dict(self.started)

    def snapshot(self) -> dict:
        return {"rows": self.rows, "stage_rows": dict(self.stage_rows),
                "stage_seconds": dict(self.stage_seconds), "devices": self.devices}


def report_progress(counter, batch: pa.Table) -> None:
    """Tell the counter (if any) the rows of a batch out of the last tower, and the busy time
    and accelerator reports its records carry. Not waited for: no batch waits on one actor."""
    if counter is None:
        return
    figures = summarize_records(stage_records(batch))
    counter.add.remote(batch.num_rows, figures["seconds"], figures["devices"])


def report_started(counter, stage: str) -> None:
    """Tell the counter (if any) that a tower actor of `stage` has its model loaded."""
    if counter is not None:
        counter.tower_started.remote(stage)


class ProgressLog:
    """A thread that prints rows done / total, rate and ETA every `interval` seconds."""

    def __init__(self, counter, total: int | None, interval: float, fmt: str, stream=None):
        self.counter, self.total, self.interval, self.fmt, self.stream = (
            counter, total, interval, fmt, stream)
        self.started = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def expect(self, rows: int) -> None:
        """The rows the job wrote: the last line waits (a few seconds at most) for the counter
        to have heard of all of them, as its reports are not waited for."""
        deadline = time.monotonic() + 5
        while ray.get(self.counter.snapshot.remote())["rows"] < rows and time.monotonic() < deadline:
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.emit(final=True)

    def _run(self):
        while not self.done.wait(self.interval):
            self.emit()

    def emit(self, final: bool = False) -> None:
        snapshot = ray.get(self.counter.snapshot.remote())
        # JSON lines go to stdout, where nothing else is written, for a log shipper to read
        # whole; text lines go with the other messages to stderr. The stream is looked up now,
        # not at import: callers (and tests) may have replaced it.
        stream = self.stream or (sys.stdout if self.fmt == "json" else sys.stderr)
        print(format_progress(snapshot, self.total, time.monotonic() - self.started, self.fmt, final),
              file=stream, flush=True)


def format_progress(snapshot: dict, total: int | None, elapsed: float, fmt: str, final: bool) -> str:
    """One progress line: rows done / total, rate, ETA; each stage's busy seconds and rows per
    busy second; the busiest stage; what each accelerator reports."""
    rows = snapshot["rows"]
    rate = rows / elapsed if elapsed > 0 else 0.0
    eta = (total - rows) / rate if rate > 0 and total else None
    busy = snapshot["stage_seconds"]
    stages = {stage: {"busy_seconds": round(seconds, 3),
                      "rows_per_busy_second": round(snapshot["stage_rows"][stage] / seconds, 1) if seconds else None}
              for stage, seconds in busy.items()}
    bottleneck = max(busy, key=busy.get) if busy else None
    if fmt == "json":
        return json.dumps({"event": "finished" if final else "progress", "rows_done": rows,
                           "rows_total": total, "rows_per_second": round(rate, 2),
                           "elapsed_seconds": round(elapsed, 1),
                           "eta_seconds": None if eta is None else round(eta, 1),
                           "stages": stages, "bottleneck": bottleneck,
                           "accelerators": snapshot["devices"]})
    share = f" ({100 * rows / total:.0f}%)" if total else ""
    left = f", ETA {eta:.0f} s" if eta is not None and not final else ""
    line = f"progress: {rows}/{total if total else '?'} rows{share}, {rate:.1f} rows/s{left}"
    if stages:
        line += "; busy s (rows per busy s): " + ", ".join(
            f"{stage} {s['busy_seconds']:.1f} ({s['rows_per_busy_second'] or 0:.0f})" for stage, s in stages.items())
        line += f"; bottleneck {bottleneck}"
    for stage, per_actor in sorted(snapshot["devices"].items()):
        for stats in per_actor.values():
            used = f"{stats.get('memory_peak_gib')}/{stats.get('memory_total_gib')} GiB peak"
            util = f", {stats['utilisation_percent']}% busy" if "utilisation_percent" in stats else ""
            line += f"; {stage} on {stats.get('name', 'accelerator')}: {used}{util}"
    return line
