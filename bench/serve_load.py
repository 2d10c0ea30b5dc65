"""`altclip serve` under load: requests/s and p50/p99 latency of text searches and thumbnails
with many concurrent clients, each on its own keep-alive connection.

    python -m bench.serve_load --build DIR [--rows 500]     # tiny model + a table in DIR/db
    altclip serve DIR/db --quiet &
    python -m bench.serve_load --url http://127.0.0.1:8000 [--clients 50] [--seconds 20]
                               [--workload text thumbnail] [--json OUT.json]

- `text`: GET /api/search?text=...&k=24, the text cycling through captions in twelve languages:
  a tokenize, a pass through the text tower and a vector search each.
- `thumbnail`: GET /api/thumbnail/ID?size=256 over every row's id in turn. Each id is requested
  once before the clock starts, so what is timed is the server's cached path (the row looked up
  in the table, the JPEG from the server's cache), as a page shown to many people gets it.

The clients are threads of this process (the standard library's http.client), so on a small
machine they take cores from the server: compare figures measured on the same machine, one after
the other, and note its load (printed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

QUERIES = [
    "a photo of a cat", "una foto de un gato en la nieve", "ein Hund im Schnee bei Nacht",
    "кошка в снегу", "صورة قطة في الليل", "一只猫的照片", "猫の写真", "고양이의 사진",
    "μια γάτα στο χιόνι", "a red car parked in the mountains at night", "deux enfants", "एक बिल्ली",
]
LANGS = ("en", "es", "de")


# --------------------------------------------------------------------------------- the table


def build(folder: str, rows: int) -> None:
    """A tiny random-weight model and a table of `rows` generated JPEGs, through the CLI."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    altclip = [sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())"]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    subprocess.run([*altclip, "make-test-model", os.path.join(folder, "model")], check=True)
    rng = np.random.default_rng(0)
    manifest = []
    for i in range(rows):
        y, x = np.mgrid[0:480, 0:640]
        phase = rng.integers(0, 255, 3)
        pixels = np.stack([(x + phase[0]) % 256, (y + phase[1]) % 256,
                           ((x + y) // 2 + phase[2]) % 256], axis=-1)
        noise = rng.integers(0, 30, pixels.shape)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, name), quality=85)
        manifest.append({"id": f"row-{i:05d}", "image": name, "caption": QUERIES[i % len(QUERIES)],
                         "lang": LANGS[i % len(LANGS)], "rank": i})
    pq.write_table(pa.Table.from_pylist(manifest), os.path.join(folder, "manifest.parquet"))
    subprocess.run([*altclip, "embed", os.path.join(folder, "manifest.parquet"), "--out",
                    os.path.join(folder, "out"), "--model", os.path.join(folder, "model"),
                    "--db", os.path.join(folder, "db"), "--dtype", "float32"], check=True)
    print(f"table of {rows} rows in {folder}/db: altclip serve {folder}/db --quiet")


# ---------------------------------------------------------------------------------- the load


class Client:
    """One keep-alive connection; reconnects after a failure."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.connection = None

    def get(self, path: str) -> int:
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
            try:
                self.connection.request("GET", path)
                response = self.connection.getresponse()
                response.read()
                if response.will_close:
                    self.close()
                return response.status
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_load(host: str, port: int, paths: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads requesting `paths` in turn for `seconds`; latencies of what finished."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures = [0]
    lock = threading.Lock()
    start = threading.Event()
    deadline = [0.0]

    def worker(offset: int):
        client = Client(host, port)
        mine, seen, failed = [], {}, 0
        start.wait()
        i = offset
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            try:
                status = client.get(paths[i % len(paths)])
            except (ConnectionError, http.client.HTTPException, OSError):
                failed += 1
            else:
                mine.append(time.perf_counter() - began)
                seen[status] = seen.get(status, 0) + 1
            i += 1
        client.close()
        with lock:
            latencies.extend(mine)
            failures[0] += failed
            for status, n in seen.items():
                statuses[status] = statuses.get(status, 0) + n

    threads = [threading.Thread(target=worker, args=(n * 7,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latencies.sort()

    def quantile(q: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

    ok = statuses.get(200, 0)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies),
            "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "connection_failures": failures[0],
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": quantile(0.50), "p99_ms": quantile(0.99),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def workload_paths(client: Client, workload: str) -> list[str]:
    if workload == "text":
        return [f"/api/search?{urllib.parse.urlencode({'text': q, 'k': 24})}" for q in QUERIES]
    connection = http.client.HTTPConnection(client.host, client.port, timeout=120)
    connection.request("GET", "/api/search?" + urllib.parse.urlencode({"text": "x", "k": 200}))
    response = connection.getresponse()
    hits = json.loads(response.read())["hits"]
    connection.close()
    paths = [f"{hit['thumbnail']}?size=256" for hit in hits]
    for path in paths:  # each thumbnail read and cached once before the clock starts
        status = client.get(path)
        if status != 200:
            raise SystemExit(f"GET {path}: {status}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", metavar="DIR", help="make the model and the table in DIR, then exit")
    parser.add_argument("--rows", type=int, default=500, help="rows of the table --build makes")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="per workload")
    parser.add_argument("--workload", nargs="+", choices=["text", "thumbnail"],
                        default=["text", "thumbnail"])
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.rows)
        return
    url = urllib.parse.urlsplit(args.url)
    host, port = url.hostname, url.port or 80
    warm = Client(host, port)
    results = {"url": args.url, "cores": len(os.sched_getaffinity(0)), "workloads": {}}
    for workload in args.workload:
        paths = workload_paths(warm, workload)
        for path in paths[:3]:  # warm the route (and, for text, the text tower)
            warm.get(path)
        load_before = os.getloadavg()[0]
        result = run_load(host, port, paths, args.clients, args.seconds)
        result["load_average_before"] = round(load_before, 2)
        results["workloads"][workload] = result
        print(f"{workload:9s} {result['clients']} clients {result['seconds']:5.1f} s: "
              f"{result['requests_per_s']:7.1f} req/s  p50 {result['p50_ms']} ms  "
              f"p99 {result['p99_ms']} ms  statuses {result['statuses']}  "
              f"failed connections {result['connection_failures']}  "
              f"(load average before {load_before:.2f})", flush=True)
    warm.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
