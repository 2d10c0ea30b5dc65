"""The search job: a text or image query against the table, nearest rows first."""

from __future__ import annotations

import json

import click

from jobs.options import parse_storage_options, print_rows, run_job, storage_option, table_name
from pipeline.config import SearchConfig
from schemas.table import SEARCH_NPROBES, SEARCH_REFINE_FACTOR


def run_search(config: SearchConfig) -> list[dict]:
    from pipeline.query.search import search  # the towers, torch: not for `altclip search -h`

    return search(config)


@click.command("search")
@click.argument("db")
@click.option("--text", default=None, help="Query text, in any language.")
@click.option("--image", default=None, help="Query image path or URI.")
@click.option("--vector", default=None, help="Query vector: a .npy file or a JSON list.")
@click.option("--hybrid", is_flag=True, help="With --text: vector + full-text search on captions, fused.")
@click.option("--against", type=click.Choice(["image", "text"]), default=None,
              show_default="image", help="Which vectors to search.")
@click.option("--k", default=10, type=int, help="How many hits.")
@click.option("--where", default=None, help="SQL filter on the table's columns, applied before ranking.")
@click.option("--model", default=None, show_default="the one the table was built with",
              help="Query model.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit and line, best first.")
@click.option("--nprobes", default=SEARCH_NPROBES, type=int,
              help="ANN index partitions to search; more: better recall, slower.")
@click.option("--refine-factor", default=SEARCH_REFINE_FACTOR, type=int,
              help="Candidates re-ranked by exact distance, per hit.")
@table_name
@storage_option
def search_command(db, text, image, vector, hybrid, against, k, where, model, as_json, nprobes,
                   refine_factor, table_name, storage_options):
    """Nearest rows to a text, an image or a vector.

    Searches a table in DB by cosine. Give exactly one of --text, --image or --vector."""
    config = run_job(lambda: SearchConfig(db=db, text=text, image=image, vector=vector,
                                          hybrid=hybrid, against=against, k=k,
                                          where=where, model=model, table_name=table_name,
                                          storage_options=parse_storage_options(storage_options),
                                          nprobes=nprobes, refine_factor=refine_factor))
    hits = run_job(run_search, config)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit, ensure_ascii=False, default=str))
        return
    print_rows([{"rank": rank, "score": hit["score"], "id": hit["id"],
                 "caption": hit.get("caption") or "", "image": hit.get("image") or ""}
                for rank, hit in enumerate(hits, 1)], as_json=False, as_csv=False)
