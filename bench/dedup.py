"""Near-duplicate marking (`altclip dedup`) on a large table: time, peak memory and recall of
planted near-duplicates, for a full run and for an incremental run after new rows arrive.

The vectors are shaped like CLIP image embeddings (bench/query.py's `clustered` set: a shared
direction, rows/100 topics, unrelated items at cosine ~0.37, items of a topic ~0.74). Planted:
1% of the rows get a near-copy at a cosine drawn uniformly from 0.95 to 0.995 (re-encodes,
resizes, light crops), 0.5% an exact copy (the same vector under another id). Each copy's id
sorts after its original's, so with `--keep first` a copy is found when its `dup_of` is its
original. The incremental run adds `--new-rows` rows (the same share of copies, of old rows and
of each other), after the table's vector index is built as `load` builds it.

    python -m bench.dedup --rows 1000000 [--dim 768] [--new-rows 1000] [--json OUT.json]
                          [--variant GUEST_MARGIN=0 ...]

`--variant` adds a full run with some of the constants of pipeline/table/dedup.py and
near_duplicates.py changed, on the same table (the figures behind their comments: KMEANS_SAMPLE,
GUEST_MARGIN, CLUSTER_ROWS).

Each dedup runs in a child process of its own, so its peak RSS is its own (VmHWM); `baseline`
is the same child stopping after its imports and opening the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from bench.query import Clustered
from schemas.embeddings import HEIGHT, IMAGE_EMBEDDING, TEXT_EMBEDDING, WIDTH

NEAR_SHARE, EXACT_SHARE = 0.01, 0.005
NEAR_COSINES = (0.95, 0.995)


def _near(rng, vectors: np.ndarray, cosines: np.ndarray) -> np.ndarray:
    """Unit vectors at exactly `cosines` to `vectors` (a random direction orthogonal to each)."""
    noise = rng.standard_normal(vectors.shape, dtype=np.float32)
    noise -= np.einsum("ij,ij->i", noise, vectors)[:, None] * vectors
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    out = cosines[:, None] * vectors + np.sqrt(1 - cosines[:, None] ** 2) * noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _rows(rng, draw, prefix: str, count: int, old: dict | None = None):
    """`count` originals plus their planted copies; -> (ids, vectors, {copy id: original id})."""
    ids = [f"{prefix}{i:08d}" for i in range(count)]
    vectors = draw(count)
    near = rng.choice(count, int(count * NEAR_SHARE), replace=False)
    exact = rng.choice(count, int(count * EXACT_SHARE), replace=False)
    planted, copy_ids, copies = {}, [], []
    for kind, chosen in (("near", near), ("exact", exact)):
        source = vectors[chosen]
        if kind == "near":
            source = _near(rng, source, rng.uniform(*NEAR_COSINES, len(chosen)).astype(np.float32))
        for i in chosen:
            copy_ids.append(f"{ids[i]}-{kind}")
            planted[copy_ids[-1]] = ids[i]
        copies.append(source)
    if old:  # new rows may copy old ones too: the incremental run must look in the table
        olds = rng.choice(len(old["ids"]), int(count * NEAR_SHARE), replace=False)
        cosines = rng.uniform(*NEAR_COSINES, len(olds)).astype(np.float32)
        copies.append(_near(rng, old["vectors"][olds], cosines))
        for i in olds:
            copy_ids.append(f"{old['ids'][i]}-{prefix}copy")
            planted[copy_ids[-1]] = old["ids"][i]
    return ids + copy_ids, np.concatenate([vectors] + copies), planted


def _batch(ids: list[str], vectors: np.ndarray) -> pa.RecordBatch:
    n, dim = vectors.shape
    return pa.RecordBatch.from_pydict({
        "id": ids, "caption": [f"caption {i}" for i in ids],
        WIDTH: pa.array(np.full(n, 640), pa.int32()), HEIGHT: pa.array(np.full(n, 480), pa.int32()),
        IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        TEXT_EMBEDDING: pa.nulls(n, pa.list_(pa.float32(), dim))})


def build(folder: str, rows: int, dim: int, seed: int = 0):
    """The table, written in batches; -> (planted pairs, some original rows for new rows to
    copy, the vector source, the random generator)."""
    import lancedb

    rng = np.random.default_rng(seed)
    draw = Clustered(rng, rows, dim)
    per = 50_000
    originals = round(rows / (1 + NEAR_SHARE + EXACT_SHARE))
    planted, keep = {}, {"ids": [], "vectors": []}

    def batches():
        for start in range(0, originals, per):
            ids, vectors, found = _rows(rng, draw, f"r{start // per:03d}-", min(per, originals - start))
            planted.update(found)
            keep["ids"].extend(ids[:200])
            keep["vectors"].append(vectors[:200])
            yield _batch(ids, vectors)

    schema = _batch(["x"], np.zeros((1, dim), np.float32)).schema
    lancedb.connect(folder).create_table(
        "embeddings", data=pa.RecordBatchReader.from_batches(schema, batches()), on_bad_vectors="null")
    keep["vectors"] = np.concatenate(keep["vectors"])
    return planted, keep, draw, rng


def _child(args) -> None:
    """One dedup in this process (`--set` overriding constants of pipeline.table.dedup or of
    pipeline.table.near_duplicates, whichever holds the name); prints its result and this
    process's peak RSS."""
    import pipeline.table.dedup as dedup
    import pipeline.table.near_duplicates as near_duplicates
    from pipeline.table.store import open_table

    for name, value in (pair.split("=") for pair in args.set):
        module = near_duplicates if hasattr(near_duplicates, name) else dedup
        setattr(module, name, type(getattr(module, name))(value))
    started = time.perf_counter()
    if args.child == "baseline":
        open_table(args.db, "embeddings").count_rows()
        result = {}
    else:
        result = dedup.dedup_table(dedup.DedupConfig(db=args.db, full=args.child == "full"))
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result))


