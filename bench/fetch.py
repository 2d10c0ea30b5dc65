"""Web images fetched and decoded: `altclip embed` against img2dataset on the same URLs and cores,
in one run. A local server answers each image after a latency (the web's round trip), with a
slow tail, from 16 loopback addresses (hosts); both tools' whole processes are timed.

    python -m bench.fetch [--rows 3000] [--latency-ms 250] [--slow 0.05] [--silent 0.01]
                          [--img2dataset PATH] [--preprocess exact fast] [--timeout 10]

`--img2dataset` is the img2dataset command of an environment it is installed in (it is not one
of the project's dependencies): `python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install
img2dataset==1.47.0`, then `--img2dataset /tmp/i2d/bin/img2dataset`. Both tools get the same
per-attempt timeout (`--timeout`); img2dataset tries each URL once (its default), ours up to 4
times, so a URL that never answers costs ours more.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HOSTS = [f"127.0.0.{n}" for n in range(1, 17)]


def make_images(folder: str, rows: int) -> None:
    """JPEGs of 320-1280 px a side, each its own bytes (no tool can reuse another's work)."""
    rng = np.random.default_rng(0)
    for n in range(rows):
        path = f"{folder}/{n:06d}.jpg"
        if os.path.exists(path):
            continue
        width, height = (int(v) for v in rng.integers(320, 1281, 2))
        small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(path, quality=85)


def serve(folder: str, port: int, latency_s: float, slow: float, silent: float, ready) -> None:
    """The image server (its own process): each answer after `latency_s`; a `slow` share of the
    images after 2 s, a `silent` share never (the connection held open until the client goes)."""

    class Images(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            name = self.path.lstrip("/").split("?")[0]
            draw = random.Random(name).random()
            if draw < silent:
                time.sleep(120)
                return
            time.sleep(2.0 if draw < silent + slow else latency_s)
            try:
                with open(f"{folder}/{name}", "rb") as f:
                    body = f.read()
            except OSError:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # listen()'s backlog: hundreds of fetches connect at once
        daemon_threads = True

    servers = []
    for host in HOSTS:
        server = Server((host, port), Images)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    ready.set()
    threading.Event().wait()


def timed(command: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=250)
    parser.add_argument("--slow", type=float, default=0.05, help="share of images answered after 2 s")
    parser.add_argument("--silent", type=float, default=0.01, help="share of images never answered")
    parser.add_argument("--timeout", type=float, default=10, help="seconds per attempt, both tools")
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset"))
    parser.add_argument("--preprocess", nargs="+", default=["exact"], choices=["exact", "fast"])
    parser.add_argument("--model", default=None, help="model folder [a tiny random one]")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-fetch"))
    args = parser.parse_args()
    if not args.img2dataset:
        sys.exit("img2dataset is not installed here: pass --img2dataset PATH (see --help)")

    os.makedirs(f"{args.work}/images", exist_ok=True)
    make_images(f"{args.work}/images", args.rows)
    model = args.model or f"{args.work}/tiny"
    if not os.path.exists(f"{model}/config.json"):
        subprocess.run([sys.executable, "-m", "jobs.cli", "make-test-model", model], check=True,
                       capture_output=True)
    port = free_port_on_every_host()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, daemon=True, args=(
        f"{args.work}/images", port, args.latency_ms / 1000, args.slow, args.silent, ready))
    server.start()
    ready.wait(30)
    urls = [f"http://{HOSTS[n % len(HOSTS)]}:{port}/{n:06d}.jpg" for n in range(args.rows)]
    manifest = f"{args.work}/urls.parquet"
    pq.write_table(pa.table({"id": [f"r{n:06d}" for n in range(args.rows)], "url": urls,
                             "caption": [f"photo number {n}" for n in range(args.rows)]}), manifest)

    results = {}
    out = f"{args.work}/i2d"
    shutil.rmtree(out, ignore_errors=True)
    seconds, _ = timed([args.img2dataset, "--url_list", manifest, "--input_format", "parquet",
                        "--url_col", "url", "--caption_col", "caption", "--output_format", "files",
                        "--output_folder", out, "--processes_count", str(os.cpu_count()),
                        "--thread_count", "64", "--image_size", "224", "--resize_mode", "center_crop",
                        "--timeout", str(args.timeout), "--enable_wandb", "False"])
    ok = sum(json.load(open(p))["successes"] for p in glob.glob(f"{out}/*_stats.json"))
    results["img2dataset"] = (seconds, ok)
    altclip = os.path.join(os.path.dirname(sys.executable), "altclip")
    for mode in args.preprocess:
        out = f"{args.work}/ours-{mode}"
        seconds, _ = timed([altclip, "embed", manifest, "--image-col", "url", "--out", out, "--overwrite",
                            "--model", model, "--dtype", "float32", "--allow-private-urls", "--quiet",
                            "--preprocess", mode, "--fetch-timeout", str(args.timeout)])
        summary = json.load(open(f"{out}/summary.json"))
        results[f"altclip embed ({mode})"] = (seconds, summary["image_ok"], summary)
    server.terminate()

    base_seconds, base_ok = results["img2dataset"][:2]
    print(f"{args.rows} URLs from {len(HOSTS)} hosts, {args.latency_ms:g} ms a round trip, "
          f"{args.slow:.0%} at 2 s, {args.silent:.0%} never; {os.cpu_count()} cores")
    print(f"{'':24} {'whole process s':>16} {'images':>7} {'images/s':>9} {'x img2dataset':>14}")
    for name, (seconds, ok, *rest) in results.items():
        rate = ok / seconds
        print(f"{name:24} {seconds:16.1f} {ok:7d} {rate:9.1f} {rate / (base_ok / base_seconds):14.2f}")
        if rest:
            summary = rest[0]
            busy = summary.get("stage_busy_seconds", {})
            print(f"{'':24} first row {summary.get('seconds_to_first_row')} s; busy s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in busy.items()))


def free_port_on_every_host() -> int:
    import socket

    while True:
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in HOSTS[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue


if __name__ == "__main__":
    main()
