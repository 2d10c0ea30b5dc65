"""The reembed job: bring a table up to date with its manifest, embedding only what changed.

What a nightly schedule runs. Images are fetched and hashed (not decoded) every run; the towers
run only on new content: a changed caption never re-runs the image tower, and an image whose
bytes the table already holds a vector for reuses it.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import click
import pyarrow as pa

from jobs.options import (
    CONTEXT,
    ManifestCommand,
    db_option,
    embed_config,
    finish_job,
    in_cli_terms,
    job_options,
    json_result,
    results_on_stdout,
    run_job,
)
from pipeline.config import ReembedConfig
from pipeline.timing import pop_figures
from schemas.embeddings import CAPTION_SHA256, IMAGE_EMBEDDING, TEXT_EMBEDDING, embeddings_schema
from schemas.manifest import CAPTION

# The job's stages (Ray, torch, LanceDB: seconds of imports) are imported where the job runs,
# not here: `altclip reembed -h` answers at once (tests/test_cli_messages.py holds it to that).

def _collect(ds) -> pa.Table:
    """A dataset's rows in the driver, without the stages' hidden columns."""
    import ray

    parts = [t for t in (ray.get(ref) for ref in ds.to_arrow_refs()) if t.num_rows]
    if not parts:
        return pa.table({})
    return pop_figures(pa.concat_tables(parts, promote_options="default"))[0]


def _embed(rows: pa.Table, tower: str, config, model, dtype, placement, counter) -> pa.Table:
    """Run one tower on in-memory rows (id, image, inline bytes, caption) through the same
    stages as the embed job."""
    import ray

    from pipeline.run.stages import TowerStartWatch, embed_dataset

    if not rows.num_rows or tower not in config.towers:
        return pa.table({})
    one_tower = dataclasses.replace(config, towers=(tower,))
    ds = ray.data.from_arrow(rows).repartition(target_num_rows_per_block=config.batch_size)
    with TowerStartWatch(counter, one_tower, placement):
        return _collect(embed_dataset(ds, one_tower, model, dtype, placement, counter))


def _current_rows(manifest, scan, config, policy) -> pa.Table:
    """What the manifest holds now: its rows with the hashes of their image bytes and captions."""
    from pipeline.decode.images import hash_images
    from pipeline.decode.text import caption_hashes
    from pipeline.run.stages import manifest_rows

    current = _collect(
        manifest_rows(manifest, scan.file_slices, config.batch_size)
        .map_batches(hash_images, fn_kwargs={"policy": policy}, batch_format="pyarrow")
    )
    return current.append_column(
        CAPTION_SHA256, pa.array(caption_hashes(current.column(CAPTION).to_pylist()), pa.string()))


def _embedded(results: pa.Table, column: str) -> int:
    return results.num_rows - results.column(column).null_count if results.num_rows else 0


def run_reembed(config: ReembedConfig) -> dict:
    """Compare the manifest with the table, embed only new content, upsert one new version."""
    from pipeline.embed.provenance import changed_provenance
    from pipeline.progress import RowCounter
    from pipeline.read.ids import scan_ids
    from pipeline.run.prepare import prepare_run
    from pipeline.run.stages import end_actors, fetch_policy
    from pipeline.table import store as tables
    from pipeline.table.changes import find_changes, kept_from_table, stored_state
    from pipeline.write.shards import conform, write_shard

    started = time.perf_counter()
    e = config.embed
    run = prepare_run(e, progress_bars=sys.stderr.isatty())
    e = run.config
    for note in run.notes:
        click.echo(in_cli_terms(note), err=True)
    manifest, model, placement, dtype, provenance = run.manifest, run.model, run.placement, run.dtype, run.provenance
    scan = scan_ids(manifest)
    # A table holds one vector type: another is refused before any work.
    table = tables.open_table_if_exists(e.db, e.table_name, e.storage_options)
    if table is not None:
        tables.check_vector_dtype(table, e.vector_dtype)
    current = _current_rows(manifest, scan, e, fetch_policy(e))

    stored, stored_hashes, model_stale = None, pa.array([], pa.string()), False
    if table is not None:
        stored, stored_hashes = stored_state(table)
        previous = tables.table_provenance(table) or {}
        model_stale = bool(changed_provenance(previous, provenance))
    changes = find_changes(current, stored, model_stale, stored_hashes)
    summary = {"rows_in": scan.rows, **changes.counts(),
               "rows_rejected": {"missing_id": scan.missing_ids, "duplicate_id": scan.duplicate_rows}}
    if config.dry_run:
        return {"dry_run": True, **summary}

    image_input, text_input = changes.tower_inputs()
    counter = RowCounter.remote() if image_input.num_rows or text_input.num_rows else None
    try:
        image_results = _embed(image_input, "image", e, model, dtype, placement, counter)
        text_results = _embed(text_input, "text", e, model, dtype, placement, counter)
    finally:
        end_actors(counter)
    reused, old_rows = ({}, {}) if table is None or model_stale or not len(changes.upserted) else (
        kept_from_table(table, current, changes))
    rows = changes.assemble(current, image_results, text_results, reused, old_rows)
    schema = embeddings_schema(model.dim, list(manifest.metadata_fields), provenance)
    rows = conform(rows, schema, model.label) if rows.num_rows else schema.empty_table()
    if e.out and rows.num_rows:
        write_shard(e.out, rows, e.storage_options, e.storage_patience_s)

    deleting = config.prune or model_stale
    result = tables.apply_changes(
        e.db, e.table_name, rows, deleted=changes.deleted if deleting else None,
        replace=table is None or model_stale, storage_options=e.storage_options,
        record={"job": "reembed", "model": model.label, **changes.counts(),
                "deleted": len(changes.deleted) if deleting else 0},
    )
    summary.update({
        "image_tower_rows": _embedded(image_results, IMAGE_EMBEDDING),
        "text_tower_rows": _embedded(text_results, TEXT_EMBEDDING),
        "rows_upserted": rows.num_rows, "rows_deleted": result["deleted"],
        "table": result, "seconds_total": round(time.perf_counter() - started, 3),
    })
    return summary


@click.command("reembed", cls=ManifestCommand)
@click.argument("manifest")
@db_option(required=True, help="LanceDB database folder or URI (created if absent).")
@click.option("--out", default=None, help="Also write the re-embedded rows as Parquet here.")
@click.option("--prune", is_flag=True, help="Delete table rows whose id left the manifest.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@json_result
@job_options
def reembed_command(manifest, db, out, prune, dry_run, as_json, **options):
    """Update a table from its manifest, embedding what changed.

    Only new and changed rows of MANIFEST go through the towers."""
    config = ReembedConfig(embed_config(manifest, out, db, **options), prune=prune,
                           dry_run=dry_run)
    with results_on_stdout():  # only the result on stdout: Ray's log lines go to stderr
        summary = run_job(run_reembed, config)
    counts = (f"new {summary['new']}, image changed {summary['image_changed']}, "
              f"caption changed {summary['caption_changed']}, "
              f"model stale {'all' if summary['model_stale'] else 0}, "
              f"gone from the manifest {summary['deleted']}, unchanged {summary['unchanged']}")
    if dry_run:
        line = (f"dry run, nothing changed: {counts}; would embed {summary['images_to_embed']} "
                f"images and {summary['captions_to_embed']} captions, reuse "
                f"{summary['images_reused']} image vectors")
    else:
        line = (f"{counts}; embedded {summary['image_tower_rows']} images and "
                f"{summary['text_tower_rows']} captions, reused {summary['images_reused']} image "
                f"vectors; upserted {summary['rows_upserted']}, deleted {summary['rows_deleted']} rows "
                f"in {summary['seconds_total']:.1f} s")
    finish_job(summary, [line], as_json)


def main() -> None:
    """`python -m jobs.reembed ...` is `altclip reembed ...` (what a schedule runs)."""
    reembed_command(prog_name="python -m jobs.reembed", **CONTEXT)


if __name__ == "__main__":
    main()