def _peak_rss_mib() -> int:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`, which Linux carries over an exec from
    the process that forked the child: the parent's peak would read as the child's."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return round(kib / 1024)


def _run_child(db: str, mode: str, overrides: list[str] = ()) -> dict:
    command = [sys.executable, "-m", "bench.dedup", "--child", mode, "--db", db]
    out = subprocess.run(command + [a for o in overrides for a in ("--set", o)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{mode} {' '.join(overrides)}: {result}", file=sys.stderr, flush=True)
    return result


def _recall(db: str, planted: dict) -> dict:
    """Planted copies whose dup_of is their original; rows marked that are not planted copies."""
    import lancedb

    table = lancedb.connect(db).open_table("embeddings")
    marked = table.search().where("dup_of IS NOT NULL").select(["id", "dup_of"]).limit(None).to_arrow()
    found = dict(zip(marked.column("id").to_pylist(), marked.column("dup_of").to_pylist()))
    by_kind = {}
    for kind in ("near", "exact", "copy"):
        pairs = {c: o for c, o in planted.items() if c.endswith(kind)}
        if pairs:
            by_kind[kind] = round(sum(found.get(c) == o for c, o in pairs.items()) / len(pairs), 5)
    hits = sum(found.get(copy) == original for copy, original in planted.items())
    return {"planted": len(planted), "recall": round(hits / max(1, len(planted)), 5),
            "recall_by_kind": by_kind, "marked": len(found),
            "false_marks": sum(1 for c in found if c not in planted)}


def _full(folder: str, planted: dict, baseline: dict, rows: int, overrides: list[str] = ()) -> dict:
    report = _run_child(folder, "full", overrides)
    report.update(_recall(folder, planted), overrides=list(overrides))
    report["peak_over_baseline_mib"] = report["peak_rss_mib"] - baseline["peak_rss_mib"]
    report["bytes_per_row_over_baseline"] = round(report["peak_over_baseline_mib"] * 2**20 / rows)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--new-rows", type=int, default=1000,
                        help="rows added for the incremental run; 0: no index, no incremental run")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="also a full run with dedup's constants changed (repeatable)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the table's folder")
    parser.add_argument("--child", choices=["baseline", "full", "incremental"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    from pipeline.table.store import open_table

    folder = tempfile.mkdtemp(prefix="bench-dedup-")
    try:
        started = time.perf_counter()
        planted, old, draw, rng = build(folder, args.rows, args.dim)
        rows = open_table(folder, "embeddings").count_rows()
        report = {"rows": rows, "dim": args.dim, "build_seconds": round(time.perf_counter() - started, 1)}
        report["baseline"] = _run_child(folder, "baseline")
        report["full"] = _full(folder, planted, report["baseline"], rows)
        report["variants"] = [_full(folder, planted, report["baseline"], rows, v.split(","))
                              for v in args.variant]
        if args.new_rows:
            report["incremental"] = _incremental(folder, args.new_rows, planted, old, draw, rng,
                                                 report["baseline"])
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _incremental(folder: str, new_rows: int, planted: dict, old: dict, draw, rng, baseline: dict) -> dict:
    """New rows after the table is indexed as `load` indexes it, then an incremental run."""
    from pipeline.table.indexes import index_table
    from pipeline.table.store import open_table

    started = time.perf_counter()
    index_table(open_table(folder, "embeddings"))  # opened again: the children changed the table
    index_seconds = round(time.perf_counter() - started, 1)
    print(f"index built in {index_seconds} s", file=sys.stderr, flush=True)
    ids, vectors, new_planted = _rows(rng, draw, "n-", new_rows, old)
    marks = {"dup_of": pa.string(), "dup_score": pa.float32(), "dup_checked": pa.bool_()}
    new = pa.Table.from_batches([_batch(ids, vectors)])
    for name, kind in marks.items():
        new = new.append_column(name, pa.nulls(len(ids), kind))
    open_table(folder, "embeddings").add(new)
    report = _run_child(folder, "incremental")
    report.update(_recall(folder, {**planted, **new_planted}), index_seconds=index_seconds,
                  new_rows=len(ids), new_planted=len(new_planted),
                  new_recall=_recall(folder, new_planted)["recall"])
    report["peak_over_baseline_mib"] = report["peak_rss_mib"] - baseline["peak_rss_mib"]
    return report


if __name__ == "__main__":
    main()
