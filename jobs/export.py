"""`altclip export`: a run's outputs in another tool's layout (clip-retrieval's, for now)."""

from __future__ import annotations

import click

from jobs.options import finish_job, json_result, parse_storage_options, run_job, storage_option
from pipeline.write.export import FORMATS, SIDES, export_embedding_reader

SIDE_CHOICES = {**{side: (side,) for side in SIDES}, "both": tuple(SIDES)}


@click.command("export")
@click.argument("out")
@click.argument("dest")
@click.option("--format", "export_format", required=True, type=click.Choice(FORMATS),
              help="embedding-reader: clip-retrieval's layout, img_emb/ and text_emb/ (float16 "
                   ".npy) beside metadata/ (Parquet), row-aligned.")
@click.option("--side", type=click.Choice(list(SIDE_CHOICES)), default=None,
              show_default="every side OUT holds vectors for",
              help="The vectors to export; rows lacking one of them are left out and counted.")
@click.option("--overwrite", is_flag=True,
              help="Replace DEST's img_emb/, text_emb/ and metadata/; without it a DEST that is "
                   "not empty is refused.")
@storage_option
@json_result
def export_command(out, dest, export_format, side, overwrite, storage_options, as_json):
    """Write a run's outputs in clip-retrieval's layout (embedding-reader, autofaiss).

    From the Parquet shards of `embed` in OUT to DEST (a folder or URI): per shard,
    img_emb/img_emb_N.npy, text_emb/text_emb_N.npy and metadata/metadata_N.parquet, row i of
    each the same row. Only rows with every exported vector can be aligned: the others are
    left out and counted."""
    result = run_job(export_embedding_reader, out, dest, SIDE_CHOICES.get(side), overwrite,
                     parse_storage_options(storage_options))
    finish_job(result, export_lines(result), as_json)


def export_lines(result: dict) -> list[str]:
    """What an export wrote, for a person."""
    folders = ", ".join(f"{f}/" for f in result["folders"])
    files = f"{result['files']} file{'' if result['files'] == 1 else 's'} each"
    lines = [f"exported {result['rows_exported']} of {result['rows_in']} rows to {result['dest']}: "
               f"{folders} ({files}; {result['dimension']}-d float16 vectors) "
               f"in {result['seconds']:.1f} s"]
    if result["rows_skipped"]:
        reasons = "; ".join(f"{kind} {count} (e.g. {', '.join(result['missing_examples'][kind][:3])})"
                            for kind, count in result["missing_vectors"].items())
        hint = (" (--side image or --side text exports every vector of that side)"
                if len(result["sides"]) > 1 else "")
        lines.append(f"left out {result['rows_skipped']} rows lacking a vector: {reasons}{hint}")
    if result["older_copies"]:
        lines.append(f"left out {result['older_copies']} older copies of ids published again "
                     "(the newest copy of each id is exported)")
    if not result["files"]:
        return lines
    dest = result["dest"].rstrip("/")
    lines.append(f"read with: EmbeddingReader(\"{dest}/{result['folders'][0]}\", file_format=\"parquet_npy\", "
                 f"metadata_folder=\"{dest}/metadata\", meta_columns=[\"id\", \"image_path\", \"caption\"])")
    return lines
