"""What an embed job costs in its driver as the manifest grows: the wall time and peak RSS of each
phase that runs outside the towers.

    python -m bench.scale [--rows 200000 1000000 ...] [--dim 768] [--rows-per-shard 10000]
                          [--manifest-file-rows 100000] [--republished-shards 1] [--load-max-rows N]
                          [--e2e-rows 10000] [--e2e-rows-per-shard N] [--no-real]
                          [--json OUT.json] [--keep] [--workdir DIR]

Two measurements; each job runs as a process of its own, so that its memory is its own:

- phases, at each --rows: `run_embed` itself on a synthetic Parquet manifest (files of
  --manifest-file-rows rows: its partitions), resuming an output that a killed run left half
  done (the first half's partitions committed, the next partition's shards partly published and
  one half-written), with the stream (read, decode, tokenize, towers, write) replaced by the
  shards it would publish. Those are written beforehand with the writer's own `write_shard`,
  published by a rename and told to the run's ledger, as the write tasks do; with
  --republished-shards K, K shards of committed partitions are published again (as a retried
  write does), and the ledger turns them away. Everything else is the job's own code, in its own
  order: open the manifest, start Ray, read the commit records (resume), scan the manifest's ids
  on the cluster, build the plan, the totals, the summary, the load into LanceDB
  (--load-max-rows: above it, no --db, no load) and the index build. The model is the tiny
  benchmark model's spec with its dimension set to --dim; no weights are loaded.
- end to end, at --e2e-rows: `altclip embed` (its CLI, in-process, with --db) on a manifest of
  small PNGs, with the towers replaced by the stand-in of bench/standin.py (no model; a random
  unit vector per row): once whole; once killed (SIGKILL to its whole process tree) when half
  the rows are published, then run again to resume, with the rows the towers handled counted in
  both runs; and once with the real tiny model, to check the stand-in against it.

Each phase's peak RSS is the driver's own high-water mark (VmHWM) while that phase ran: the mark
is reset to the current RSS (/proc/self/clear_refs) as each phase starts. Linux only.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench import corpus
from bench.proctree import MIB, TreeSampler, descendants, exit_on_sigterm, run_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_METADATA = "lang"  # the synthetic manifest's one metadata column
LANGS = ("en", "de", "es", "fr", "ru", "zh", "ja", "ko", "ar", "hi", "th", "pt")
CAPTION_POOL = 10_000  # distinct captions, repeated over the rows
IMAGE_POOL = 50
ERROR_EVERY = 1000  # one row in this many has an image error (not_found), as real corpora do
DTYPE = "float32"  # of the phases run's provenance (no tower runs there)
DISK_MARGIN = 5 * 2**30
E2E_PARTITIONS = 20  # manifest files of the end-to-end runs: a killed run redoes those in flight


# ---------------------------------------------------------------------------------------------
# Peak memory and time per phase, in the process being measured


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM")


def _reset_hwm() -> None:
    """VmHWM back to the current RSS (Linux 4.0+), so that the next reading is this phase's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseRecorder:
    """Wall time and peak RSS of each stretch of a run, cut where the calls it wraps start and
    end. A stretch inside a wrapped call, outside any call wrapped within it, counts to that
    call's phase; a stretch between wrapped calls, to the phase the call before it names as
    what follows it. A phase entered several times adds its seconds and keeps its largest peak.
    """

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.stack: list[tuple[str, str]] = []  # (phase, phase after it) of the calls running
        self.label = "start"
        self._begin()

    def _begin(self) -> None:
        _reset_hwm()
        self.started, self.rss_at_start = time.perf_counter(), _rss()

    def _close(self) -> None:
        seconds, peak = time.perf_counter() - self.started, _hwm()
        phase = self.phases.setdefault(self.label, {"seconds": 0.0, "peak_rss": 0, "growth": 0,
                                                    "stretches": 0})
        phase["seconds"] += seconds
        phase["peak_rss"] = max(phase["peak_rss"], peak)
        phase["growth"] = max(phase["growth"], peak - self.rss_at_start)
        phase["stretches"] += 1

    def enter(self, label: str, after: str = "other") -> None:
        self._close()
        self.stack.append((label, after))
        self.label = label
        self._begin()

    def leave(self) -> None:
        self._close()
        _, after = self.stack.pop()
        self.label = self.stack[-1][0] if self.stack else after
        self._begin()

    def wrap(self, module, name: str, label: str, after: str) -> None:
        """Replace `module.name` by the same function, timed as phase `label`; what runs after
        it returns, up to the next wrapped call, is phase `after`."""
        original = getattr(module, name)

        def timed(*args, **kwargs):
            self.enter(label, after)
            try:
                return original(*args, **kwargs)
            finally:
                self.leave()

        setattr(module, name, timed)

    def report(self) -> dict:
        self._close()
        self._begin()
        return {label: {"seconds": round(p["seconds"], 3), "peak_rss_mib": round(p["peak_rss"] / MIB, 1),
                        "growth_mib": round(p["growth"] / MIB, 1), "stretches": p["stretches"]}
                for label, p in self.phases.items()}


