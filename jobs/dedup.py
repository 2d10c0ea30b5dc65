"""The dedup job: mark near-duplicate images or captions of a table, in the table itself."""

from __future__ import annotations

import click

from jobs.options import finish_job, json_result, parse_storage_options, run_job, storage_option, table_name
from pipeline.config import DEFAULT_THRESHOLD, KEEP_POLICIES, DedupConfig


@click.command("dedup")
@click.argument("db")
@click.option("--against", type=click.Choice(["image", "text"]), default="image",
              help="Which vectors: images (marks dup_of, dup_score, dup_checked) or captions "
                   "(caption_dup_of, caption_dup_score, caption_dup_checked).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_THRESHOLD,
              help="Cosine at or above which a row is a near-duplicate of a kept row.")
@click.option("--keep", type=click.Choice(KEEP_POLICIES), default="first",
              help="Which row of a group is kept: first (smallest id), largest (most pixels), "
                   "longest (longest caption); ties go to the smallest id.")
@click.option("--full", is_flag=True,
              help="Re-cluster every row and apply --keep across the table again (default: check "
                   "only rows new or changed since the last run).")
@table_name
@storage_option
@json_result
def dedup_command(db, against, threshold, keep, full, table_name, storage_options, as_json):
    """Mark near-duplicate images or captions in a table in DB.

    Each row of a group of near-duplicates but one gets dup_of (the kept row's id) and dup_score
    (its cosine to it); `search --where "dup_of IS NULL"` then returns one row per group."""
    config = run_job(lambda: DedupConfig(
        db=db, table_name=table_name, against=against, threshold=threshold, keep=keep, full=full,
        storage_options=parse_storage_options(storage_options)))
    from pipeline.table.dedup import dedup_table  # torch: not for `altclip dedup -h`

    result = run_job(dedup_table, config)
    lines = []
    if result["random_weights"]:
        from pipeline.embed.model import RANDOM_WEIGHTS_NOTE

        lines.append(RANDOM_WEIGHTS_NOTE)
    if not result["changed"]:
        reason = ("the table has no rows" if result["mode"] == "full"
                  else f"no {against} vector is new or changed since the last run")
        lines.append(f"nothing to check: {reason} (table version {result['version']})")
    else:
        lines.append(f"checked {result['rows_checked']} {against} vectors ({result['mode']}): "
                     f"{result['duplicates']} near-duplicates marked in {result['groups']} groups; "
                     f"table version {result['version']}")
    finish_job(result, lines, as_json)
