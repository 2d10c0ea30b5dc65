"""How close `altclip embed --plan` comes to the run it projects: the plan, then the real run, on
one corpus, and projected against actual wall time, rows/s and output bytes.

    python -m bench.plan_check [--config tiny|base|full] [--rows 2000] [--plan-rows N]
                               [--batch-size 64] [--dtype auto] [--vector-dtype float32]
                               [--json OUT.json] [--keep]

The corpus: N JPEGs sized like a web corpus (0.25 to 2.5 megapixels, log-uniform, photo aspect
ratios, about 2 bits per pixel: a few hundred KB each) with multilingual captions, generated once
and cached beside the throughput corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from bench import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB_CORPUS_VERSION = "v1"
MIN_MEGAPIXELS, MAX_MEGAPIXELS = 0.25, 2.5
JPEG_QUALITY = 85
_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3)
_NOISE = 12  # as bench.corpus: ~2 bits per pixel, the size of a web photo


def _web_photo(args: tuple[int, str]) -> int:
    """Image `index`: smooth colour + mid-scale blotches + noise (bench.corpus's recipe) at a web
    photo's size, saved as JPEG (write, then rename)."""
    from PIL import Image

    index, path = args
    if os.path.exists(path):
        return 0
    rng = np.random.default_rng([4, index])
    megapixels = math.exp(rng.uniform(math.log(MIN_MEGAPIXELS), math.log(MAX_MEGAPIXELS)))
    aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
    width = max(1, round(math.sqrt(megapixels * 1e6 * aspect)))
    height = max(1, round(megapixels * 1e6 / width))
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    coarse = coarse.resize((width, height), Image.Resampling.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (max(1, height // 64), max(1, width // 64), 3),
                                       dtype=np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) * 3 // 4 + np.asarray(mid, dtype=np.int16) // 4
    pixels += rng.integers(-_NOISE, _NOISE + 1, pixels.shape, dtype=np.int16)
    temporary = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(temporary, "JPEG",
                                                                   quality=JPEG_QUALITY)
    os.replace(temporary, path)
    return 1


def web_corpus(rows: int, log=print) -> str:
    """Manifest of `rows` web-sized JPEGs and captions (`id`, `image`, `caption`); image i is the
    same file at every row count, so a larger corpus only generates what it lacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = corpus.bench_cache("bench-corpus", f"web-{WEB_CORPUS_VERSION}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    manifest = os.path.join(root, f"manifest-{rows}.parquet")
    relative = [f"images/{i:07d}.jpg" for i in range(rows)]
    todo = [(i, os.path.join(root, p)) for i, p in enumerate(relative)
            if not os.path.exists(os.path.join(root, p))]
    if todo:
        log(f"generating {len(todo)} JPEGs of {MIN_MEGAPIXELS}-{MAX_MEGAPIXELS} MP in {root} "
            "(once; cached) ...")
        with ProcessPoolExecutor(max_workers=min(corpus.cores(), len(todo))) as pool:
            for _ in pool.map(_web_photo, todo, chunksize=16):
                pass
    if not os.path.exists(manifest):
        table = pa.table({"id": pa.array([f"{i:07d}" for i in range(rows)], pa.string()),
                          "image": pa.array(relative, pa.string()),
                          "caption": pa.array(corpus.captions(rows), pa.string())})
        temporary = f"{manifest}.{os.getpid()}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, manifest)
    return manifest


def _altclip(args: list[str], log_path: str) -> tuple[subprocess.CompletedProcess, float]:
    """`altclip ...` as its own process with a Ray of its own; (result, wall seconds)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=log, text=True, env=corpus.fresh_ray_env())
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        with open(log_path) as f:
            raise SystemExit(f"altclip {args[0]} failed, exit {result.returncode}:\n{f.read()[-4000:]}")
    return result, seconds


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def _ratio(projected, actual):
    return round(projected / actual, 3) if projected and actual else None


def check(manifest: str, model_dir: str, options: list[str], vector_dtype: str, workdir: str) -> dict:
    """The plan, then the run it plans, on one manifest; their figures side by side."""
    out = os.path.join(workdir, "out")
    common = ["embed", manifest, "--out", out, "--model", model_dir, "--vector-dtype", vector_dtype, *options]
    planned, plan_process_seconds = _altclip([*common, "--plan", "--json"], os.path.join(workdir, "plan.log"))
    try:
        plan = json.loads(planned.stdout)
    except ValueError:
        raise SystemExit("altclip embed --plan --json printed no JSON object:\n"
                         f"{planned.stdout[:2000]}") from None
    out_untouched = not os.path.exists(out)
    # With --db the run also loads a table (after its clock stops: seconds_total leaves it out).
    db = os.path.join(workdir, "db")
    _, run_process_seconds = _altclip([*common, "--db", db, "--quiet"], os.path.join(workdir, "run.log"))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    actual_bytes = sum(os.path.getsize(os.path.join(out, name))
                       for name in os.listdir(out) if name.endswith(".parquet"))
    rows = summary["rows_embedded"]
    after_start = summary["seconds_total"] - summary["seconds_to_first_row"]
    figures = {
        # The plan projects the job's own clock (summary.json's seconds_total: Ray, the id scan,
        # the towers' start-up and every row; not the Python interpreter's start and imports).
        "wall_seconds": (plan["wall_seconds"], summary["seconds_total"]),
        "rows_per_second_whole_run": (round(plan["rows"] / plan["wall_seconds"], 2),
                                      summary["rows_per_second"]),
        "startup_seconds": (plan["startup_seconds"]["total"], summary["seconds_to_first_row"]),
        "rows_per_second_after_startup": (plan["rows_per_second"], round(rows / after_start, 2)),
        "output_bytes": (plan["output_bytes"][vector_dtype], actual_bytes),
        "table_bytes": (plan["table_bytes"][vector_dtype],
                        _folder_bytes(os.path.join(db, "embeddings.lance", "data"))),
    }
    return {
        "plan": plan, "summary": {k: summary[k] for k in ("rows_embedded", "seconds_total", "rows_per_second",
                                                           "seconds_to_first_row", "stage_busy_seconds",
                                                           "stage_rows_per_busy_second", "bottleneck")},
        "out_untouched_by_plan": out_untouched,
        "plan_process_seconds": round(plan_process_seconds, 1),
        "run_process_seconds": round(run_process_seconds, 1),
        "figures": {k: {"projected": p, "actual": a, "ratio": _ratio(p, a)} for k, (p, a) in figures.items()},
    }


def _table(report: dict) -> str:
    result, plan, summary = report["result"], report["result"]["plan"], report["result"]["summary"]
    lines = [
        f"altclip embed --plan against the run: config {report['config']}, {report['rows']} rows of "
        f"{report['corpus']['images']} web-sized JPEGs (mean {report['corpus']['megapixels_mean']} MP, "
        f"{report['corpus']['file_mib_total']} MiB), batch {plan['batch_size']}, {plan['dtype']}, "
        f"vectors {report['vector_dtype']}, {plan['sample_rows']} rows timed",
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load average "
        f"(1, 5, 15 min) before {report['load_before']}, after {report['load_after']}",
        "",
        f"{'figure':<32}{'projected':>14}{'actual':>14}{'ratio':>8}",
    ]
    for name, f in result["figures"].items():
        lines.append(f"{name:<32}{f['projected']:>14,}{f['actual']:>14,}{f['ratio'] or '-':>8}")
    lines += ["", f"{'stage':<14}{'plan rows/s/worker':>20}{'run rows/busy s':>18}"]
    for name, stage in plan["stages"].items():
        busy = summary["stage_rows_per_busy_second"].get(name)
        lines.append(f"{name:<14}{stage['rows_per_second_per_worker']:>20,}{busy or '-':>18,}")
    lines += [
        "",
        f"bottleneck: plan {plan['bottleneck']} ({plan['bottleneck_cause']}), run {summary['bottleneck']} "
        "(the stage with the most busy seconds)",
        f"start-up, plan: {plan['startup_seconds']}; run: first row out of the towers "
        f"{summary['seconds_to_first_row']} s after the job started",
        f"OUT untouched by the plan: {result['out_untouched_by_plan']}; the plan took "
        f"{result['plan_process_seconds']} s (process), the run {result['run_process_seconds']} s (process; "
        f"{summary['seconds_total']} s on the job's clock)",
        "ratio: projected / actual. wall_seconds is the job's own clock (summary.json's seconds_total),",
        "which leaves out the interpreter's start and imports (the process times above hold them);",
        "table_bytes: the data files of the table the run loaded (--db), its indexes apart.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=corpus.CONFIGS, default="tiny")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--plan-rows", type=int, default=None, help="[altclip's default]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--vector-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (outputs, logs)")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    model_dir = corpus.model_dir(args.config)
    manifest = web_corpus(args.rows, log=log)
    options = ["--batch-size", str(args.batch_size), "--dtype", args.dtype]
    if args.plan_rows is not None:
        options += ["--plan-rows", str(args.plan_rows)]
    report = {"config": args.config, "rows": args.rows, "vector_dtype": args.vector_dtype,
              "machine": corpus.machine("cpu"), "corpus": corpus.corpus_stats(manifest),
              # Other work on the machine slows plan and run alike, but not by the same amount
              # unless it stays the same while both run: the load says how busy it was.
              "load_before": [round(x, 2) for x in os.getloadavg()]}
    workdir = tempfile.mkdtemp(prefix="altclip-plan-check-")
    try:
        log(f"plan, then run: {args.rows} rows, config {args.config} ...")
        report["result"] = check(manifest, model_dir, options, args.vector_dtype, workdir)
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(_table(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