# The job's calls each phase is cut at, in the module that imports each by name (the run's
# preamble in pipeline.run.prepare): (module, function, its phase, the phase after it returns).
WRAPPED = (
    ("pipeline.run.prepare", "open_manifest", "open manifest", "check options"),
    ("pipeline.run.prepare", "resolve_model", "resolve model", "check options"),  # then: --out writable
    ("pipeline.run.prepare", "ensure_ray", "start Ray", "plan"),  # then: Ray Data settings, placement, provenance
    ("pipeline.run.resume", "committed_partitions", "resume: partitions done", "plan"),
    ("pipeline.run.resume", "scan_ids", "scan ids", "plan"),  # then: pending, counter, ledger, schema, sink
    ("pipeline.run.stages", "manifest_rows", "plan", "plan"),
    ("pipeline.run.stages", "embed_dataset", "plan", "stream"),  # then: the plan runs
    ("pipeline.write.ledger", "output_totals", "totals", "summary"),  # then: the duplicate check, summarize
    ("pipeline.run.resume", "remove_duplicate_rows", "duplicates", "duplicates"),
    ("pipeline.write.summary", "write_summary", "summary", "end"),
    ("jobs.embed", "run_load", "load into LanceDB", "end"),
    ("pipeline.table.store", "index_table", "index build", "load into LanceDB"),
)
PHASE_ORDER = ("start", "open manifest", "resolve model", "check options", "start Ray",
               "resume: partitions done", "scan ids", "plan", "stream", "totals", "duplicates", "summary",
               "load into LanceDB", "index build", "end", "other")


def _recorder() -> PhaseRecorder:
    import importlib

    recorder = PhaseRecorder()
    for module, name, label, after in WRAPPED:
        recorder.wrap(importlib.import_module(module), name, label, after)
    return recorder


# ---------------------------------------------------------------------------------------------
# The phases run (child process): run_embed, the stream replaced by publishing staged shards


class PublishStaged:
    """The stream's stand-in in the phases run: publishes the shards staged for it by a rename,
    as the writer publishes each shard it writes, tells the run's ledger of each as the write
    tasks do (with its ids, read back), and records them in the sink."""

    def __init__(self, staged_dir: str, staged: list[list]):
        self.staged_dir, self.staged = staged_dir, staged

    def write_datasink(self, sink, ray_remote_args=None) -> None:
        import pyarrow.parquet as pq
        import ray

        from pipeline.timing import summarize_records
        from pipeline.write.shards import shard_footer_totals, shard_partition

        for name, rows in self.staged:
            path = os.path.join(sink.out, name)
            os.rename(os.path.join(self.staged_dir, name), path)
            ids = pq.read_table(path, columns=["id"]).column(0).to_pylist()
            repeated = ray.get(sink.ledger.written.remote(shard_partition(name), name, ids,
                                                          shard_footer_totals(path)))
            if repeated:  # a copy (a republished shard): the writer removes it
                os.remove(path)
            sink.shards.append({"rows": rows, "shards": [name], **summarize_records([])})


def _phases_config(params: dict):
    from pipeline.config import EmbedConfig

    return EmbedConfig(manifest=params["manifest"], out=params["out"], model=params["model"],
                       db=params["db"], rows_per_shard=params["rows_per_shard"], dtype=DTYPE,
                       progress="quiet")


def measure_phases(params: dict) -> dict:
    # lancedb is not imported here: the job imports it when it first opens a table (after Ray
    # has forked its processes), and that import is part of the load's cost.
    import ray

    import jobs.embed
    import pipeline.run.prepare
    import pipeline.run.stages

    real_resolve, real_embed_dataset = pipeline.run.prepare.resolve_model, pipeline.run.stages.embed_dataset

    def resolve_model(ref, storage_options=None):
        return dataclasses.replace(real_resolve(ref, storage_options), dim=params["dim"])

    def embed_dataset(*args, **kwargs):
        real_embed_dataset(*args, **kwargs)  # the plan is built as the job builds it, not run
        return PublishStaged(params["staged_dir"], params["staged"])

    pipeline.run.prepare.resolve_model, pipeline.run.stages.embed_dataset = resolve_model, embed_dataset
    config = _phases_config(params)
    recorder = _recorder()
    summary = jobs.embed.run_embed(config)
    phases = recorder.report()
    ray.shutdown()
    return {"phases": phases, "summary": _summary_figures(summary)}


def _summary_figures(summary: dict) -> dict:
    keys = ("rows_in", "rows_out", "rows_already_done", "rows_embedded", "duplicate_rows_removed",
            "image_ok", "text_ok", "errors_by_kind", "seconds_total", "table")
    return {k: summary[k] for k in keys if k in summary}


# ---------------------------------------------------------------------------------------------
# The end-to-end runs (child process): `altclip embed` in-process


