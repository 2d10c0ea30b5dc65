"""Progress of a running job: rows through the towers, as a line per interval (text or JSON)."""

from __future__ import annotations

import json
import sys
import threading
import time

import pyarrow as pa
import ray


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows that came out of the last tower stage, counted across the cluster."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.rows = 0
        # Exported the Ray way: where the cluster has Prometheus, it scrapes this.
        self.metric = Counter("altclip_rows_embedded", description="Rows through the towers.")

    def add(self, rows: int) -> None:
        self.rows += rows
        self.metric.inc(rows)

    def get(self) -> int:
        return self.rows


def count_rows(batch: pa.Table, counter) -> pa.Table:
    """Ray Data stage after the towers: tell the counter, pass the batch on."""
    # Waited for: calls from many tasks are not ordered against the driver's final read, and
    # the last progress line must count every row.
    ray.get(counter.add.remote(batch.num_rows))
    return batch


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

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.emit(final=True)

    def _run(self):
        while not self.done.wait(self.interval):
            self.emit()

    def emit(self, final: bool = False) -> None:
        rows = ray.get(self.counter.get.remote())
        elapsed = time.monotonic() - self.started
        rate = rows / elapsed if elapsed > 0 else 0.0
        eta = (self.total - rows) / rate if rate > 0 and self.total else None
        if self.fmt == "json":
            line = json.dumps({"event": "finished" if final else "progress", "rows_done": rows,
                               "rows_total": self.total, "rows_per_second": round(rate, 2),
                               "elapsed_seconds": round(elapsed, 1),
                               "eta_seconds": None if eta is None else round(eta, 1)})
        else:
            share = f" ({100 * rows / self.total:.0f}%)" if self.total else ""
            left = f", ETA {eta:.0f} s" if eta is not None and not final else ""
            line = f"progress: {rows}/{self.total if self.total else '?'} rows{share}, {rate:.1f} rows/s{left}"
        # sys.stderr looked up now, not at import: callers (and tests) may have replaced it.
        print(line, file=self.stream or sys.stderr, flush=True)
