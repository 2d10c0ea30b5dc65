"""`altclip sql`: DuckDB SQL over a table and/or the outputs of `embed`."""

from __future__ import annotations

import click

from jobs.options import parse_storage_options, print_rows, renamed, run_job, storage_option, table_name
from pipeline.query.sql import run_sql


@click.command("sql")
@click.argument("db_and_query", nargs=-1, required=True, metavar="[DB] QUERY")
@click.option("--parquet", "outputs", default=None, metavar="OUT",
              help="Also the outputs of `embed` in OUT, visible as `outputs`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row and line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line.")
@click.option("--allow-file-access", is_flag=True,
              help="Let the query read and write files and URLs (read_csv, COPY ... TO, ATTACH), "
                   "install and load DuckDB extensions and change settings. Off by default: the "
                   "query sees only the table and the outputs.")
@click.option("--db", hidden=True, expose_value=False,
              callback=renamed("altclip sql DB QUERY (the database first)"))
@table_name
@storage_option
def sql_command(db_and_query, outputs, as_json, as_csv, allow_file_access, table_name,
                storage_options):
    """Run a DuckDB SQL query over a table and/or outputs.

    Every table in DB is visible by its name (--table only checks that one exists), the outputs
    of --parquet as `outputs`; the query reads nothing else (no files, URLs or extensions)
    unless --allow-file-access.

    `altclip sql DB "SELECT ..."`; `altclip sql --parquet OUT "SELECT ... FROM outputs"`."""
    if len(db_and_query) > 2:
        raise click.UsageError("give the database and one query: altclip sql DB \"SELECT ...\" "
                               "(quote the query)")
    db, query = db_and_query if len(db_and_query) == 2 else (None, db_and_query[0])
    if not db and not outputs:
        raise click.UsageError("name what to query: altclip sql DB QUERY, and/or --parquet OUT")
    named_table = table_name if click.get_current_context().get_parameter_source(
        "table_name") is not click.core.ParameterSource.DEFAULT else None
    result = run_job(run_sql, query, db, named_table, outputs,
                     parse_storage_options(storage_options), allow_file_access)
    print_rows(result.to_pylist(), as_json, as_csv, names=result.column_names)
