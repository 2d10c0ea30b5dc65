"""The load job: Parquet outputs of `embed` -> the LanceDB table (upsert on `id`)."""

from __future__ import annotations

import shlex

import click

from jobs.options import (
    cluster_option,
    db_option,
    finish_job,
    join_cluster,
    json_result,
    parse_storage_options,
    results_on_stdout,
    run_job,
    storage_option,
    table_name,
)
from pipeline import storage
from pipeline.config import ConfigError, LoadConfig, named
from pipeline.storage import outage_in
from pipeline.table.store import load_outputs


def run_load(config: LoadConfig, after_embed: bool = True) -> dict:
    """Load the outputs into the table: the end of `embed --db` (`after_embed`), or `load`.

    After an embed, a failed load is said in one line that also says what its traceback would
    hide: the embedding is done, the outputs are complete, and the command that loads them.
    An outage is left to say "rerun the same command" (which resumes: nothing to embed)."""
    try:
        # Absolute here: with --address the cluster's tasks read and write them.
        return load_outputs(storage.absolute(config.outputs), storage.absolute(config.db), config.table_name,
                            config.storage_options)
    except Exception as exc:
        if not after_embed or outage_in(exc) is not None:
            raise
        why = exc.naming_settings(named) if isinstance(exc, ConfigError) else storage.describe(exc)
        command = " ".join(["altclip", "load", shlex.quote(storage.redact(config.outputs)),
                            "--db", shlex.quote(storage.redact(config.db)),
                            "--table", shlex.quote(config.table_name)])
        also = ", with the same --storage-option values" if config.storage_options else ""
        raise ConfigError(
            f"the embed finished and its outputs in {storage.redact(config.outputs)} are complete, "
            f"but their load into table '{config.table_name}' failed ({why}); once that is fixed, "
            f"load them with `{command}`{also}") from exc


@click.command("load")
@click.argument("outputs")
@db_option(required=True, help="LanceDB database folder or URI (created if absent).")
@table_name
@cluster_option
@storage_option
@json_result
def load_command(outputs, db, table_name, address, storage_options, as_json):
    """Load the outputs of `embed` into a table.

    The Parquet shards in OUTPUTS are upserted by id; shards this table already took from
    OUTPUTS are not loaded again. Metadata columns the table lacks are added to it (null in its
    older rows); an id repeated in OUTPUTS is loaded once, from its newest shard. With --address
    (or RAY_ADDRESS) a new table is written and indexed by the cluster's tasks."""
    config = run_job(lambda: LoadConfig(outputs, db, table_name, parse_storage_options(storage_options)))
    run_job(join_cluster, address)
    with results_on_stdout():  # only the result on stdout: Ray's log lines go to stderr
        result = run_job(run_load, config, False)
    finish_job(result, [described_load(result)], as_json)


def described_load(result: dict) -> str:
    """What a load did to the table, in a line (`load`, `embed --db`)."""
    already, repeated = result.get("shards_already_loaded"), result.get("repeated_rows")
    added = result.get("columns_added")
    return (f"table: {result['uri']} '{result['name']}' ({result['rows']} rows: "
            f"{result['inserted']} inserted, {result['updated']} updated; version {result['version']})"
            + (f"; {already} shards already loaded" if already else "")
            + (f"; {repeated} rows of repeated ids left out (each id loaded once, from its newest "
               "shard)" if repeated else "")
            + (f"; columns added: {', '.join(added)}" if added else ""))
