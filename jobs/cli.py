"""The `altclip` command."""

from __future__ import annotations

import json
import sys

import click

from pipeline.config import DEFAULT_MODEL, DTYPES, ConfigError, EmbedConfig, LoadConfig, SearchConfig
from schemas.table import DEFAULT_TABLE_NAME


def _storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write it as KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    return options


def _run(job, *args):
    """Run a job; bad configuration exits non-zero with the message and no traceback."""
    try:
        return job(*args)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Passed to the filesystem of every URI (fsspec storage options).",
)
table_name = click.option("--name", "table_name", default=DEFAULT_TABLE_NAME, show_default=True,
                          help="Table name inside the LanceDB database.")


@click.group()
def main() -> None:
    """Embed image/caption corpora with AltCLIP on Ray, load them into LanceDB, search them."""


@main.command("embed")
@click.argument("manifest")
@click.option("--out", required=True, help="Output folder or URI for Parquet shards and summary.json.")
@click.option("--table", default=None, help="Also load the rows into this LanceDB database.")
@table_name
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Hub id or a folder saved with save_pretrained.")
@click.option("--towers", default="image,text", show_default=True, help="image, text or both.")
@click.option("--id-col", default="id", show_default=True)
@click.option("--image-col", default=None, help="Column of image URIs/paths or bytes [image|image_bytes].")
@click.option("--caption-col", default=None, help="Column of captions [caption].")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES))
@click.option("--concurrency", default=None, type=int, help="Actors per tower [one per GPU, or 1].")
@click.option("--num-gpus", default=None, type=float,
              help="GPUs per tower actor [1/number of towers when the cluster has GPUs, else 0].")
@click.option("--rows-per-shard", default=10_000, show_default=True, type=int)
@click.option("--address", default=None, help="Ray cluster address [RAY_ADDRESS, else in-process Ray].")
@storage_option
def embed_command(manifest, out, table, table_name, model, towers, id_col, image_col, caption_col,
                  batch_size, dtype, concurrency, num_gpus, rows_per_shard, address, storage_options):
    """Embed the images and captions of MANIFEST (Parquet, CSV or JSON Lines; file, folder, glob)."""
    config = _run(lambda: EmbedConfig(
        manifest=manifest, out=out, table=table, table_name=table_name, model=model,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()), id_col=id_col,
        image_col=image_col, caption_col=caption_col, batch_size=batch_size, dtype=dtype,
        concurrency=concurrency, num_gpus=num_gpus, rows_per_shard=rows_per_shard,
        storage_options=_storage_options(storage_options), address=address,
    ))
    from jobs.embed import run_embed

    summary = _run(run_embed, config)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    click.echo(
        f"embedded {summary['rows_out']} of {summary['rows_in']} rows "
        f"(image vectors {summary['image_ok']}, text vectors {summary['text_ok']}; errors: {errors}) "
        f"in {summary['seconds_total']:.1f} s, {summary['rows_per_second']} rows/s",
        err=True,
    )
    click.echo(f"summary: {summary['summary_uri']}", err=True)
    if "table" in summary:
        t = summary["table"]
        click.echo(f"table: {t['uri']} '{t['name']}' ({t['rows']} rows, version {t['version']})", err=True)


@main.command("load")
@click.argument("outputs")
@click.option("--table", required=True, help="LanceDB database folder or URI.")
@table_name
@storage_option
def load_command(outputs, table, table_name, storage_options):
    """Load the Parquet OUTPUTS of `embed` into a LanceDB table (upsert on id)."""
    from jobs.load import run_load

    result = _run(run_load, LoadConfig(outputs, table, table_name, _storage_options(storage_options)))
    click.echo(f"table: {result['uri']} '{result['name']}' ({result['rows']} rows: "
               f"{result['inserted']} inserted, {result['updated']} updated; version {result['version']})")


@main.command("search")
@click.argument("table")
@click.option("--text", default=None, help="Query text, in any language.")
@click.option("--image", default=None, help="Query image path or URI.")
@click.option("--against", type=click.Choice(["image", "text"]), default=None,
              help="Which vectors to search [image].")
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--where", default=None, help="SQL filter on the table's columns, applied before ranking.")
@click.option("--model", default=None, help="Query model [the one the table was built with].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit and line, best first.")
@table_name
@storage_option
def search_command(table, text, image, against, k, where, model, as_json, table_name, storage_options):
    """Nearest rows of TABLE (a LanceDB database) to a text or an image, by cosine."""
    from jobs.search import run_search

    config = _run(lambda: SearchConfig(table=table, text=text, image=image, against=against, k=k,
                                       where=where, model=model, table_name=table_name,
                                       storage_options=_storage_options(storage_options)))
    hits = _run(run_search, config)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit, ensure_ascii=False, default=str))
        return
    for rank, hit in enumerate(hits, 1):
        caption = (hit.get("caption") or "")[:60]
        click.echo(f"{rank:>3}  {hit['score']:.4f}  {hit['id']:<20} {caption:<60} {hit.get('image') or ''}")


@main.command("make-test-model")
@click.argument("out_dir")
@click.option("--seed", default=0, show_default=True, type=int)
def make_test_model_command(out_dir, seed):
    """Save a tiny random-weight AltCLIP (meaningless vectors; for tests) to OUT_DIR."""
    from jobs.make_test_model import make_test_model

    make_test_model(out_dir, seed=seed)
    click.echo(f"tiny random-weight AltCLIP saved to {out_dir}")


@main.command("demo")
@click.option("--workdir", default="altclip-demo", show_default=True,
              help="Where the sample corpus, outputs and table go (replaced on each run).")
@click.option("--model", default=None, help=f"Model to use [{DEFAULT_MODEL}, else a tiny random one].")
@click.option("--query", default="un círculo rojo", show_default=True)
def demo_command(workdir, model, query):
    """Build a small multilingual sample corpus, embed it, load it into LanceDB and search it."""
    from jobs.demo import run_demo

    _run(run_demo, workdir, model, query)


if __name__ == "__main__":
    sys.exit(main())
