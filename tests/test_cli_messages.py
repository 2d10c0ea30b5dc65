"""The command line as a user meets it: what it says when something is off, and paths that work
from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import altclip, embedded_corpus, marked_environment, marked_processes, processes_left
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def db(standard_run, tmp_path_factory):
    return embedded_corpus(standard_run, tmp_path_factory, "cli") / "db"


def test_sql_columns_of_the_same_name_all_come_out(db):
    query = "SELECT id, id, lang FROM embeddings ORDER BY id LIMIT 2"
    table = altclip("sql", db, query).stdout.splitlines()
    assert table[0].split() == ["id", "id_1", "lang"] and len(table) == 3
    row = json.loads(altclip("sql", db, query, "--json").stdout.splitlines()[0])
    assert set(row) == {"id", "id_1", "lang"} and row["id"] == row["id_1"]
    assert altclip("sql", db, query, "--csv").stdout.splitlines()[0] == '"id","id_1","lang"'


def test_a_missing_table_in_sql_is_named_with_what_exists(db):
    result = altclip("sql", db, "SELECT * FROM zoo", expect_exit=1)
    assert "zoo" in result.stderr and "The query can name: embeddings (the table in" in result.stderr


def test_sql_sees_every_table_by_its_name_and_no_run_records(db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    altclip("load", db.parent / "out", "--db", copy, "--table", "pics")
    assert (copy / "pics__runs.lance").is_dir()  # the run records, which no listing shows
    joined = altclip("sql", copy, "SELECT count(*) AS n FROM pics JOIN embeddings USING (id)", "--json")
    rows = json.loads(altclip("sql", copy, "SELECT count(*) AS n FROM pics", "--json").stdout)["n"]
    assert rows > 0 and json.loads(joined.stdout)["n"] == rows

    result = altclip("sql", copy, "SELECT * FROM pics__runs", expect_exit=1)
    assert "The query can name: embeddings, pics (the tables in" in result.stderr
    assert "__runs" not in result.stderr.split("The query can name:")[1]
    result = altclip("search", copy, "--text", "x", "--table", "nosuch", expect_exit=1)
    assert "(tables: embeddings, pics)" in result.stderr
    result = altclip("sql", copy, "SELECT 1", "--table", "nosuch", expect_exit=1)
    assert "has no table 'nosuch' (tables: embeddings, pics)" in result.stderr
    # `outputs` without --parquet: what to add, not DuckDB's words about a Python variable.
    result = altclip("sql", copy, "SELECT * FROM outputs", expect_exit=1)
    assert "add --parquet OUT" in result.stderr and "Python Object" not in result.stderr


def test_table_output_lines_up_captions_of_every_script(capsys):
    from jobs.options import display_width, print_rows

    captions = {"ja": "猫が寝ている", "ko": "고양이", "zh": "白色背景上的红色圆圈", "hi": "बिल्ली सो रही है",
                "ar": "قطة نائمة", "en": "a cat", "de": "ﬁ Ｆｕｌｌ"}
    print_rows([{"caption": c, "lang": lang} for lang, c in captions.items()], False, False)
    lines = capsys.readouterr().out.splitlines()
    # The second column starts at the same screen column on every line: padding counts a wide
    # character as two columns and a combining mark as none.
    starts = {display_width(line[:line.rindex(" ") + 1]) for line in lines}
    assert len(starts) == 1, lines
    assert display_width("猫a") == 3 and display_width("ि्") == 1 and display_width("e\u0301") == 1


def test_reading_commands_never_create_a_database(tmp_path):
    missing = tmp_path / "nothing-here"
    for args in (["search", missing, "--text", "x"], ["sql", missing, "SELECT 1 FROM embeddings"],
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
                     "--db", tmp_path / "db")
    assert "(0 rows" in result.stderr
    table = lancedb.connect(str(tmp_path / "db")).open_table("embeddings")
    assert table.count_rows() == 0 and "image_embedding" in table.schema.names
    altclip("embed", tmp_path / "empty.parquet", "--out", tmp_path / "out3", "--model", tiny_model,
            "--db", tmp_path / "db")  # again: the table is left as it is


def test_a_job_prints_its_result_on_stdout_as_json_only_when_asked(standard_run, tiny_model, ray_session,
                                                                    tmp_path_factory):
    """One convention for every command: the lines for a person go to stderr; with --json the
    result goes to stdout as one JSON object, alone there (Ray's log lines included elsewhere)."""
    folder = embedded_corpus(standard_run, tmp_path_factory, "results")
    rerun = ("embed", folder / "manifest.parquet", "--out", folder / "out", "--model", tiny_model,
             "--dtype", "float32")
    said = altclip(*rerun)  # the copy's manifest is another path: its rows are embedded again
    assert said.stdout == "" and "summary: " in said.stderr
    summary = json.loads(altclip(*rerun, "--json").stdout)
    assert summary["rows_embedded"] == 0  # nothing to do
    assert summary["rows_out"] == json.loads((folder / "out" / "summary.json").read_text())["rows_out"] > 0

    loaded = altclip("load", folder / "out", "--db", folder / "db")
    assert loaded.stdout == "" and "table: " in loaded.stderr
    result = json.loads(altclip("load", folder / "out", "--db", folder / "db", "--json").stdout)
    assert result["inserted"] == result["updated"] == 0 and result["shards_already_loaded"] > 0
    # The runs' own actors ended with them: a driver that runs many jobs does not gather them.
    deadline = time.monotonic() + 10  # a kill is asynchronous
    while actors := [c for c in marked_processes(ray_session)
                     if c.startswith(("ray::RowCounter", "ray::PartitionLedger"))]:
        assert time.monotonic() < deadline, actors
        time.sleep(0.5)


def test_a_relative_model_path_works_from_another_directory(tiny_model, ray_session, tmp_path, monkeypatch):
    shutil.copytree(tiny_model, tmp_path / "model")
    folder = tmp_path / "work"
    manifest = write_corpus(folder)
    monkeypatch.chdir(tmp_path)
    altclip("embed", manifest, "--out", folder / "out", "--model", "model", "--db", folder / "db")
    altclip("load", "work/out", "--db", "work/db2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hits = altclip("search", folder / "db", "--text", "un gato", "--k", "2", "--json").stdout.splitlines()
    assert len(hits) == 2
    # The load's record names the outputs it read absolutely.
    listing = altclip("table", "versions", folder / "db2").stdout
    assert f"outputs {folder / 'out'}," in listing
    shards = len(list((folder / "out").glob("part-*.parquet")))
    assert f"shards {shards}" in listing and "part-" not in listing  # counted, not listed


def test_an_error_after_ray_started_leaves_no_process(tiny_model, tmp_path):
    # A configuration only the running cluster can refuse: Ray is up when the job fails.
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "m.parquet")
    env, mark = marked_environment(RAY_ADDRESS="")
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    result = subprocess.run([altclip_bin, "embed", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"),
                             "--model", tiny_model, "--towers", "text", "--num-gpus", "1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "the Ray cluster has no GPUs" in result.stderr, result.stderr[-2000:]
    assert not processes_left(mark), "processes left after an error"


def _commands(group, prefix=()):
    """Every command and group of `altclip`, with the words that run it."""
    import click

    for name in group.list_commands(None):
        command = group.get_command(None, name)
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


# What `-h` of any command may not import: seconds of start-up (torch alone 1 s here, the
# whole job 2.6 s), for help that needs none of it.
HEAVY_MODULES = ("torch", "transformers", "ray", "lancedb", "lance", "fastapi", "uvicorn")

HELP_PROBE = """
import sys
import click
from jobs.cli import main

def helped(group, prefix=()):
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        try:
            main([*prefix, name, "-h"], standalone_mode=False)
        except click.exceptions.Exit:
            pass
        if isinstance(command, click.Group):
            helped(command, (*prefix, name))

helped(main)
print("imported:", " ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_help_of_every_command_imports_no_job_machinery():
    result = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True,
                            timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
    imported = set(result.stdout.splitlines()[-1].removeprefix("imported:").split())
    assert "jobs" in imported and "click" in imported  # the probe did render the help
    assert not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))


def test_help_for_every_option_and_summaries_not_cut():
    import click

    from jobs.cli import COMMANDS, main

    listing = altclip("-h").stdout
    assert "Commands:" in listing and "..." not in listing.split("Commands:")[1]
    assert altclip("--version").stdout.startswith("altclip, version ")
    for words, command in _commands(main):
        if len(words) == 1:  # the top-level listing, written without importing the jobs
            assert COMMANDS[words[0]][2] == command.get_short_help_str(limit=1000), words
        help_text = altclip(*words, "-h").stdout
        assert f" {' '.join(words)} " in help_text.splitlines()[0]
        if isinstance(command, click.Group):
            assert "..." not in help_text.split("Commands:")[1], words
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert param.help, f"altclip {' '.join(words)} {param.opts[0]} has no help line"
    search_help = " ".join(altclip("search", "--help").stdout.split())
    assert "Give exactly one of --text, --image or --vector" in search_help
    assert "--towers image,text" in altclip("embed", "--help").stdout


def test_lancedb_names_everywhere(db, tmp_path):
    """The database is DB (`--db DB` on the writing commands), the table `--table NAME`; the
    names of before are refused with what to write now."""
    result = altclip("search", db, "--text", "x", "--name", "embeddings", expect_exit=2)
    assert "--name was renamed: use --table NAME" in result.stderr
    result = altclip("sql", "SELECT 1", "--db", db, expect_exit=2)
    assert "use altclip sql DB QUERY" in result.stderr
    result = altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "o", "--table",
                     tmp_path / "db", expect_exit=1)
    assert "a table name is letters, digits" in result.stderr and "given as --db" in result.stderr
    assert not (tmp_path / "db").exists() and not (tmp_path / "o").exists()
    result = altclip("sql", "SELECT 1", expect_exit=2)
    assert "altclip sql DB QUERY, and/or --parquet OUT" in result.stderr
    # The table listing and search results have a header row.
    assert altclip("search", db, "--text", "un gato", "--k", "2").stdout.split()[:5] == [
        "rank", "score", "id", "caption", "image"]
    listing = altclip("table", "versions", db, "--table", "embeddings").stdout.splitlines()
    assert listing[0].split() == ["version", "time", "rows", "made", "by"] and len(listing) > 1


@pytest.mark.slow  # waits out Ray's start timeout
def test_ray_that_does_not_start_in_time_is_tried_again_then_named(monkeypatch):
    import ray

    from pipeline.config import ConfigError
    from pipeline.run import stages as plan

    calls = []

    def init(**kwargs):
        calls.append("init")
        if calls.count("init") <= failures:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    failures = 1
    plan.ensure_ray()
    assert calls == ["init", "shutdown", "init"]  # the second start made it
    calls.clear()
    failures = 2
    with pytest.raises(ConfigError, match="Ray did not start on this machine, twice: The current node timed out"):
        plan.ensure_ray()
    assert calls == ["init", "shutdown", "init", "shutdown"]
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ValueError("bad address")))
    with pytest.raises(ValueError, match="bad address"):  # a wrong setting is not retried
        plan.ensure_ray()


@pytest.mark.slow  # waits out the store's patience
@pytest.mark.parametrize("command", [["sql", "s3://tables/db", "SELECT 1 AS n FROM embeddings"],
                                     ["serve", "s3://tables/db", "--port", "0"],
                                     ["table", "versions", "s3://tables/db"]])
def test_a_database_on_an_unreachable_store_is_one_line_and_exit_75(command, monkeypatch):
    # Nothing listens on port 1 of loopback: every connection is refused at once.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    result = altclip(*command, expect_exit=75)
    # One sentence a reader follows: what failed and where, not the client's debug text.
    assert result.stderr.strip() == ("Error: s3://tables/db: storage unavailable (connection refused at "
                                     "http://127.0.0.1:1); rerun the same command when the store is back")
    assert "Traceback" not in result.stderr and "testing-secret" not in result.stderr


@pytest.mark.slow  # the command in a subprocess, waiting out a connection timeout
def test_a_cluster_address_nothing_answers_at_fails_in_seconds_saying_what_to_change(tmp_path):
    # Nothing listens on port 1 of loopback. ray.init alone waits there for minutes, silent.
    from pipeline.config import ConfigError
    from pipeline.run.stages import _check_cluster_answers

    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ConfigError, match="no Ray cluster answers there"):
            _check_cluster_answers(address)
    for address in ("local", "auto", "ray://head"):  # Ray's own forms, judged by Ray
        _check_cluster_answers(address)
    (tmp_path / "out").mkdir()
    altclip_bin = os.path.join(os.path.dirname(sys.executable), "altclip")
    started = time.monotonic()
    result = subprocess.run([altclip_bin, "load", str(tmp_path / "out"), "--db", str(tmp_path / "db"),
                             "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 1, result.stderr[-2000:]
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in result.stderr
    assert "ray start --head" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
