"""Partitions as the unit of work and resume: the id scan on the cluster, the read by slices, the
ledger's commits, and whole jobs over manifests whose files change, repeat ids, or are redone."""

from __future__ import annotations

import dataclasses
import json
import random

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, EmbedConfig
from pipeline.read.ids import scan_ids
from pipeline.read.manifest import _file_blocks, open_manifest
from pipeline.read.partitions import FileSlices, file_partitions
from pipeline.run.stages import manifest_rows
from pipeline.write.ledger import PartitionLedger, drop_changed, read_records, remove_unlisted_shards, write_record
from pipeline.write.shards import list_shards, output_totals, shard_partition, write_shard
from schemas.manifest import PARTITION
from tests.conftest import altclip, read_output
from tests.corpus import odd_images


def _write(folder, fmt: str, name: str, ids: list, groups: list[int] | None = None) -> None:
    """A manifest file of rows with these ids (None and "" among them), captions naming the row;
    a Parquet file in row groups of `groups` rows (default: three about equal)."""
    rows = [{"id": i, "caption": f"{name}#{n}"} for n, i in enumerate(ids)]
    path = folder / f"{name}.{ {'parquet': 'parquet', 'csv': 'csv', 'json': 'jsonl'}[fmt] }"
    schema = pa.schema([("id", pa.string()), ("caption", pa.string())])
    if fmt == "parquet":
        size = max(1, len(rows) // 3 or 1)
        groups = groups or [min(size, len(rows) - n) for n in range(0, len(rows), size)]
        with pq.ParquetWriter(path, schema) as writer:
            start = 0
            for group in groups:
                writer.write_table(pa.Table.from_pylist(rows[start:start + group], schema))
                start += group
    elif fmt == "csv":
        # CSV has no null: a missing id is an empty field.
        pacsv.write_csv(pa.Table.from_pylist([{**r, "id": r["id"] or ""} for r in rows], schema), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _spans(rows: int, limit: int, groups: list[int] | None) -> list[tuple[int, int]]:
    """The partition rule, written plainly: runs of whole groups while the next still fits in
    `limit` rows (a group alone may be larger), or without groups `limit` rows at a time."""
    if groups is None:
        return [(s, min(s + limit, rows)) for s in range(0, rows, limit)] or [(0, 0)]
    spans, start, taken = [], 0, 0
    for group in groups:
        if taken and taken + group > limit:
            spans.append((start, start + taken))
            start, taken = start + taken, 0
        taken += group
    return spans + [(start, start + taken)]


def _expected(files: list[list], committed: set[tuple[int, int]], owner):
    """The rule, written plainly: of rows sharing an id, one in a committed partition wins, else
    the first in manifest order; returns (kept captions per file, missing, duplicate rows).
    `owner(f, n)` is row n of file f's partition, `committed` holds partitions."""
    winner = {}
    for rank in (0, 1):
        for f, ids in enumerate(files):
            for n, i in enumerate(ids):
                if ((f, owner(f, n)) in committed) == (rank == 0) and i is not None and i.strip() \
                        and i not in winner:
                    winner[i] = (f, n)
    missing = sum(1 for ids in files for i in ids if i is None or not i.strip())
    kept = [{f"f{f}#{n}" for n, i in enumerate(ids) if i is not None and i.strip() and winner[i] == (f, n)}
            for f, ids in enumerate(files)]
    rows = sum(len(ids) for ids in files)
    return kept, missing, rows - missing - len(winner)


@pytest.mark.parametrize("seed", range(15))
def test_the_scan_and_the_read_keep_the_first_row_of_each_id(ray_session, tmp_path, seed):
    # Random manifests: every format, files of 0 to 40 rows (Parquet in row groups of random
    # sizes), ids drawn from a small pool (so they repeat within and across files), missing and
    # blank ids, partitions of 1 to 15 rows at most, some partitions committed.
    rng = random.Random(seed)
    fmt = ["parquet", "csv", "json"][seed % 3]
    pool = [f"id{n}" for n in range(rng.randint(5, 60))] + [" spaced ", "ü"]
    files = [[rng.choice(pool + [None, "", " "]) if rng.random() < 0.9 else rng.choice(pool)
              for _ in range(rng.randint(0, 40))] for _ in range(rng.randint(1, 6))]
    if fmt == "csv":  # an empty CSV field is a missing id too; a blank one stays blank
        files = [[None if i == "" else i for i in ids] for ids in files]
    groups = [None] * len(files)
    for f, ids in enumerate(files):
        if fmt == "parquet" and ids:
            cuts = sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, rng.randint(0, 6))))
            groups[f] = [b - a for a, b in zip([0] + cuts, cuts + [len(ids)])]
        _write(tmp_path, fmt, f"f{f}", ids, groups[f])
    limit = rng.randint(1, 15)
    manifest = open_manifest(EmbedConfig(manifest=str(tmp_path), out=str(tmp_path / "out"),
                                         towers=("text",)))
    assert [p.rsplit("/", 1)[-1].split(".")[0] for p in manifest.files] == [f"f{f}" for f in range(len(files))]

    # The partitions: the rule's spans, and a file of one partition keyed as the file.
    first = scan_ids(manifest, frozenset(), limit)
    spans = [_spans(len(ids), limit, groups[f] if fmt == "parquet" else None) for f, ids in enumerate(files)]
    assert [[(p.start, p.stop) for p in slices.partitions] for slices in first.file_slices] == spans
    for slices, key in zip(first.file_slices, manifest.partition_keys()):
        assert (slices.key == key) and (len(slices.partitions) > 1 or slices.partitions[0].key == key)
    keys = [p.key for slices in first.file_slices for p in slices.partitions]
    assert len(set(keys)) == len(keys)

    committed = {(f, n) for f, slices in enumerate(first.file_slices) for n in range(len(slices.partitions))
                 if rng.random() < 0.3}
    scan = scan_ids(manifest, frozenset(first.file_slices[f].partitions[n].key for f, n in committed), limit)

    def owner(f, n):
        return next(k for k, (a, b) in enumerate(spans[f]) if a <= n < b)

    kept, missing, duplicates = _expected(files, committed, owner)
    assert scan.rows == sum(len(ids) for ids in files)
    assert (scan.missing_ids, scan.duplicate_rows) == (missing, duplicates)
    assert [sum(scan.partition_kept[p.key] for p in slices.partitions) for slices in scan.file_slices] == [len(k) for k in kept]
    key_of = {(f, owner(f, int(c.split("#")[1]))): first.file_slices[f].partitions[owner(f, int(c.split("#")[1]))].key
              for f in range(len(files)) for c in kept[f]}
    assert scan.partition_kept == {
        p.key: sum(1 for c in kept[f] if owner(f, int(c.split("#")[1])) == n)
        for f, slices in enumerate(first.file_slices) for n, p in enumerate(slices.partitions)}

    # The read with the committed partitions done yields exactly the kept rows of the others,
    # each tagged with its partition's key (a Parquet file's done row groups are not read).
    done = frozenset(first.file_slices[f].partitions[n].key for f, n in committed)
    file_slices = [dataclasses.replace(slices, done=done) for slices in scan.file_slices]
    todo = [f for f, slices in enumerate(file_slices) if any(p.key not in done for p in slices.partitions)]
    want = {c: key_of[(f, owner(f, int(c.split("#")[1])))] for f in todo for c in kept[f]
            if (f, owner(f, int(c.split("#")[1]))) not in committed}
    if not want:
        return
    rows = manifest_rows(manifest.only(todo), tuple(file_slices[f] for f in todo), 7).take_all()
    got = {}
    for caption, key in ((r["caption"], r[PARTITION]) for r in rows):
        assert caption not in got, "a row read twice"
        got[caption] = key
    assert got == want


