"""The partitions' commit ledger: `OUT/_partitions/<key>.json` per partition whose rows are all
published, naming its shards and their totals. A rerun skips committed partitions and removes
every partition shard that no record names: work a killed run had in flight, or a copy a
retried write published late. The driver holds records (one per partition), never ids.
"""

from __future__ import annotations

import collections
import json
import posixpath
import uuid

from pipeline import storage
from pipeline.write.shards import add_totals, empty_totals, list_shards, shard_partition, shards_totals

RECORDS = "_partitions"  # folder of commit records under OUT


def _folder(out: str, storage_options: dict | None):
    fs, path = storage.filesystem(out, storage_options)
    return fs, f"{path.rstrip('/')}/{RECORDS}"


def read_records(out: str, storage_options: dict | None = None) -> dict[str, dict]:
    """The commit records under OUT, by partition key (read concurrently on object stores)."""
    fs, folder = _folder(out, storage_options)
    found = fs.glob(f"{folder}/*.json") if fs.exists(folder) else []
    if not found:
        return {}
    contents = fs.cat(found)
    return {posixpath.basename(p)[: -len(".json")]: json.loads(data) for p, data in contents.items()}


def write_record(out: str, key: str, record: dict, storage_options: dict | None = None,
                 patience_s: float = storage.DEFAULT_PATIENCE_S) -> None:
    """Publish a partition's record whole (write, then rename), as shards are."""
    fs, folder = _folder(out, storage_options)

    def write() -> None:
        fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{key}-{uuid.uuid4().hex}.tmp"
        with fs.open(temporary, "wb") as f:
            f.write(json.dumps(record).encode())
        fs.mv(temporary, f"{folder}/{key}.json")

    storage.patiently(write, out, patience_s)


def remove_records(out: str, storage_options: dict | None = None) -> None:
    """Delete every record (for --overwrite)."""
    fs, folder = _folder(out, storage_options)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def drop_changed(out: str, records: dict[str, dict], keys: dict[str, str],
                 storage_options: dict | None = None) -> dict[str, dict]:
    """The records still valid for the manifest's partitions (`keys`: key -> its file's URI). A
    record of a file the manifest lists that is not one of its partitions now (the file changed
    size, or is split at other rows) goes, and so do its shards: those rows are embedded again.
    Records of files the manifest no longer lists stay, as their rows do."""
    listed = set(keys.values())
    changed = {k for k, r in records.items() if k not in keys and r["path"] in listed}
    if changed:
        fs, folder = _folder(out, storage_options)
        base = out.rstrip("/")
        for key in changed:
            for name in records[key]["shards"]:
                fs.rm_file(storage.filesystem(f"{base}/{name}", storage_options)[1])
            fs.rm_file(f"{folder}/{key}.json")
    return {k: r for k, r in records.items() if k not in changed}


def remove_unlisted_shards(out: str, records: dict[str, dict],
                           storage_options: dict | None = None) -> int:
    """Delete the partition shards no record names; returns how many. Shards without a key in
    their name (written by `reembed`, or before partitions) are left as they are."""
    listed = {name for record in records.values() for name in record["shards"]}
    removed = 0
    for shard in list_shards(out, storage_options):
        name = posixpath.basename(shard)
        if shard_partition(name) is not None and name not in listed:
            fs, path = storage.filesystem(shard, storage_options)
            fs.rm_file(path)
            removed += 1
    return removed


def start_ledger(out: str, expected: dict[str, dict], storage_options: dict | None,
                 patience_s: float):
    """A PartitionLedger actor for this run (it reserves no CPU: it only keeps books)."""
    import ray

    return ray.remote(num_cpus=0)(PartitionLedger).remote(out, expected, storage_options, patience_s)


class PartitionLedger:
    """Told of every shard the write tasks publish, commits each partition the moment all of its
    rows are out. It holds the ids of the partitions in flight only (by distinct id: a write
    task Ray retries after its shard was published sends the same rows again)."""

    def __init__(self, out: str, expected: dict[str, dict], storage_options: dict | None,
                 patience_s: float):
        self.out, self.storage_options, self.patience_s = out, storage_options, patience_s
        self.expected = expected  # key -> {"path": file URI, "rows": rows its read yields}
        self.open: dict[str, dict] = {}
        self.committed: dict[str, dict] = {}
        for key, want in expected.items():
            if want["rows"] == 0:  # nothing to write: done already
                self._commit(key, {"ids": set(), "shards": [], "totals": empty_totals()})

    def written(self, key: str, shard: str, ids: list[str], totals: dict) -> list[str]:
        """Take a published shard into its partition; returns the ids among `ids` already
        published (the shard is then a copy, whole or in part, and not taken: its writer removes
        it, or rewrites it without them and reports that)."""
        if key in self.committed or key not in self.expected:
            return ids
        state = self.open.setdefault(key, {"ids": set(), "shards": [], "totals": empty_totals()})
        repeated = [i for i in ids if i in state["ids"]]
        if repeated:
            return repeated
        state["ids"].update(ids)
        state["shards"].append(shard)
        add_totals(state["totals"], totals)
        if len(state["ids"]) == self.expected[key]["rows"]:
            self._commit(key, self.open.pop(key))
        return []

    def _commit(self, key: str, state: dict) -> None:
        totals = state["totals"]
        record = {"path": self.expected[key]["path"], "rows": len(state["ids"]),
                  "shards": state["shards"], "totals": {**totals, "errors": dict(totals["errors"])}}
        write_record(self.out, key, record, self.storage_options, self.patience_s)
        self.committed[key] = record

    def outcome(self) -> tuple[dict[str, dict], dict[str, tuple[int, int]]]:
        """The records this run committed, and the partitions it did not finish (key ->
        (rows expected, rows written))."""
        unfinished = {k: (w["rows"], len(self.open[k]["ids"]) if k in self.open else 0)
                      for k, w in self.expected.items() if k not in self.committed}
        return self.committed, unfinished


def output_totals(out: str, records: dict[str, dict], storage_options: dict | None = None) -> dict:
    """Rows, vectors and errors by kind over OUT: the partitions' records added up, plus the
    footers of shards of no partition. No shard is opened for a committed partition."""
    keyless = [s for s in list_shards(out, storage_options) if shard_partition(posixpath.basename(s)) is None]
    return shards_totals(keyless, storage_options, [r["totals"] for r in records.values()])


def shards_by_partition(names: list[str]) -> dict[str, list[str]]:
    """Shard names grouped by the partition key in them (shards without one left out)."""
    grouped = collections.defaultdict(list)
    for name in names:
        key = shard_partition(name)
        if key is not None:
            grouped[key].append(name)
    return dict(grouped)

