"""The embed job: manifest -> AltCLIP towers on Ray -> Parquet shards + summary (-> LanceDB)."""

from __future__ import annotations

import contextlib
import json
import sys
import time

import click

from jobs.load import described_load, run_load
from jobs.options import (
    CONTEXT,
    ManifestCommand,
    db_option,
    embed_config,
    finish_job,
    in_cli_terms,
    job_options,
    results_on_stdout,
    run_job,
)
from pipeline.config import DEFAULT_SAMPLE_ROWS, PARTITION_ROWS, EmbedConfig, LoadConfig
from schemas.embeddings import TRANSIENT_ERROR_KINDS, embeddings_schema

# The job's stages (Ray, torch, LanceDB: seconds of imports) are imported where the job runs,
# not here: `altclip embed -h` answers at once (tests/test_cli_messages.py holds it to that).

def _progress_mode(config: EmbedConfig) -> str:
    """Ray Data's bars on a terminal; elsewhere (or when asked) a line per interval."""
    if config.progress == "auto":
        return "bars" if sys.stderr.isatty() else "text"
    return config.progress


def _progress(mode: str, config: EmbedConfig, counter, total: int | None, stream=None):
    from pipeline.progress import ProgressLog

    if mode in ("text", "json"):
        return ProgressLog(counter, total, config.progress_interval_s, mode, stream)
    return contextlib.nullcontext()


def run_embed(config: EmbedConfig, progress_stream=None) -> dict:
    """Run the whole job; returns the summary that is also written to OUT/summary.json.
    Progress lines go to `progress_stream` (default: JSON lines to stdout, text to stderr).

    Rerun with the same arguments, it resumes: the partitions (manifest files) OUT's commit
    records name are not read again, and the others are embedded whole.
    """
    from pipeline.progress import RowCounter
    from pipeline.run.prepare import prepare_run
    from pipeline.run.resume import retry_outcome, work_to_do
    from pipeline.run.stages import TowerStartWatch, embed_dataset, end_actors, manifest_rows
    from pipeline.table.store import check_manifest_columns, ensure_table
    from pipeline.write.ledger import start_ledger
    from pipeline.write.sink import ParquetShardSink, rows_per_write
    from pipeline.write.summary import summarize, write_summary

    started, started_at = time.perf_counter(), time.time()
    # Everything that can be wrong with the options fails here, before a model starts.
    progress_mode = _progress_mode(config)
    run = prepare_run(config, progress_bars=progress_mode == "bars")
    config = run.config
    for note in run.notes:
        click.echo(in_cli_terms(note), err=True)
    manifest, model, placement, dtype, provenance = run.manifest, run.model, run.placement, run.dtype, run.provenance
    check_manifest_columns(config.db, config.table_name, manifest.metadata_fields, config.storage_options)
    work = work_to_do(config, manifest, provenance)
    records, scan, retry, done = work.records, work.scan, work.retry, work.done
    counter = RowCounter.remote()
    ledger = None if retry is not None else start_ledger(
        config.out, {k: {"path": uri, "rows": scan.partition_kept[k]} for k, uri in work.partitions.items()
                     if k not in done},
        config.storage_options, config.storage_patience_s)
    try:
        schema = embeddings_schema(model.dim, list(manifest.metadata_fields), provenance)
        sink = ParquetShardSink(
            config.out, schema, model.label, config.rows_per_shard, config.storage_options,
            config.storage_patience_s, counter, ledger, partitions=frozenset(records),
            rows_per_write=rows_per_write(scan.partition_kept, done),
        )
        if work.pending > 0:
            rows = manifest_rows(manifest.only(work.todo), tuple(work.file_slices[i] for i in work.todo),
                                 config.batch_size, retry)
            dataset = embed_dataset(rows, config, model, dtype, placement, counter)
            with _progress(progress_mode, config, counter, work.pending, progress_stream) as progress, \
                    TowerStartWatch(counter, config, placement):
                # Writing reserves no CPU: with a decode task and the tower actor holding a 2-CPU
                # machine, a write asking for one would wait for ever while the stages before it
                # wait on its queue.
                dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0})
                if progress is not None:
                    progress.expect(sum(s["rows"] for s in sink.shards))
        totals, duplicates_removed = _settle_outputs(config, records, ledger, sink, scan.distinct_ids)
        # A retry's rows replace rows OUT held: what was there before is what it holds less them.
        already = totals["rows"] - sum(s["rows"] for s in sink.shards) if retry is not None else work.already
        summary = summarize(sink.shards, totals, scan, already, time.perf_counter() - started, provenance,
                            started_at)
        summary["duplicate_rows_removed"] = duplicates_removed
        # An OUT given to several manifests holds the partitions of each: what is not this
        # manifest's, said apart, so that rows_out adds up with rows_in.
        summary["rows_of_other_manifests"] = sum(r["rows"] for key, r in records.items()
                                                 if key not in work.partitions)
        if retry is not None:
            summary["retried"] = retry_outcome(config, retry)
        summary["summary_uri"] = write_summary(config.out, summary, config.storage_options)
        if config.db and totals["rows"] == 0:  # a manifest without rows: the table as it is
            summary["table"] = ensure_table(config.db, config.table_name, schema, config.storage_options)
        elif config.db:
            summary["table"] = run_load(LoadConfig(config.out, config.db, config.table_name, config.storage_options))
        return summary
    finally:
        end_actors(counter, ledger)