def test_a_parquet_files_row_groups_of_partitions_done_are_not_read(tmp_path):
    # Row groups of 4, 4, 4, 3 rows in partitions of at most 8: [0, 8) and [8, 15).
    _write(tmp_path, "parquet", "f0", [f"id{n}" for n in range(15)], [4, 4, 4, 3])
    manifest = open_manifest(EmbedConfig(manifest=str(tmp_path), out=str(tmp_path / "out"),
                                         towers=("text",)))
    partitions = file_partitions(manifest.files[0], manifest.sizes[0], 15, 8, [4, 4, 4, 3])
    assert [(p.start, p.stop) for p in partitions] == [(0, 8), (8, 15)]
    slices = FileSlices(manifest.partition_keys()[0], manifest.uris()[0], partitions=partitions,
                    done=frozenset({partitions[0].key}))
    assert slices.groups_to_read([4, 4, 4, 3]) == [(2, 4)]
    assert FileSlices("k", "u", partitions=partitions).groups_to_read([4, 4, 4, 3]) == [(0, 4)]
    with open(manifest.files[0], "rb") as f:
        blocks = list(_file_blocks(manifest, f, slices))
    assert [position for position, _ in blocks] == [8]
    assert slices.rows_to_read(blocks[0][1], 8).column(PARTITION).to_pylist() == [partitions[1].key] * 7


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
    from pipeline.write.shards import shard_totals

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


def test_a_file_is_resumed_by_its_partitions_through_the_command(tiny_model, ray_session, tmp_path):
    # One Parquet file of 12 rows in row groups of 3, partitions of at most 6 rows: two.
    _write(tmp_path, "parquet", "f0", [f"id{n}" for n in range(12)], [3, 3, 3, 3])
    out = tmp_path / "out"
    args = ["embed", tmp_path / "f0.parquet", "--out", out, "--model", tiny_model, "--towers", "text",
            "--rows-per-shard", "4", "--partition-rows", "6"]
    altclip(*args)
    records = read_records(str(out))
    assert sorted(r["rows"] for r in records.values()) == [6, 6]

    # A run killed with the second partition in flight: its shards are out, its record is not.
    second = next(k for k, r in records.items() if any(
        "f0#11" in pq.read_table(out / n).column("caption").to_pylist() for n in r["shards"]))
    kept = {n for k, r in records.items() if k != second for n in r["shards"]}
    (out / "_partitions" / f"{second}.json").unlink()
    altclip(*args)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows_already_done"], summary["rows_embedded"], summary["rows_out"]) == (6, 6, 12)
    assert kept <= {p.name for p in out.glob("part-*.parquet")}  # the first partition's shards stay
    assert _ids_in_shards(out) == sorted(f"id{n}" for n in range(12))  # each row once

    # Split at other rows, the file's old partitions are not its partitions now: done again.
    altclip(*args[:-1], "12")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows_already_done"], summary["rows_embedded"], summary["rows_out"]) == (0, 12, 12)
    assert [r["rows"] for r in read_records(str(out)).values()] == [12]
    assert _ids_in_shards(out) == sorted(f"id{n}" for n in range(12))


def _ids_in_shards(out) -> list[str]:
    """Every row's id over OUT's shards, repeats included."""
    return sorted(i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["id"]).column(0).to_pylist())


def test_partition_rows_must_be_positive(tmp_path):
    _write(tmp_path, "parquet", "f0", ["a"])
    result = altclip("embed", tmp_path / "f0.parquet", "--out", tmp_path / "out", "--partition-rows", "0",
                     expect_exit=1)
    assert "--partition-rows 0: must be at least 1" in result.stderr
