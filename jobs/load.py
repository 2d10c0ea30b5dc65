"""The load job: Parquet outputs of `embed` -> the LanceDB table (upsert on `id`)."""

from __future__ import annotations

import click

from jobs.options import cluster_option, db_option, join_cluster, parse_storage_options, run_job, storage_option, table_name
from pipeline.config import LoadConfig
from pipeline.table import load_outputs


def run_load(config: LoadConfig) -> dict:
    return load_outputs(config.outputs, config.db, config.table_name, config.storage_options)


@click.command("load")
@click.argument("outputs")
@db_option(required=True, help="LanceDB database folder or URI (created if absent).")
@table_name
@cluster_option
@storage_option
def load_command(outputs, db, table_name, address, storage_options):
    """Load the outputs of `embed` into a table.

    The Parquet shards in OUTPUTS are upserted by id; shards this table already took from
    OUTPUTS are not loaded again. With --address (or RAY_ADDRESS) a new table is written and
    indexed by the cluster's tasks."""
    config = run_job(lambda: LoadConfig(outputs, db, table_name, parse_storage_options(storage_options)))
    run_job(join_cluster, address)
    click.echo(described_load(run_job(run_load, config)))


def described_load(result: dict) -> str:
    """What a load did to the table, in a line (`load`, `embed --db`)."""
    already = result.get("shards_already_loaded")
    return (f"table: {result['uri']} '{result['name']}' ({result['rows']} rows: "
            f"{result['inserted']} inserted, {result['updated']} updated; version {result['version']})"
            + (f"; {already} shards already loaded" if already else ""))
