"""Partitions as the unit of work and resume: the id scan on the cluster, the read by plan, the
ledger's commits, and whole jobs over manifests whose files change, repeat ids, or are redone."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, EmbedConfig
from pipeline.ids import scan_ids
from pipeline.manifest import open_manifest
from pipeline.partitions import (PartitionLedger, drop_changed, read_records, remove_unlisted_shards,
                                 write_record)
from pipeline.plan import manifest_rows
from pipeline.writer import list_shards, output_totals, shard_partition, write_shard
from schemas.manifest import PARTITION
from tests.conftest import altclip, read_output
from tests.corpus import odd_images


def _write(folder, fmt: str, name: str, ids: list) -> None:
    """A manifest file of rows with these ids (None and "" among them), captions naming the row."""
    rows = [{"id": i, "caption": f"{name}#{n}"} for n, i in enumerate(ids)]
    path = folder / f"{name}.{ {'parquet': 'parquet', 'csv': 'csv', 'json': 'jsonl'}[fmt] }"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows, pa.schema([("id", pa.string()), ("caption", pa.string())])),
                       path, row_group_size=max(1, len(rows) // 3 or 1))
    elif fmt == "csv":
        # CSV has no null: a missing id is an empty field.
        pacsv.write_csv(pa.Table.from_pylist([{**r, "id": r["id"] or ""} for r in rows],
                                             pa.schema([("id", pa.string()), ("caption", pa.string())])), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _expected(files: list[list], committed: set[int]):
    """The rule, written plainly: of rows sharing an id, one in a committed file wins, else the
    first in manifest order; returns (kept captions per file, missing, duplicate rows)."""
    winner = {}
    for rank in (0, 1):
        for f, ids in enumerate(files):
            if (f in committed) != (rank == 0):
                continue
            for n, i in enumerate(ids):
                if i is not None and i.strip() and i not in winner:
                    winner[i] = (f, n)
    missing = sum(1 for ids in files for i in ids if i is None or not i.strip())
    kept = [{f"f{f}#{n}" for n, i in enumerate(ids) if i is not None and i.strip() and winner[i] == (f, n)}
            for f, ids in enumerate(files)]
    rows = sum(len(ids) for ids in files)
    return kept, missing, rows - missing - len(winner)


@pytest.mark.parametrize("seed", range(12))
def test_the_scan_and_the_read_keep_the_first_row_of_each_id(ray_session, tmp_path, seed):
    # Random manifests: every format, files of 0 to 40 rows, ids drawn from a small pool (so
    # they repeat within and across files), missing and blank ids, some files committed.
    rng = random.Random(seed)
    fmt = ["parquet", "csv", "json"][seed % 3]
    pool = [f"id{n}" for n in range(rng.randint(5, 60))] + [" spaced ", "ü"]
    files = [[rng.choice(pool + [None, "", " "]) if rng.random() < 0.9 else rng.choice(pool)
              for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(1, 6))]
    if fmt == "csv":  # an empty CSV field is a missing id too; a blank one stays blank
        files = [[None if i == "" else i for i in ids] for ids in files]
    for f, ids in enumerate(files):
        _write(tmp_path, fmt, f"f{f}", ids)
    manifest = open_manifest(EmbedConfig(manifest=str(tmp_path), out=str(tmp_path / "out"),
                                         towers=("text",)))
    assert [p.rsplit("/", 1)[-1].split(".")[0] for p in manifest.files] == [f"f{f}" for f in range(len(files))]
    committed = {f for f in range(len(files)) if rng.random() < 0.3}
    keys = manifest.partition_keys()
    scan = scan_ids(manifest, frozenset(keys[f] for f in committed))

    kept, missing, duplicates = _expected(files, committed)
    assert scan.rows == sum(len(ids) for ids in files)
    assert (scan.missing_ids, scan.duplicate_rows) == (missing, duplicates)
    assert [k for k in scan.kept] == [len(k) for k in kept]
    assert [p.key for p in scan.plans] == list(keys)

    # The read of the files not committed yields exactly their kept rows, tagged with their key.
    todo = [f for f in range(len(files)) if f not in committed]
    if not todo or not sum(scan.kept[f] for f in todo):
        return
    rows = manifest_rows(manifest.only(todo), tuple(scan.plans[f] for f in todo), 7).take_all()
    got = {}
    for caption, key in ((r["caption"], r[PARTITION]) for r in rows):
        assert caption not in got, "a row read twice"
        got[caption] = key
    assert got == {c: keys[f] for f in todo for c in kept[f]}


def test_a_file_that_cannot_be_read_fails_the_scan_naming_it(ray_session, tmp_path):
    _write(tmp_path, "csv", "a", ["x", "y"])
    (tmp_path / "b.csv").write_text('id,caption\n"z,unterminated\n1,2,3\n')
    manifest = open_manifest(EmbedConfig(manifest=str(tmp_path), out=str(tmp_path / "out"),
                                         towers=("text",)))
    with pytest.raises(ConfigError, match="b.csv"):
        scan_ids(manifest)


def _shard(out, key: str | None, ids: list[str]) -> str:
    table = pa.table({"id": ids, "image_embedding": pa.nulls(len(ids), pa.list_(pa.float32(), 2)),
                      "text_embedding": pa.nulls(len(ids), pa.list_(pa.float32(), 2)),
                      "image_error": pa.nulls(len(ids), pa.string()),
                      "text_error": pa.nulls(len(ids), pa.string())})
    return write_shard(str(out), table, stamp="00000000000000000001", partition=key)


def test_the_ledger_commits_a_partition_once_all_its_rows_are_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ledger = PartitionLedger(str(out), {"a" * 16: {"path": "m/a", "rows": 3},
                                        "b" * 16: {"path": "m/b", "rows": 0}}, None, 1.0)
    from pipeline.writer import shard_totals

    def tell(key, ids):
        name = _shard(out, key, ids)
        table = pq.read_table(out / name)
        return name, ledger.written(key, name, ids, shard_totals(table))

    assert set(read_records(str(out))) == {"b" * 16}  # nothing to write: committed at once
    first, repeated = tell("a" * 16, ["1", "2"])
    assert repeated == [] and "a" * 16 not in read_records(str(out))
    _, repeated = tell("a" * 16, ["2"])  # a retried write's copy
    assert repeated == ["2"]
    last, repeated = tell("a" * 16, ["3"])
    assert repeated == []
    record = read_records(str(out))["a" * 16]
    assert record["rows"] == 3 and sorted(record["shards"]) == sorted([first, last])
    assert record["totals"]["rows"] == 3
    _, repeated = tell("a" * 16, ["1"])  # after the commit, anything more is a copy
    assert repeated == ["1"]
    committed, unfinished = ledger.outcome()
    assert set(committed) == {"a" * 16, "b" * 16} and unfinished == {}

    # Shards no record names (the copies above) go; shards of no partition stay.
    keyless = _shard(out, None, ["z"])
    assert shard_partition(keyless) is None and shard_partition(first) == "a" * 16
    assert remove_unlisted_shards(str(out), read_records(str(out))) == 2
    assert sorted(s.rsplit("/", 1)[-1] for s in list_shards(str(out))) == sorted([first, last, keyless])


def test_a_changed_file_drops_its_record_and_shards(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = _shard(out, "c" * 16, ["1"])
    write_record(str(out), "c" * 16, {"path": "m/c", "rows": 1, "shards": [old], "totals": {}})
    write_record(str(out), "d" * 16, {"path": "m/gone", "rows": 0, "shards": [], "totals": {}})
    # m/c is listed under a new key (its size changed); m/gone is no longer listed.
    kept = drop_changed(str(out), read_records(str(out)), {"e" * 16: "m/c"})
    assert set(kept) == {"d" * 16} and set(read_records(str(out))) == {"d" * 16}
    assert list_shards(str(out)) == []


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cat.png").write_bytes(odd_images()["exact.png"])
    return tmp_path


def _files(folder, **files: list[str]):
    for name, ids in files.items():
        pq.write_table(pa.table({"id": ids, "image": ["cat.png"] * len(ids),
                                 "caption": [f"{name} {i}" for i in ids]}), folder / "m" / f"{name}.parquet")


def test_resume_by_partition_through_the_command(tiny_model, ray_session, folder):
    out = folder / "out"
    args = ["embed", folder / "m", "--out", out, "--model", tiny_model, "--dtype", "float32"]
    _files(folder, b=["x", "y"], c=["z"])
    altclip(*args)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    # A new file earlier in manifest order repeats an id a committed partition holds: the
    # committed row stays, the new copy is rejected and counted.
    _files(folder, a=["y", "w"])
    altclip(*args)
    got = read_output(out)
    assert got["y"]["caption"] == "b y" and got["w"]["caption"] == "a w"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_already_done"] == 3 and summary["rows_embedded"] == 1
    assert summary["rows_rejected"]["duplicate_id"] == 1 and summary["rows_out"] == 4
    # The committed partitions' shards were not touched.
    assert {n: t for n, t in before.items()} == {p.name: p.stat().st_mtime_ns
                                                 for p in out.glob("part-*.parquet") if p.name in before}

    # A file that changes is a new partition: its rows are embedded again, its old shards go.
    _files(folder, c=["z", "v"])
    altclip(*args)
    got = read_output(out)
    assert set(got) == {"x", "y", "z", "w", "v"} and got["v"]["caption"] == "c v"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_embedded"] == 2 and summary["rows_already_done"] == 3
    records = read_records(str(out))
    assert sum(r["rows"] for r in records.values()) == 5
    # The summary's totals, added up from the records, are the shards' own (their footers).
    footers = output_totals(str(out))
    assert (summary["rows_out"], summary["image_ok"], summary["text_ok"], summary["errors_by_kind"]) == (
        footers["rows"], footers["image_ok"], footers["text_ok"], footers["errors"])
    assert {n for r in records.values() for n in r["shards"]} == {p.name for p in out.glob("part-*.parquet")}


def test_a_first_file_without_rows_does_not_hide_the_columns(tmp_path):
    # A JSON Lines shard without rows says nothing of the columns: the next file is asked.
    (tmp_path / "a.jsonl").write_text("")
    _write(tmp_path, "json", "b", ["x", "y"])
    manifest = open_manifest(EmbedConfig(manifest=str(tmp_path), out=str(tmp_path / "out"),
                                         towers=("text",)))
    assert manifest.id_col == "id" and manifest.caption_col == "caption" and len(manifest.files) == 2