def measure_e2e(params: dict) -> dict:
    import ray

    import jobs.embed  # noqa: F401  (before the clock, as `altclip embed` imports it before its job)
    from bench import standin
    from jobs.cli import main as altclip

    recorder = _recorder()
    if params["standin"]:
        # Ray started here with the stand-in's runtime environment; the job's own ensure_ray
        # then finds it running, as it finds a cluster it is submitted to.
        recorder.enter("start Ray", "start")
        ray.init(address="local", runtime_env=standin.runtime_env(params["count_dir"]),
                 logging_level=logging.WARNING, log_to_driver=True)
        recorder.leave()
    args = ["embed", params["manifest"], "--out", params["out"], "--db", params["db"], "--model",
            params["model"], "--towers", "image,text", "--rows-per-shard",
            str(params["rows_per_shard"]), "--quiet"]
    altclip.main(args, standalone_mode=False)  # `altclip embed ...`, as a user runs it
    phases = recorder.report()
    with open(os.path.join(params["out"], "summary.json")) as f:
        summary = json.load(f)
    ray.shutdown()
    return {"phases": phases, "summary": _summary_figures(summary)}


def measure_load_alone(params: dict) -> dict:
    """The phases run's outputs loaded into a new table by `load_outputs` in this process alone,
    as `altclip load OUT --db DB` without `--address` does (no Ray), the index apart: the
    single-process load the phases run's load on Ray is compared with, on the same shards."""
    import pipeline.table.store
    from schemas.table import DEFAULT_TABLE_NAME

    recorder = PhaseRecorder()
    recorder.wrap(pipeline.table.store, "load_outputs", "load in one process", "end")
    pipeline.table.store.index_table = lambda table, *args, **kwargs: {}  # timed by the phases run
    before = os.times()
    pipeline.table.store.load_outputs(params["out"], params["db"], DEFAULT_TABLE_NAME)
    after = os.times()
    return {"phases": recorder.report(), "cpu_seconds": round(after.user - before.user + after.system
                                                             - before.system, 1)}


WORKERS = {"phases": measure_phases, "e2e": measure_e2e, "load-alone": measure_load_alone}


# ---------------------------------------------------------------------------------------------
# The driver: synthetic data, children, the report


def run_child(kind: str, params: dict, stem: str, kill_when=None) -> dict:
    """`python -m bench.scale --worker KIND` as a process of its own (a new Ray of its own); with
    `kill_when`, polled every 0.25 s, its whole process tree is killed (SIGKILL) once it says so."""
    with open(f"{stem}.params.json", "w") as f:
        json.dump(params, f)
    command = [sys.executable, "-m", "bench.scale", "--worker", kind, "--params",
               f"{stem}.params.json", "--result", f"{stem}.result.json"]
    killed = threading.Event()
    with open(f"{stem}.log", "wb") as log:
        # Its own session: the kill reaches every process it started, and only those.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=corpus.fresh_ray_env(), start_new_session=True)
        started = time.perf_counter()
        sampler = TreeSampler(proc.pid, 0.5)
        sampler.start()
        try:
            while proc.poll() is None:
                if kill_when is not None and not killed.is_set() and kill_when():
                    killed.set()
                    _kill_tree(proc.pid)
                time.sleep(0.25)
        except BaseException:
            _kill_tree(proc.pid)
            raise
        finally:
            wall = time.perf_counter() - started
            tree = sampler.stop()
    if killed.is_set():
        return {"killed": True, "wall_seconds": round(wall, 2), "tree": tree.to_dict()}
    if proc.returncode != 0:
        with open(f"{stem}.log", errors="replace") as f:
            raise SystemExit(f"{kind} run failed, exit {proc.returncode}:\n{f.read()[-4000:]}")
    with open(f"{stem}.result.json") as f:
        result = json.load(f)
    result.update(wall_seconds=round(wall, 2), tree=tree.to_dict())
    result["driver_peak_rss_mib"] = max(p["peak_rss_mib"] for p in result["phases"].values())
    return result


def _kill_tree(pid: int) -> None:
    """SIGKILL a child started in its own session and every process under it (Ray's too)."""
    pids = descendants(pid)
    for target in pids:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)  # its session's group: anything started since the listing
    except ProcessLookupError:
        pass


def published_rows(out: str) -> int:
    import pyarrow.parquet as pq

    from pipeline.write.shards import SHARD_PREFIX

    rows = 0
    for path in glob.glob(os.path.join(out, f"{SHARD_PREFIX}*.parquet")):
        try:
            rows += pq.read_metadata(path).num_rows
        except (OSError, ValueError):  # removed meanwhile
            pass
    return rows


def committed_rows(out: str) -> int:
    """Rows of the partitions the output's commit records say are done."""
    from pipeline.write.ledger import read_records

    return sum(r["rows"] for r in read_records(out).values())


