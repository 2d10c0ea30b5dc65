"""The classify job: zero-shot labels for every image of a table, written back to it (or to
Parquet)."""

from __future__ import annotations

import click
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.options import finish_job, json_result, parse_storage_options, run_job, storage_option, table_name
from pipeline import storage
from pipeline.config import DEFAULT_TEMPLATE, ClassifyConfig
from pipeline.query.classify import (
    LABEL,
    LABEL_SCORE,
    TOP_LABELS,
    TOP_SCORES,
    classify_batch,
    label_vectors,
    read_labels,
)
from schemas.embeddings import IMAGE_EMBEDDING
from schemas.manifest import ID
from schemas.table import KEY

_NEW_COLUMNS = pa.schema([pa.field(LABEL, pa.string()), pa.field(LABEL_SCORE, pa.float32()),
                          pa.field(TOP_LABELS, pa.list_(pa.string())),
                          pa.field(TOP_SCORES, pa.list_(pa.float32()))])


def run_classify(config: ClassifyConfig) -> dict:
    # Imported here: the towers import torch, which `altclip classify -h` does without.
    from pipeline.query.query_table import open_query_table
    from pipeline.table.store import connect, record_run

    labels = read_labels(list(config.labels), list(config.templates))  # checked before any loading
    opened = open_query_table(config.db, config.table_name, config.model, config.storage_options)
    table = opened.table
    classes = label_vectors(opened, labels)
    query = (table.search().where(f"{IMAGE_EMBEDDING} IS NOT NULL").select([ID, IMAGE_EMBEDDING])
             .limit(None))
    parts = [classify_batch(pa.Table.from_batches([b]), classes, labels.names, config.top_k)
             for b in query.to_batches() if b.num_rows]
    result = pa.concat_tables(parts) if parts else None
    rows = result.num_rows if result is not None else 0
    if config.out:
        fs, path = storage.filesystem(config.out, config.storage_options)
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path.rstrip('/')}/labels.parquet", "wb") as f:
            pq.write_table(result if result is not None else pa.table({}), f)
        return {"rows": rows, "labels": len(labels.names), "out": config.out}
    missing = [f for f in _NEW_COLUMNS if f.name not in table.schema.names]
    if missing:
        table.add_columns(pa.schema(missing))  # null until this run fills them in
    if result is not None:
        # Only the label columns are rewritten, beside the others: a whole-row upsert would move
        # every labelled row out of the vector index until it is rebuilt.
        (table.to_lance().merge_insert(KEY).when_matched_update_all().write_mode("rewrite_columns")
         .execute(result))
        table.checkout_latest()
    record_run(connect(config.db, config.storage_options), config.table_name, table.version,
               {"job": "classify", "labels": len(labels.names), "rows": rows})
    return {"rows": rows, "labels": len(labels.names), "version": table.version}


@click.command("classify")
@click.argument("db")
@click.option("--labels", "label_files", multiple=True, required=True,
              help="One label per line; repeat with the same classes in other languages.")
@click.option("--template", "templates", multiple=True,
              help='Prompt template, repeatable, averaged ["a photo of a {}"].')
@click.option("--top-k", default=3, type=int, help="Labels kept per image, best first.")
@click.option("--out", default=None, help="Write id + labels as Parquet here instead of into the table.")
@click.option("--model", default=None, show_default="the one the table was built with",
              help="Model that embeds the labels.")
@table_name
@storage_option
@json_result
def classify_command(db, label_files, templates, top_k, out, model, table_name, storage_options, as_json):
    """Zero-shot labels for every image of a table in DB.

    Adds label, label_score and the top k labels to each row."""
    config = run_job(lambda: ClassifyConfig(
        db=db, labels=label_files, templates=templates or (DEFAULT_TEMPLATE,), top_k=top_k,
        out=out, model=model, table_name=table_name, storage_options=parse_storage_options(storage_options)))
    result = run_job(run_classify, config)
    where = f"Parquet under {out}" if out else f"the table (version {result['version']})"
    finish_job(result, [f"labelled {result['rows']} images with {result['labels']} labels into {where}"],
               as_json)
