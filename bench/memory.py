"""Peak memory of `altclip embed` as the row count grows: a streaming job should stay flat.

    python -m bench.memory --rows 10000 50000 100000 [--batch-size N] [--dtype D] [--json OUT.json]

Each run embeds (tiny model, both towers) a manifest of N rows over 50 small PNGs reused by path,
so disk use stays small while every row is still read, decoded, tokenized, embedded and written.
The job runs as its own process; its whole process tree (driver, and the Ray processes it starts:
GCS, raylet, workers, actors) is sampled every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from bench import corpus
from bench.proctree import MIB, PSS_EVERY, exit_on_sigterm, run_measured

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(rows: int, model_dir: str, workdir: str, interval: float, extra: list[str]) -> dict:
    manifest = corpus.small_image_corpus(rows)
    out = os.path.join(workdir, f"out-{rows}")
    command = [sys.executable, "-m", "jobs.cli", "embed", manifest, "--out", out,
               "--model", model_dir, "--towers", "image,text", *extra]
    finished = run_measured(command, os.path.join(workdir, f"embed-{rows}.log"),
                            interval=interval, cwd=REPO, env=corpus.fresh_ray_env())
    if finished.returncode != 0:
        raise SystemExit(f"altclip embed ({rows} rows) failed, exit {finished.returncode}:\n"
                         f"{finished.log[-4000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    if summary["rows_embedded"] != rows or summary["image_ok"] != rows or summary["text_ok"] != rows:
        print(f"warning: {rows} rows: embedded {summary['rows_embedded']}, image vectors "
              f"{summary['image_ok']}, text vectors {summary['text_ok']}; errors "
              f"{summary['errors_by_kind']}", file=sys.stderr)
    # The outputs are not what is measured; drop them so that large runs do not fill the disk.
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows": rows,
        "rows_embedded": summary["rows_embedded"],
        "wall_seconds": round(finished.wall_seconds, 2),
        "summary_rows_per_second": summary["rows_per_second"],
        "driver_peak_rss_mib": round((finished.peak_rss or 0) / MIB, 1),
        "tree": finished.tree.to_dict(),
    }


def _table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"altclip embed peak memory: tiny model, towers image,text, {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']} GiB; ray {m['ray']}, torch {m['torch']}",
        "",
        f"{'rows':>9}{'wall s':>9}{'rows/s':>9}{'driver RSS':>12}{'tree RSS sum':>14}"
        f"{'tree PSS sum':>14}{'sum of peaks':>14}{'processes':>11}{'samples':>9}",
    ]
    for r in report["runs"]:
        t = r["tree"]
        lines.append(f"{r['rows']:>9}{r['wall_seconds']:>9.1f}{r['summary_rows_per_second']:>9.1f}"
                     f"{r['driver_peak_rss_mib']:>8.0f} MiB{t['peak_rss_sum_mib']:>10.0f} MiB"
                     f"{t['peak_pss_sum_mib']:>10.0f} MiB{t['sum_of_process_peak_rss_mib']:>10.0f} MiB"
                     f"{t['peak_processes']:>11}{t['samples']:>9}")
    ratios = report["ratios"]
    lines += [
        "",
        f"largest / smallest peak over the row counts: tree RSS sum {ratios['tree_rss_sum']}, "
        f"tree PSS sum {ratios['tree_pss_sum']}, sum of peaks {ratios['sum_of_peaks']}, "
        f"driver RSS {ratios['driver_rss']}",
        "",
        "driver RSS: the `altclip embed` process's own peak (VmHWM). tree: the largest sum, over "
        "one sample, of the memory of the driver and every process below it, sampled from /proc "
        f"every {report['interval_s']} s (PSS every {PSS_EVERY} samples); RSS counts pages "
        "shared between processes (Ray's object store, libraries) once per process, PSS divides "
        "them among the processes. sum of peaks: each process's own peak (VmHWM), summed, an "
        "upper bound.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=None, help="passed to altclip embed")
    parser.add_argument("--dtype", default=None, help="passed to altclip embed")
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if not os.path.isdir("/proc"):
        parser.error("reads process memory from /proc: Linux only")
    extra = []
    if args.batch_size:
        extra += ["--batch-size", str(args.batch_size)]
    if args.dtype:
        extra += ["--dtype", args.dtype]

    model_dir = corpus.model_dir("tiny")
    report = {"model_dir": model_dir, "interval_s": args.interval, "embed_options": extra,
              "machine": corpus.machine("as altclip embed picks"), "runs": []}
    workdir = tempfile.mkdtemp(prefix="altclip-bench-memory-")
    try:
        for rows in sorted(set(args.rows)):
            print(f"{rows} rows ...", file=sys.stderr, flush=True)
            report["runs"].append(measure(rows, model_dir, workdir, args.interval, extra))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def ratio(values):
        return round(max(values) / min(values), 3) if min(values) else None

    runs = report["runs"]
    report["ratios"] = {
        "tree_rss_sum": ratio([r["tree"]["peak_rss_sum_mib"] for r in runs]),
        "tree_pss_sum": ratio([r["tree"]["peak_pss_sum_mib"] for r in runs]),
        "sum_of_peaks": ratio([r["tree"]["sum_of_process_peak_rss_mib"] for r in runs]),
        "driver_rss": ratio([r["driver_peak_rss_mib"] for r in runs]),
    }
    print(_table(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