class SyntheticRows:
    """Row i of the synthetic corpus, the same in the manifest and in the outputs."""

    def __init__(self, root: str, dim: int):
        self.dim = dim
        self.images = [f"{root}/images/small-{k:02d}.png" for k in range(IMAGE_POOL)]
        self.image_sha = [hashlib.sha256(p.encode()).hexdigest() for p in self.images]
        self.captions = corpus.captions(CAPTION_POOL)
        self.caption_sha = [hashlib.sha256(c.encode()).hexdigest() for c in self.captions]

    def manifest(self, start: int, stop: int):
        import pyarrow as pa

        from schemas.manifest import CAPTION, ID, IMAGE

        span = range(start, stop)
        return pa.table({
            ID: [f"r{i:015d}" for i in span],  # 16 characters, like a short hash or a sample key
            IMAGE: [self.images[i % IMAGE_POOL] for i in span],
            CAPTION: [self.captions[i % CAPTION_POOL] for i in span],
            MANIFEST_METADATA: [LANGS[i % len(LANGS)] for i in span],
        })

    def outputs(self, start: int, stop: int, rng):
        """What the towers and the stages before them add to the manifest's rows."""
        import numpy as np
        import pyarrow as pa

        from schemas.embeddings import (
            CAPTION_SHA256,
            HEIGHT,
            IMAGE_EMBEDDING,
            IMAGE_ERROR,
            IMAGE_SHA256,
            TEXT_EMBEDDING,
            WIDTH,
        )

        table = self.manifest(start, stop)
        n, span = stop - start, range(start, stop)
        failed = np.array([i % ERROR_EVERY == ERROR_EVERY - 1 for i in span])

        def vectors(mask=None):
            v = rng.standard_normal((n, self.dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), self.dim,
                                                     mask=None if mask is None else pa.array(mask))

        return (table.append_column(IMAGE_EMBEDDING, vectors(failed))
                .append_column(TEXT_EMBEDDING, vectors())
                .append_column(IMAGE_SHA256, pa.array([None if f else self.image_sha[i % IMAGE_POOL]
                                                       for i, f in zip(span, failed)], pa.string()))
                .append_column(CAPTION_SHA256, pa.array([self.caption_sha[i % CAPTION_POOL] for i in span]))
                .append_column(WIDTH, pa.array([None if f else 64 for f in failed], pa.int32()))
                .append_column(HEIGHT, pa.array([None if f else 64 for f in failed], pa.int32()))
                .append_column(IMAGE_ERROR, pa.array([f"not_found: {self.images[i % IMAGE_POOL]}"
                                                      if f else None for i, f in zip(span, failed)],
                                                     pa.string())))


def prepare_phases(size_dir: str, rows: int, args, model_dir: str) -> dict:
    """The manifest (files of --manifest-file-rows rows: its partitions), an output a run killed
    at 50% left (the first half's partitions committed, the next one's shards published but not
    committed, one more half-written), and the shards the resumed run's stream is to publish;
    returns the phases run's parameters."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.embed.model import resolve_model
    from pipeline.embed.provenance import provenance
    from pipeline.read.manifest import open_manifest
    from pipeline.write.ledger import write_record
    from pipeline.write.shards import conform, run_stamp, shards_totals, write_shard
    from schemas.embeddings import embeddings_schema

    manifest, out, staged_dir, scratch = (os.path.join(size_dir, d) for d in
                                          ("manifest", "out", "staged", "scratch"))
    # The provenance and schema run_embed will make, from the same calls (the phases run's
    # config and model spec), so that it resumes these shards rather than refusing them.
    config = _phases_config({"manifest": manifest, "out": out, "model": model_dir, "db": None,
                             "rows_per_shard": args.rows_per_shard})
    spec = dataclasses.replace(resolve_model(model_dir), dim=args.dim)
    origin = provenance(spec, DTYPE, config.towers, config.preprocess)
    schema = embeddings_schema(args.dim, [pa.field(MANIFEST_METADATA, pa.string())], origin)
    for folder in (manifest, out, staged_dir, scratch):
        os.makedirs(folder)
    synthetic = SyntheticRows(manifest, args.dim)
    rng = np.random.default_rng(rows)
    files = [(start, min(rows, start + args.manifest_file_rows))
             for start in range(0, rows, args.manifest_file_rows)]
    for n, (start, stop) in enumerate(files):
        pq.write_table(synthetic.manifest(start, stop), os.path.join(manifest, f"part-{n:05d}.parquet"))
    opened = open_manifest(config)
    keys, uris = opened.partition_keys(), opened.uris()

    def shard(start: int, stop: int, where: str, stamp: str, key: str) -> str:
        return write_shard(where, conform(synthetic.outputs(start, stop, rng), schema, spec.label),
                           stamp=stamp, partition=key)

    def shards(span: tuple[int, int], where: str, stamp: str, key: str) -> list[list]:
        return [[shard(a, min(span[1], a + args.rows_per_shard), where, stamp, key),
                 min(span[1], a + args.rows_per_shard) - a]
                for a in range(span[0], span[1], args.rows_per_shard)]

    first_run, resumed = run_stamp(), run_stamp()
    done = len(files) // 2  # partitions the killed run committed
    for key, uri, span in zip(keys[:done], uris[:done], files[:done]):
        names = [name for name, _ in shards(span, out, first_run, key)]
        totals = shards_totals([os.path.join(out, name) for name in names])
        write_record(out, key, {"path": uri, "rows": span[1] - span[0],
                                "shards": names, "totals": totals})
    in_flight_rows = 0
    if done < len(files):  # the partition in flight: some shards published, one half-written
        published = shards(files[done], out, first_run, keys[done])
        published, writing = published[:max(1, len(published) // 2)], published[max(1, len(published) // 2):]
        for name, n in writing[:1]:
            os.rename(os.path.join(out, name), os.path.join(out, f".{name}.tmp"))
        for name, n in writing[1:]:
            os.remove(os.path.join(out, name))
        in_flight_rows = sum(n for _, n in published)
    staged = [s for key, span in zip(keys[done:], files[done:]) for s in shards(span, staged_dir, resumed, key)]
    # Shards of the first run published again by the resumed run (a retried write).
    republished = 0
    for key, span in list(zip(keys, files))[:min(done, args.republished_shards)]:
        staged += shards((span[0], min(span[1], span[0] + args.rows_per_shard)), staged_dir, resumed, key)
        republished += staged[-1][1]
    staged.sort()
    shutil.rmtree(scratch)
    load = args.load_max_rows is None or rows <= args.load_max_rows
    return {"manifest": manifest, "out": out, "db": os.path.join(size_dir, "db") if load else None,
            "model": model_dir, "dim": args.dim, "rows_per_shard": args.rows_per_shard,
            "staged_dir": staged_dir, "staged": staged,
            "published_before": files[done][0] if done < len(files) else rows,
            "in_flight_rows": in_flight_rows, "republished_rows": republished}


def _bytes_needed(rows: int, args) -> int:
    per_row = 2 * args.dim * 4 + 400  # the vectors, and the rest of a row with some slack
    copies = 1 + (args.load_max_rows is None or rows <= args.load_max_rows)  # shards, table
    return rows * per_row * copies


def check_disk(args, workdir: str) -> None:
    """Before any work: each size's data is removed before the next, so the largest must fit."""
    free = shutil.disk_usage(workdir).free
    for rows in args.rows:
        need = _bytes_needed(rows, args)
        if need + DISK_MARGIN > free:
            raise SystemExit(f"{rows} rows at --dim {args.dim} need about {need / 2**30:.0f} GiB on disk "
                             f"and {free / 2**30:.0f} GiB are free under {workdir}: pass --load-max-rows "
                             "below it (no LanceDB copy), a smaller --dim, or another --workdir")


