"""A stand-in for the tower actors that costs nothing, for benchmarks of what runs around them.

It is switched on by the Ray runtime environment that `runtime_env()` returns, and by nothing
else: a benchmark starts Ray with it before it runs the job, and then every Ray worker of that
job runs `replace_towers` when it starts. `altclip embed` starts Ray without a runtime
environment and has no option to give one, so its jobs always run the real towers; the `bench`
package is not installed with the project, so a cluster without this checkout cannot import it
either.

In a worker, `ImageEmbedder` and `TextEmbedder` (and so `TowersEmbedder`, which builds one of
each) keep their names and their place in the plan, but load no model: each row with pixels
(with token ids) gets a random unit vector of the model's dimension, each row without gets a
null, and the stage records and progress reports are made as the real towers make them. Each
actor also appends the rows it handled to a file under the folder named by `STANDIN_ENV`, so
that a benchmark can count the rows that went through the towers, published or not.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STANDIN_ENV = "ALTCLIP_BENCH_STANDIN_TOWERS"  # the folder the stand-in counts rows in
HOOK = "bench.standin.replace_towers"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runtime_env(count_dir: str) -> dict:
    """The runtime environment to start Ray with (`ray.init(runtime_env=...)`) for stand-in towers."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {"worker_process_setup_hook": HOOK, "env_vars": {STANDIN_ENV: count_dir, "PYTHONPATH": path}}


def rows_through_towers(count_dir: str) -> dict[str, int]:
    """Rows each stand-in tower (image, text) handled, summed over every actor that ever ran,
    killed ones included."""
    totals = {"image": 0, "text": 0}
    for name in os.listdir(count_dir):
        with open(os.path.join(count_dir, name)) as f:
            totals[name.split("-", 1)[0]] += sum(int(line) for line in f if line.strip())
    return totals


def _count(kind: str, rows: int) -> None:
    # One small append per batch: lines are written whole, so a killed actor loses none it wrote.
    with open(os.path.join(os.environ[STANDIN_ENV], f"{kind}-{os.getpid()}.rows"), "a") as f:
        f.write(f"{rows}\n")


def _unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def replace_towers() -> None:
    """Ray's worker_process_setup_hook: in a worker of a job whose runtime environment names the
    stand-in's folder, the towers are swapped for the stand-in's when (and only if) the worker
    imports them. Patching at once would import torch into every worker, reading and decoding
    ones too, which the real job's workers do not: on 10,000 rows (2 cores) the stream took
    153 s that way against 87 s patched on import (the tiny model's real towers: 65-74 s), and
    the workers' peak RSS summed 15.9 GB against 9.5 GB."""
    if not os.environ.get(STANDIN_ENV):
        return
    if TOWERS_MODULE in sys.modules:
        _patch(sys.modules[TOWERS_MODULE])
    else:
        sys.meta_path.insert(0, _PatchOnImport())


TOWERS_MODULE = "pipeline.embed.towers"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the towers' module as the other finders do, and patches it once it has run."""

    def find_spec(self, name, path, target=None):
        if name != TOWERS_MODULE:
            return None
        for finder in sys.meta_path:
            found = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if found is not None:
                found.loader = _PatchingLoader(found.loader)
                return found
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _patch(module)


def _patch(towers) -> None:
    """Give `ImageEmbedder` and `TextEmbedder` (and so `TowersEmbedder`) the stand-in's
    constructor and `__call__`."""
    from pipeline.decode.images import PIXELS
    from pipeline.decode.text import INPUT_IDS
    from pipeline.progress import report_progress, report_started
    from pipeline.timing import add_stage_record
    from schemas.embeddings import IMAGE_EMBEDDING, TEXT_EMBEDDING

    def __init__(self, model, dtype, num_threads=None, counter=None, reports_rows=True, compile_batch=0,
                 **storage):
        # `storage`: how the real tower stores its vectors (vector_column's options), if any.
        self.progress, self.dim, self.storage = counter if reports_rows else None, model.dim, storage
        self.rng = np.random.default_rng()
        report_started(counter, self.stage)  # as the real tower does, for the job's TowerStartWatch

    def embed(self, batch: pa.Table, inputs: str, output: str, present) -> pa.Table:
        started = time.perf_counter()
        rows = np.flatnonzero(present(batch.column(inputs)))
        vectors = towers.vector_column(_unit_vectors(self.rng, len(rows), self.dim), rows,
                                          batch.num_rows, self.dim, **self.storage)
        out = batch.drop_columns([inputs]).append_column(output, vectors)
        out = add_stage_record(out, self.stage, time.perf_counter() - started)
        report_progress(self.progress, out)
        _count(self.kind, batch.num_rows)
        return out

    def has_pixels(column) -> np.ndarray:
        return pc.is_valid(column).to_numpy(zero_copy_only=False)

    def has_tokens(column) -> np.ndarray:
        return pc.fill_null(pc.greater(pc.list_value_length(column), 0), False).to_numpy(zero_copy_only=False)

    towers.ImageEmbedder.__init__ = __init__
    towers.ImageEmbedder.__call__ = lambda self, batch: embed(self, batch, PIXELS, IMAGE_EMBEDDING, has_pixels)
    towers.TextEmbedder.__init__ = __init__
    towers.TextEmbedder.__call__ = lambda self, batch: embed(self, batch, INPUT_IDS, TEXT_EMBEDDING, has_tokens)
