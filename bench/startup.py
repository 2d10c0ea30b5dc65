"""How long a user waits for a command to answer, each a whole process: `-h` of every command,
a search and a SQL query on a small table, and an embed rerun with nothing to do.

    python -m bench.startup [--repeat 3] [--work DIR]

Builds the demo's corpus, outputs and table once (`altclip demo`, the tiny model of random
weights where BAAI/AltCLIP cannot be loaded), then runs each command `--repeat` times and prints
the fastest, median and slowest run beside the time the project means it to answer in (met:
the median is under it). The machine's load average before and after is printed: other work
moves every figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from bench.fetch import timed
from jobs.cli import COMMANDS

# Seconds a user should wait at most, on an idle 2-core machine.
HELP_S = 1.0
QUERY_S = 5.0
NOTHING_TO_DO_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-startup"))
    args = parser.parse_args()
    altclip = os.path.join(os.path.dirname(sys.executable), "altclip")
    demo = os.path.join(args.work, "demo")
    shutil.rmtree(demo, ignore_errors=True)
    subprocess.run([altclip, "demo", "--workdir", demo], check=True, capture_output=True)
    model = os.path.join(demo, "tiny-random-model")
    embed = [altclip, "embed", f"{demo}/corpus/manifest.parquet", "--out", f"{demo}/out"]
    if os.path.isdir(model):
        embed += ["--model", model]
    db = f"{demo}/db"
    cases = [("altclip -h", [altclip, "-h"], HELP_S)]
    cases += [(f"altclip {name} -h", [altclip, name, "-h"], HELP_S) for name in sorted(COMMANDS)]
    cases += [
        ("search --text (36-row table)", [altclip, "search", db, "--text", "un círculo rojo", "--k", "3"], QUERY_S),
        ("sql (36-row table)", [altclip, "sql", db, "SELECT lang, count(*) FROM embeddings GROUP BY lang"], QUERY_S),
        ("embed, nothing to do", embed, NOTHING_TO_DO_S),
    ]
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.2f} before; {args.repeat} runs each")
    print(f"{'command':34} {'fastest s':>10} {'median s':>9} {'slowest s':>10} {'target s':>9}  met")
    for name, command, target in cases:
        runs = sorted(timed(command)[0] for _ in range(args.repeat))
        median = runs[len(runs) // 2]
        met = "yes" if median < target else "no"
        print(f"{name:34} {runs[0]:10.2f} {median:9.2f} {runs[-1]:10.2f} {target:9.1f}  {met}")
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