def run_phases(rows: int, args, model_dir: str, workdir: str, log) -> dict:
    size_dir = os.path.join(workdir, f"phases-{rows}")
    try:
        started = time.perf_counter()
        log(f"{rows} rows: writing the manifest and the shards ...")
        params = prepare_phases(size_dir, rows, args, model_dir)
        prepared = time.perf_counter() - started
        log(f"{rows} rows: {prepared:.0f} s to prepare; running the job ...")
        result = run_child("phases", params, os.path.join(workdir, f"phases-{rows}"))
        result.update(rows=rows, prepare_seconds=round(prepared, 1),
                      published_before=params["published_before"], in_flight_rows=params["in_flight_rows"],
                      republished_rows=params["republished_rows"])
        if params["db"] is not None:
            # The same shards into a new table again, by one process without Ray. The job's
            # table goes first: the disk holds the shards and one table at a time.
            shutil.rmtree(params["db"])
            log(f"{rows} rows: loading the same outputs in one process ...")
            alone = run_child("load-alone", {"out": params["out"], "db": params["db"] + "-alone"},
                              os.path.join(workdir, f"load-alone-{rows}"))
            shutil.rmtree(params["db"] + "-alone")
            result["load_alone"] = {**alone["phases"]["load in one process"],
                                    "cpu_seconds": alone["cpu_seconds"]}
        return result
    finally:
        if not args.keep:
            shutil.rmtree(size_dir, ignore_errors=True)