def _settle_outputs(config: EmbedConfig, records: dict[str, dict], ledger, sink, distinct_ids: int) -> tuple[dict, int]:
    """After the stream: the ledger's commits taken into `records` (or a retry's copies merged),
    shards no record names removed, and OUT's totals; returns them and the rows removed as
    copies of others."""
    import ray

    from pipeline.run.resume import merge_retried, remove_copies
    from pipeline.write.ledger import output_totals, remove_unlisted_shards

    duplicates_removed = 0
    if ledger is not None:
        committed, unfinished = ray.get(ledger.outcome.remote())
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} partitions did not get all their rows written "
                               f"(rows expected, written): {dict(list(unfinished.items())[:5])}")
        records.update(committed)
    else:
        duplicates_removed += merge_retried(config, records, sink.shards)
    # Copies a retried write published after its partition was committed.
    remove_unlisted_shards(config.out, records, config.storage_options)
    totals = output_totals(config.out, records, config.storage_options)
    # Shards of no partition (written by reembed, or by versions before partitions: the rows
    # the records do not count) can repeat ids the partitions hold: only then is every shard's
    # id column read to remove copies.
    if totals["rows"] > max(distinct_ids, sum(r["rows"] for r in records.values())):
        duplicates_removed += remove_copies(config, records)
        totals = output_totals(config.out, records, config.storage_options)
    return totals, duplicates_removed


@click.command("embed", cls=ManifestCommand)
@click.argument("manifest")
@click.option("--out", required=True, help="Output folder or URI for Parquet shards and summary.json.")
@db_option(default=None, help="Also load the rows into a table of this LanceDB database.")
@click.option("--rows-per-shard", default=10_000, type=int, help="Rows per Parquet shard at most.")
@click.option("--partition-rows", default=PARTITION_ROWS, type=int, show_default=True,
              help="Rows per partition, the unit of resume, at most: a killed run's rerun redoes the "
                   "partitions it had in flight. A Parquet row group is never split.")
@click.option("--overwrite", is_flag=True,
              help="Replace what OUT holds; without it a rerun resumes (and refuses other settings).")
@click.option("--log-format", "progress", default="auto",
              type=click.Choice(["auto", "text", "json"]),
              help="Progress: auto = bars on a terminal, else a text line per interval; json: "
                   "JSON lines on stdout, nothing else there.")
@click.option("--progress-interval", "progress_interval_s", default=10.0,
              type=float, help="Seconds between progress lines.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--retry-errors", is_flag=True,
              help=f"Embed again only the rows of OUT whose error may be transient "
                   f"({', '.join(TRANSIENT_ERROR_KINDS)}), replacing them in place.")
@click.option("--retry-kind", "retry_kinds", multiple=True, metavar="KIND",
              help="Also retry rows with this error kind (repeatable), e.g. decode_error after "
                   "a Pillow upgrade; implies --retry-errors.")
@click.option("--plan", is_flag=True,
              help="Embed nothing, write nothing: time each stage on rows sampled from the manifest, "
                   "where the run would run them, and print what the run would take (rows, "
                   "bottleneck, wall time, device-hours, output, table and index bytes).")
