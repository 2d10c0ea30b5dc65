"""The command line as a user meets it: what it says when something is off, and paths that work
from any directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import altclip
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def db(tiny_model, ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    manifest = write_corpus(folder)
    altclip("embed", manifest, "--out", folder / "out", "--model", tiny_model, "--table", folder / "db")
    return folder / "db"


def test_sql_columns_of_the_same_name_all_come_out(db):
    query = "SELECT id, id, lang FROM embeddings ORDER BY id LIMIT 2"
    table = altclip("sql", query, "--db", db).stdout.splitlines()
    assert table[0].split() == ["id", "id_1", "lang"] and len(table) == 3
    row = json.loads(altclip("sql", query, "--db", db, "--json").stdout.splitlines()[0])
    assert set(row) == {"id", "id_1", "lang"} and row["id"] == row["id_1"]
    assert altclip("sql", query, "--db", db, "--csv").stdout.splitlines()[0] == '"id","id_1","lang"'


def test_a_missing_table_in_sql_is_named_with_what_exists(db):
    result = altclip("sql", "SELECT * FROM zoo", "--db", db, expect_exit=1)
    assert "zoo" in result.stderr and "The query can name: embeddings (the table in" in result.stderr


def test_reading_commands_never_create_a_database(tmp_path):
    missing = tmp_path / "nothing-here"
    for args in (["search", missing, "--text", "x"], ["sql", "SELECT 1 FROM embeddings", "--db", missing],
                 ["table", "versions", missing]):
        result = altclip(*args, expect_exit=1)
        assert "no database there" in result.stderr, args
    assert not missing.exists()


def test_classify_checks_its_label_files_before_loading_anything(db, tmp_path):
    started = time.monotonic()
    result = altclip("classify", db, "--labels", tmp_path / "missing.txt", expect_exit=1)
    assert "--labels " in result.stderr and "missing.txt: cannot read it (No such file or directory)" in result.stderr
    assert time.monotonic() - started < 10  # no model was loaded


def test_an_unquoted_glob_is_told_to_be_quoted(tmp_path):
    result = altclip("embed", tmp_path / "a.parquet", tmp_path / "b.parquet", "--out", tmp_path / "o",
                     expect_exit=2)
    assert "A manifest glob must be quoted" in result.stderr


def test_a_manifest_without_rows(tiny_model, ray_session, tmp_path):
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.string()),
                             "caption": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    result = altclip("embed", tmp_path / "empty.parquet", "--out", tmp_path / "out", "--model", tiny_model)
    assert "the manifest has no rows: nothing to embed" in result.stderr
    result = altclip("embed", tmp_path / "empty.parquet", "--out", tmp_path / "out2", "--model", tiny_model,
                     "--table", tmp_path / "db")
    assert "(0 rows" in result.stderr
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
    assert table.count_rows() == 0 and "image_embedding" in table.schema.names
    altclip("embed", tmp_path / "empty.parquet", "--out", tmp_path / "out3", "--model", tiny_model,
            "--table", tmp_path / "db")  # again: the table is left as it is


def test_a_relative_model_path_works_from_another_directory(tiny_model, ray_session, tmp_path, monkeypatch):
    shutil.copytree(tiny_model, tmp_path / "model")
    folder = tmp_path / "work"
    manifest = write_corpus(folder)
    monkeypatch.chdir(tmp_path)
    altclip("embed", manifest, "--out", folder / "out", "--model", "model", "--table", folder / "db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hits = altclip("search", folder / "db", "--text", "un gato", "--k", "2", "--json").stdout.splitlines()
    assert len(hits) == 2


def test_ctrl_c_says_the_same_command_resumes(tiny_model, tmp_path):
    rows = [{"id": f"r{i}", "caption": f"caption {i}"} for i in range(20000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    process = subprocess.Popen(
        [altclip_bin, "embed", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"), "--model",
         tiny_model, "--towers", "text", "--batch-size", "8", "--log-format", "text",
         "--progress-interval", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    seen = ""
    while "progress:" not in seen:  # running: Ray is up and rows are moving
        line = process.stderr.readline()
        assert line, "the job ended before it could be interrupted"
        seen += line
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest[-2000:]
    assert "interrupted: what was written so far is kept; run the same command again to resume" in rest