def run_e2e(args, model_dir: str, workdir: str, log, save) -> dict:
    from bench import standin

    rows = args.e2e_rows
    rps = args.e2e_rows_per_shard or max(1, rows // 20)
    manifest = corpus.small_image_corpus(rows, files=E2E_PARTITIONS)
    base = {"manifest": manifest, "model": model_dir, "rows_per_shard": rps}

    def params(name: str, out: str, standin_on: bool) -> dict:
        count_dir = os.path.join(workdir, f"e2e-{name}-counts")
        os.makedirs(count_dir, exist_ok=True)
        return {**base, "out": os.path.join(workdir, out), "db": os.path.join(workdir, f"{out}-db"),
                "standin": standin_on, "count_dir": count_dir}

    runs = {}
    partial = {"rows": rows, "rows_per_shard": rps, "manifest": manifest, "runs": runs}
    log(f"end to end, {rows} rows, stand-in towers ...")
    p = params("standin", "e2e-whole", True)
    runs["standin"] = run_child("e2e", p, os.path.join(workdir, "e2e-standin"))
    runs["standin"]["rows_through_towers"] = standin.rows_through_towers(p["count_dir"])
    save(partial)

    log("end to end, stand-in towers, killed when half the rows are published ...")
    p = params("killed", "e2e-resume", True)
    killed = run_child("e2e", p, os.path.join(workdir, "e2e-killed"),
                       kill_when=lambda: published_rows(p["out"]) >= rows / 2)
    time.sleep(2)  # the tree's last processes go
    from pipeline.write.shards import SHARD_PREFIX

    killed.update(rows_published=published_rows(p["out"]), rows_committed=committed_rows(p["out"]),
                  shards_half_written=len(glob.glob(os.path.join(p["out"], f".{SHARD_PREFIX}*.tmp"))),
                  rows_through_towers=standin.rows_through_towers(p["count_dir"]))
    runs["killed"] = killed
    save(partial)
    log("end to end, stand-in towers, resuming it ...")
    p = params("resumed", "e2e-resume", True)
    runs["resumed"] = run_child("e2e", p, os.path.join(workdir, "e2e-resumed"))
    runs["resumed"]["rows_through_towers"] = standin.rows_through_towers(p["count_dir"])
    save(partial)
    if not args.no_real:
        log("end to end, the tiny model ...")
        runs["real"] = run_child("e2e", params("real", "e2e-real", False), os.path.join(workdir, "e2e-real"))
    through = killed["rows_through_towers"]["image"] + runs["resumed"]["rows_through_towers"]["image"]
    resume = {
        "rows": rows, "rows_per_shard": rps,
        "rows_published_at_kill": killed["rows_published"],
        "rows_committed_at_kill": killed["rows_committed"],
        "rows_embedded_before_kill": killed["rows_through_towers"]["image"],
        # Rows the towers had done that no published shard held: the work in flight, lost.
        "rows_in_flight_lost": killed["rows_through_towers"]["image"] - killed["rows_published"],
        "rows_already_done": runs["resumed"]["summary"]["rows_already_done"],
        "rows_embedded_by_resume": runs["resumed"]["summary"]["rows_embedded"],
        "rows_embedded_twice": through - rows,
        "duplicate_rows_removed": runs["resumed"]["summary"]["duplicate_rows_removed"],
        "rows_out": runs["resumed"]["summary"]["rows_out"],
    }
    return {**partial, "resume": resume}


# ---------------------------------------------------------------------------------------------
# The report


def _ratio(a, b):
    return float(f"{a / b:.3g}") if a and b else None


def _ordered(labels) -> list[str]:
    labels = set(labels)
    return [p for p in PHASE_ORDER if p in labels] + sorted(labels - set(PHASE_ORDER))


def _show(value, fmt: str, width: int) -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def _phase_table(columns: list[tuple[str, dict]], title: str) -> list[str]:
    """A phase per line, for each column (a run): seconds, peak RSS, growth during the phase."""
    cell = 30
    lines = [title, f"{'':<20}" + "".join(f"{name:>{cell}}" for name, _ in columns),
             f"{'phase':<20}" + f"{'s':>10}{'peak MiB':>10}{'+MiB':>10}" * len(columns)]
    labels = _ordered(label for _, run in columns for label in run.get("phases", {}))
    for label in labels:
        line = f"{label:<20}"
        for _, run in columns:
            p = run.get("phases", {}).get(label)
            line += (_show(p["seconds"], ".2f", 10) + _show(p["peak_rss_mib"], ".0f", 10)
                     + _show(p["growth_mib"], "+.0f", 10)) if p else _show(None, "", 30)
        lines.append(line)
    lines.append(f"{'driver peak':<20}" + "".join(
        _show(None, "", 10) + _show(run.get("driver_peak_rss_mib"), ".0f", 10) + _show(None, "", 10)
        for _, run in columns))
    lines.append(f"{'process wall':<20}" + "".join(
        _show(run.get("wall_seconds"), ".1f", 10) + _show(None, "", 20) for _, run in columns))
    return lines


def _scaling(report: dict) -> dict:
    """Per phase, smallest size against largest: seconds per million rows at each size; largest /
    smallest of seconds and of peak RSS; and what each extra million rows adds to the phase's
    seconds and to its growth (peak less the RSS it started with): near 0 for a phase whose cost
    does not depend on the rows, however large that cost."""
    runs = report["phases"]
    if len(runs) < 2:
        return {}
    small, large = runs[0], runs[-1]
    extra_millions = (large["rows"] - small["rows"]) / 1e6
    out = {}
    for label in _ordered(small["phases"]):
        a, b = small["phases"].get(label), large["phases"].get(label)
        if not a or not b:
            continue
        out[label] = {
            "seconds_per_million_rows": [round(r["phases"][label]["seconds"] / (r["rows"] / 1e6), 3)
                                         if label in r["phases"] else None for r in runs],
            "seconds_ratio": _ratio(b["seconds"], a["seconds"]),
            "peak_rss_ratio": _ratio(b["peak_rss_mib"], a["peak_rss_mib"]),
            "growth_mib": [r["phases"][label]["growth_mib"] if label in r["phases"] else None for r in runs],
            "seconds_per_extra_million_rows": round((b["seconds"] - a["seconds"]) / extra_millions, 2),
            "growth_mib_per_extra_million_rows": round((b["growth_mib"] - a["growth_mib"]) / extra_millions, 1),
        }
    out["driver peak"] = {"peak_rss_ratio": _ratio(large["driver_peak_rss_mib"], small["driver_peak_rss_mib"]),
                          "mib_per_extra_million_rows": round(
                              (large["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]) / extra_millions, 1)}
    return out


def _text(report: dict) -> str:
    m, a = report["machine"], report["args"]
    lines = [
        f"altclip driver at scale: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; ray {m['ray']}, "
        f"lancedb {m['lancedb']}, pyarrow {m['pyarrow']}",
    ]
    runs = report["phases"]
    if runs:
        lines += [
            "",
            *_phase_table(
                [(f"{r['rows']} rows", r) for r in runs],
                f"phases: run_embed resuming a run killed at 50% (half the rows published, the next "
                f"shard half-written; {a['republished_shards']} shard(s) published twice); dim "
                f"{a['dim']}, {a['rows_per_shard']} rows per shard, {a['manifest_file_rows']} rows per "
                "manifest file; stream = the staged shards published by a rename"),
        ]
        scaling = report["scaling"]
        if scaling:
            sizes = " / ".join(str(r["rows"]) for r in runs)
            lines += ["", f"per phase, over {sizes} rows: seconds per million rows at each size; largest / "
                          "smallest size of seconds and of peak RSS; growth (peak less the RSS at the "
                          "phase's start) at each size; what each extra million rows adds to the "
                          "seconds and to the growth"]
            for label, s in scaling.items():
                if label == "driver peak":
                    continue
                per_m = " / ".join(_show(v, ".2f", 0) for v in s["seconds_per_million_rows"])
                growth = " / ".join(_show(v, "+.0f", 0) for v in s["growth_mib"])
                lines.append(f"  {label:<18} s/M rows {per_m:<20} s x{_show(s['seconds_ratio'], '', 0):<7}"
                             f" peak x{_show(s['peak_rss_ratio'], '', 0):<6} growth MiB {growth:<14}"
                             f" per extra M rows: {s['seconds_per_extra_million_rows']:+.2f} s, "
                             f"{s['growth_mib_per_extra_million_rows']:+.0f} MiB")
            peak = scaling["driver peak"]
            lines.append(f"  driver peak RSS, largest / smallest size: x{peak['peak_rss_ratio']} "
                         f"({peak['mib_per_extra_million_rows']:+.0f} MiB per extra million rows; "
                         "the issue's target, 20M / 1M rows: <= 1.2)")
        for r in runs:
            s = r["summary"]
            load = (f"table {s['table']['rows']} rows, loaded at "
                    f"{r['rows'] / r['phases']['load into LanceDB']['seconds']:.0f} rows/s (index apart)"
                    if s.get("table") and "load into LanceDB" in r["phases"] else "no load (--load-max-rows)")
            lines.append(f"  {r['rows']} rows: resume found {s['rows_already_done']} rows done of "
                         f"{r['published_before']} committed (the partition in flight's "
                         f"{r['in_flight_rows']} published rows redone); {r['republished_rows']} rows "
                         f"published twice, turned away; rows out {s['rows_out']}; {load}; "
                         f"data written in {r['prepare_seconds']} s beforehand")
        for r in (r for r in runs if r.get("load_alone")):
            alone, seconds = r["load_alone"], r["phases"]["load into LanceDB"]["seconds"]
            lines.append(
                f"  load of {r['rows']} rows, the index apart: on Ray (the job's) {seconds:.1f} s, "
                f"{r['rows'] / seconds:.0f} rows/s; in one process (altclip load without --address) "
                f"{alone['seconds']:.1f} s, {r['rows'] / alone['seconds']:.0f} rows/s, busy "
                f"{alone['cpu_seconds'] / alone['seconds']:.2f} of {m['cores']} cores; Ray over one "
                f"process x{alone['seconds'] / seconds:.2f} (the issue's target: x{m['cores']}, this "
                "machine's cores)")
    e2e = report.get("e2e")
    if e2e:
        columns = [("stand-in", e2e["runs"]["standin"]), ("stand-in, killed", e2e["runs"]["killed"]),
                   ("stand-in, resumed", e2e["runs"]["resumed"])]
        if "real" in e2e["runs"]:
            columns.append(("tiny model", e2e["runs"]["real"]))
        lines += ["", *_phase_table(columns, f"end to end: altclip embed --db, {e2e['rows']} rows of small "
                                             f"PNGs, {e2e['rows_per_shard']} rows per shard (the killed "
                                             "run's phases are not known: killed)")]
        r = e2e["resume"]
        lines += [
            f"  resume of a job killed at 50%: {r['rows_published_at_kill']} rows published at the kill, "
            f"{r['rows_committed_at_kill']} of them in committed partitions, "
            f"{r['rows_embedded_before_kill']} through the towers; the resumed run found "
            f"{r['rows_already_done']} done and embedded {r['rows_embedded_by_resume']} (target: only the "
            f"partitions not committed, {r['rows'] - r['rows_committed_at_kill']} rows at most); rows "
            f"embedded twice over both runs: {r['rows_embedded_twice']} (the partitions in flight); "
            f"{r['duplicate_rows_removed']} copies removed, {r['rows_out']} rows out of {r['rows']}",
        ]
        if "real" in e2e["runs"]:
            s, t = e2e["runs"]["standin"], e2e["runs"]["real"]
            lines.append(f"  stand-in against the tiny model, same rows: driver peak {s['driver_peak_rss_mib']:.0f} "
                         f"/ {t['driver_peak_rss_mib']:.0f} MiB, process wall {s['wall_seconds']} / "
                         f"{t['wall_seconds']} s, stream {s['phases']['stream']['seconds']:.1f} / "
                         f"{t['phases']['stream']['seconds']:.1f} s")
    lines += [
        "",
        "s: wall seconds in the phase (summed where the job enters it more than once: totals twice "
        "when copies are removed). peak MiB: the driver's own peak RSS while in the phase (VmHWM, "
        "reset as each phase starts). +MiB: that peak less the RSS the phase started with.",
        "phases: open manifest (list, schema, columns); check options (model, --out); start Ray; "
        "resume: partitions done (provenance, commit records, removal of uncommitted shards); scan "
        "ids (scan_ids, on the cluster); plan (rows pending, counter, ledger, schema, sink, the Ray "
        "Data plan); stream (the plan running); totals (output_totals); duplicates "
        "(remove_duplicate_rows, only for shards of no partition); summary; load into "
        "LanceDB (load_outputs less the index); index build (index_table); start / end / other: "
        "between those.",
    ]
    load = report.get("load_average_before")
    if load is not None and load > m["cores"] / 2:
        lines.append(f"warning: the machine was busy before the run (1-minute load average {load:.1f} on "
                     f"{m['cores']} cores): other work skews the times (not the memory).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--rows", type=int, nargs="*", default=[200_000, 1_000_000],
                        help="manifest sizes of the phases run (none: skip it)")
    parser.add_argument("--dim", type=int, default=768, help="vector dimension of the outputs")
    parser.add_argument("--rows-per-shard", type=int, default=10_000, help="as altclip embed's")
    parser.add_argument("--manifest-file-rows", type=int, default=100_000, help="rows per manifest file")
    parser.add_argument("--republished-shards", type=int, default=1,
                        help="shards published twice, for the duplicate removal (0: none, it does not run)")
    parser.add_argument("--load-max-rows", type=int, default=None,
                        help="above this many rows, no --db: no load, no index (disk: a table is a copy)")
    parser.add_argument("--e2e-rows", type=int, default=10_000, help="rows of the end-to-end runs (0: none)")
    parser.add_argument("--e2e-rows-per-shard", type=int, default=None, help="[e2e rows / 20]")
    parser.add_argument("--no-real", action="store_true", help="no end-to-end run with the tiny model")
    parser.add_argument("--workdir", default=None, help="where the data goes [a new temporary folder]")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, logs)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(WORKERS, args.worker, args.params, args.result)
        return
    if any(r < 2 for r in args.rows) or args.dim < 1 or args.rows_per_shard < 1 or args.e2e_rows < 0:
        parser.error("--rows (at least 2), --dim and --rows-per-shard must be positive")
    if not os.path.exists("/proc/self/clear_refs"):
        parser.error("reads and resets process memory through /proc: Linux only")
    exit_on_sigterm()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    from importlib.metadata import version

    model_dir = corpus.model_dir("tiny")
    machine = {**corpus.machine("cpu"), "lancedb": version("lancedb"), "pyarrow": version("pyarrow")}
    report = {"load_average_before": os.getloadavg()[0], "machine": machine, "code": _tree_state(),
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "params", "result")},
              "phases": [], "scaling": {}}
    workdir = args.workdir or tempfile.mkdtemp(prefix="altclip-bench-scale-")
    os.makedirs(workdir, exist_ok=True)
    try:
        check_disk(args, workdir)
        # Smallest first: the figures of the small sizes come before the long runs.
        for rows in sorted(set(args.rows)):
            report["phases"].append(run_phases(rows, args, model_dir, workdir, log))
            report["scaling"] = _scaling(report)
            _save(report, args.json)  # so far: a later size that fails leaves these
        if args.e2e_rows:
            report["e2e"] = run_e2e(args, model_dir, workdir, log,
                                    lambda partial: _save({**report, "e2e": partial}, args.json))
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(_text(report), flush=True)
    if args.json:
        _save(report, args.json)
        log(f"report: {args.json}")


def _tree_state() -> dict:
    """The code measured: the commit, and the files changed in the working tree (read-only: no
    lock taken, the index is not refreshed)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, env=env, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "changed": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def _save(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