@click.option("--plan-rows", default=DEFAULT_SAMPLE_ROWS, type=int,
              help="With --plan: rows timed, spread over the manifest.")
@click.option("--json", "as_json", is_flag=True,
              help="Also print the result as one JSON object on stdout: the run's summary (as in "
                   "OUT/summary.json), or with --plan the plan.")
@job_options
def embed_command(manifest, out, db, quiet, retry_errors, retry_kinds, plan, plan_rows, as_json, **options):
    """Embed a manifest's images and captions.

    Writes Parquet shards to OUT and, with --db, loads them into a table. MANIFEST: Parquet, CSV
    or JSON Lines (a file, folder or quoted glob), or WebDataset shards."""
    if plan and (retry_errors or retry_kinds):
        raise click.UsageError("--plan projects a run over the whole manifest; --retry-errors and "
                               "--retry-kind mend OUT: choose one")
    if plan:
        config = embed_config(manifest, out, db, **options)
        from pipeline.run.estimate import estimate_run

        with results_on_stdout() as results:
            projected = run_job(estimate_run, config, plan_rows)
        notes = [in_cli_terms(n) for n in projected.notes]  # as the run itself would say them
        for note in notes:
            click.echo(note, err=True)
        # The plan is a table for a person: on stdout, as a query's rows are.
        click.echo(json.dumps({**projected.to_dict(), "notes": notes}) if as_json else projected.text(),
                   file=results)
        return
    if quiet:
        options["progress"] = "quiet"
    if retry_errors or retry_kinds:
        kinds = (*(TRANSIENT_ERROR_KINDS if retry_errors else ()), *retry_kinds)
        options["retry_kinds"] = tuple(dict.fromkeys(kinds))
    config = embed_config(manifest, out, db, **options)
    # Only results on stdout: Ray's log lines go to stderr; with --progress json the progress
    # lines go to stdout, for a log shipper.
    with results_on_stdout() as results:
        summary = run_job(run_embed, config, results if config.progress == "json" else None)
    finish_job(summary, [] if quiet else summary_lines(summary), as_json)


def summary_lines(summary: dict) -> list[str]:
    """What a run did, for a person."""
    others = summary.get("rows_of_other_manifests", 0)
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    rejected = summary["rows_rejected"]
    retried = summary.get("retried")
    if retried is not None and retried["rows"] == 0:
        lines = ["nothing to retry: no row of the output has an error of the kinds asked for"]
    elif retried is not None:
        still = ", ".join(f"{k} {v}" for k, v in retried["still_failing"].items())
        lines = [f"retried {retried['rows']} rows: {retried['succeeded']} now succeeded"
                 + (f"; still failing: {still}" if still else "")
                 + f" ({summary['seconds_total']:.1f} s)"]
    elif summary["rows_in"] == 0:
        lines = ["the manifest has no rows: nothing to embed"]
    elif summary["rows_embedded"] == 0:
        lines = [f"nothing to do: all {summary['rows_out'] - others} rows are already in the output "
                 "(no model work)"]
    else:
        resumed = (f" (resumed: {summary['rows_already_done']} rows were already done)"
                   if summary["rows_already_done"] else "")
        lines = [f"embedded {summary['rows_embedded']} rows in {summary['seconds_total']:.1f} s, "
                 f"{summary['rows_per_second']} rows/s{resumed}"]
    earlier = f", and {others} rows of other manifests embedded into this OUT before" if others else ""
    lines += [
        f"output: {summary['rows_out'] - others} of {summary['rows_in']} manifest rows{earlier} "
        f"(image vectors {summary['image_ok']}, text vectors {summary['text_ok']}; errors: {errors}; "
        f"rejected: {rejected['missing_id']} without id, {rejected['duplicate_id']} duplicate ids)",
        f"summary: {summary['summary_uri']}",
    ]
    if "table" in summary:
        lines.append(described_load(summary["table"]))
    return lines


def main() -> None:
    """`python -m jobs.embed ...` is `altclip embed ...` (what `ray job submit` runs)."""
    embed_command(prog_name="python -m jobs.embed", **CONTEXT)


if __name__ == "__main__":
    main()
