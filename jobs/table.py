"""`altclip table`: a table's versions and indexes."""

from __future__ import annotations

import click

from jobs.options import (
    cluster_option,
    finish_job,
    join_cluster,
    json_result,
    parse_storage_options,
    print_rows,
    results_on_stdout,
    run_job,
    storage_option,
    table_name,
)
from pipeline.table.indexes import index_table
from pipeline.table.recall import index_recall
from pipeline.table.store import open_table, restore_version, table_versions


@click.group("table")
def table_group() -> None:
    """A table's versions and indexes: list, roll back, rebuild."""


@table_group.command("versions")
@click.argument("db")
@table_name
@storage_option
def table_versions_command(db, table_name, storage_options):
    """List the table's versions in DB, each with what made it."""
    versions = run_job(table_versions, db, table_name, parse_storage_options(storage_options))
    print_rows([{"version": v["version"], "time": v["timestamp"], "rows": v["rows"],
                 "made by": v["made_by"]} for v in versions], as_json=False, as_csv=False, cut=None)


@table_group.command("index")
@click.argument("db")
@table_name
@click.option("--recall-queries", default=100, type=click.IntRange(min=0), show_default=True,
              help="Rows whose vectors query the new ANN index and an exact scan, to measure "
                   "recall@10 (0: do not measure).")
@cluster_option
@storage_option
@json_result
def table_index_command(db, table_name, recall_queries, address, storage_options, as_json):
    """Rebuild the table's indexes in DB.

    Full-text on captions; an ANN index per vector column once it holds enough vectors, with
    its recall@10 against exact search on a sample of the table's own vectors. With --address
    (or RAY_ADDRESS), the cluster's tasks build every index, a large one as segments."""
    table = run_job(open_table, db, table_name, parse_storage_options(storage_options))
    run_job(join_cluster, address)
    with results_on_stdout():  # only the result on stdout: Ray's log lines go to stderr
        built = run_job(lambda: index_table(table, retrain=True))
    lines = []
    for column, info in built.items():
        segments = info.get("segments", 1)
        lines.append(f"{column}: IVF_HNSW_SQ, cosine, {info['partitions']} partitions over "
                     f"{info['vectors']} vectors"
                     + (f", built as {segments} segments by the cluster's tasks" if segments > 1 else ""))
        if recall_queries:
            measured = info["recall"] = run_job(index_recall, table, column, recall_queries)
            lines.append(f"  recall@{measured['k']} {measured['recall']} against exact search on "
                         f"{measured['queries']} sampled rows (p50 {measured['ann_p50_ms']} ms, "
                         f"exact {measured['exact_p50_ms']} ms)")
    if not built:
        lines.append("full-text index rebuilt; too few vectors for an ANN index: search is exact")
    finish_job({"indexes": built}, lines, as_json)


@table_group.command("restore")
@click.argument("db")
@click.argument("version", type=int)
@table_name
@storage_option
@json_result
def table_restore_command(db, version, table_name, storage_options, as_json):
    """Make an old version of the table the latest again.

    VERSION's rows become a new version of the table in DB; the history stays."""
    result = run_job(restore_version, db, table_name, version, parse_storage_options(storage_options))
    finish_job(result, [f"table: {result['uri']} '{result['name']}' restored to version {version} "
                        f"({result['rows']} rows, now version {result['version']})"], as_json)
