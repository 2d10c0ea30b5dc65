"""Rows/s of `altclip embed` from S3 against the same corpus from local files, in one run:
moto's S3 server on 127.0.0.1 stands in for the object store.

    python -m bench.storage [--rows 200] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--model", default=None, help="model folder [a tiny random one]")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    work = tempfile.mkdtemp(prefix="bench-storage-")
    model = args.model or os.path.join(work, "tiny")
    if args.model is None:
        subprocess.run([sys.executable, "-m", "jobs.cli", "make-test-model", model], check=True,
                       capture_output=True)
    rng = np.random.default_rng(0)
    os.makedirs(f"{work}/corpus/images")
    rows = []
    for n in range(args.rows):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(
            f"{work}/corpus/images/{n:05d}.jpg", quality=90)
        rows.append({"id": f"r{n:05d}", "image": f"images/{n:05d}.jpg", "caption": f"photo {n}"})
    pq.write_table(pa.Table.from_pylist(rows), f"{work}/corpus/manifest.parquet")

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="bench", secret="bench")
    fs.mkdir("corpus")
    fs.mkdir("out")
    fs.put(f"{work}/corpus", "corpus/c", recursive=True)

    results = {}
    for name, manifest, out in (
        ("local", f"{work}/corpus/manifest.parquet", f"{work}/out-local"),
        ("s3", "s3://corpus/c/manifest.parquet", "s3://out/run"),
    ):
        subprocess.run([sys.executable, "-m", "jobs.cli", "embed", manifest, "--out", out,
                        "--model", model, "--quiet"], check=True, env=env)
        summary = json.loads(fs.cat("out/run/summary.json") if name == "s3"
                             else open(f"{out}/summary.json").read())
        results[name] = summary
    server.stop()
    print(f"{args.rows} rows of 640x480 JPEG, tiny model (I/O-bound), one process each")
    for name, s in results.items():
        print(f"{name:6} {s['rows_per_second']:8.2f} rows/s  ({s['seconds_total']:.1f} s, "
              f"decode busy {s['stage_busy_seconds'].get('decode', 0):.1f} s)")
    print(f"s3/local: {results['s3']['rows_per_second'] / results['local']['rows_per_second']:.2f}")


if __name__ == "__main__":
    main()
