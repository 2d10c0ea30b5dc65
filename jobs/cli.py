"""The `altclip` command."""

from __future__ import annotations

import io
import json
import sys

import click

from jobs.options import CONTEXT, db_option, parse_storage_options, renamed, storage_option, table_name
from jobs.serve import serve_command
from pipeline.storage import outage_in
from pipeline.config import (
    DEFAULT_MODEL,
    DTYPES,
    PREPROCESS_MODES,
    ConfigError,
    EmbedConfig,
    LoadConfig,
    DEFAULT_TEMPLATE,
    ClassifyConfig,
    ReembedConfig,
    SearchConfig,
)
from schemas.embeddings import TRANSIENT_ERROR_KINDS
from schemas.table import DEFAULT_TABLE_NAME, SEARCH_NPROBES, SEARCH_REFINE_FACTOR


class StoreOutage(click.ClickException):
    # EX_TEMPFAIL: a scheduler may rerun the job, which resumes.
    exit_code = 75


def _run(job, *args):
    """Run a job; bad configuration exits non-zero with the message and no traceback."""
    try:
        return job(*args)
    except KeyboardInterrupt:
        click.echo("interrupted: what was written so far is kept; run the same command again "
                   "to resume", err=True)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        outage = outage_in(exc)
        if outage is None:
            raise
        raise StoreOutage(f"{outage}; what was written so far is kept: rerun the same command "
                          "when the store is back, it resumes") from None


class ManifestCommand(click.Command):
    """A command taking one MANIFEST: an unquoted glob, expanded by the shell into many
    arguments, gets a message that says to quote it."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if "unexpected extra argument" in exc.message:
                raise click.UsageError(
                    f"{exc.message}. A manifest glob must be quoted, or the shell expands it into "
                    f"many arguments: altclip {ctx.info_name} 'manifests/*.parquet' ...", ctx) from None
            raise


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="altclip-pipeline", prog_name="altclip")
def main() -> None:
    """Embed image/caption corpora with AltCLIP on Ray, load them into LanceDB, search them.

    A LanceDB database is a folder or URI (DB); its table is --table NAME [embeddings]."""


def _concurrency(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: N or MIN,MAX") from None
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"{text!r}: N or MIN,MAX")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


_JOB_OPTIONS = [
    click.option("--model", default=DEFAULT_MODEL,
                 help="Hub id, a folder saved with save_pretrained, or its URI."),
    click.option("--towers", default="image,text", metavar="image,text",
                 help="Which towers run: image, text, or image,text for both."),
    click.option("--id-col", default="id", help="Manifest column holding each row's unique id."),
    click.option("--image-col", default=None, show_default="image or image_bytes",
                 help="Column of image URIs/paths or bytes."),
    click.option("--caption-col", default=None, show_default="caption",
                 help="Column of captions."),
    click.option("--batch-size", default=64, type=int, help="Rows per batch through each tower."),
    click.option("--dtype", default="auto", type=click.Choice(DTYPES),
                 help="Tower precision; auto: bfloat16 on GPUs and CPUs that have it, else float32."),
    click.option("--preprocess", default="exact", type=click.Choice(PREPROCESS_MODES),
                 help="exact: the reference's pixels bit for bit; fast: JPEGs decoded at reduced "
                      "scale first (cosine >= 0.999 to exact)."),
    click.option("--concurrency", default=None, type=_concurrency, metavar="N|MIN,MAX",
                 show_default="one per GPU, or 1",
                 help="Actors per tower, or a range the pool autoscales in."),
    click.option("--num-gpus", default=None, type=float,
                 show_default="1/number of towers when the cluster has GPUs, else 0",
                 help="GPUs per tower actor."),
    click.option("--address", default=None, show_default="RAY_ADDRESS, else a local Ray",
                 help="Ray cluster address."),
    click.option("--allow-local-paths", is_flag=True,
                 help="Let a manifest from object storage name local files."),
    click.option("--allow-private-urls", is_flag=True,
                 help="Let image URLs reach loopback, link-local and private addresses."),
    click.option("--storage-patience", "storage_patience_s", default=300.0,
                 type=float, help="Seconds to wait out an unreachable store before stopping "
                                  "(the outputs so far are kept: rerun to resume)."),
    storage_option,
    table_name,
]


def job_options(command):
    """The options `embed` and `reembed` share, turned into one EmbedConfig by `_embed_config`."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


def _embed_config(manifest: str, out: str | None, db: str | None, towers: str,
                  storage_options: tuple[str, ...], **options) -> EmbedConfig:
    return _run(lambda: EmbedConfig(
        manifest=manifest, out=out or "", db=db,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()),
        storage_options=parse_storage_options(storage_options), **options,
    ))


@main.command("embed", cls=ManifestCommand)
@click.argument("manifest")
@click.option("--out", required=True, help="Output folder or URI for Parquet shards and summary.json.")
@db_option(default=None, help="Also load the rows into a table of this LanceDB database.")
@click.option("--rows-per-shard", default=10_000, type=int, help="Rows per Parquet shard at most.")
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
@click.option("--retry-kind", "retry_kind", multiple=True, metavar="KIND",
              help="Also retry rows with this error kind (repeatable), e.g. decode_error after "
                   "a Pillow upgrade; implies --retry-errors.")
@job_options
def embed_command(manifest, out, db, quiet, retry_errors, retry_kind, **options):
    """Embed a manifest's images and captions.

    Writes Parquet shards to OUT and, with --db, loads them into a table. MANIFEST: Parquet, CSV or JSON Lines (a file, folder or quoted glob), or WebDataset shards."""
    if quiet:
        options["progress"] = "quiet"
    if retry_errors or retry_kind:
        kinds = (*(TRANSIENT_ERROR_KINDS if retry_errors else ()), *retry_kind)
        options["retry_kinds"] = tuple(dict.fromkeys(kinds))
    config = _embed_config(manifest, out, db, **options)
    from jobs.embed import run_embed

    summary = _run(run_embed, config)
    if not quiet:
        _print_summary(summary)


@main.command("reembed", cls=ManifestCommand)
@click.argument("manifest")
@db_option(required=True, help="LanceDB database folder or URI (created if absent).")
@click.option("--out", default=None, help="Also write the re-embedded rows as Parquet here.")
@click.option("--prune", is_flag=True, help="Delete table rows whose id left the manifest.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@job_options
def reembed_command(manifest, db, out, prune, dry_run, **options):
    """Update a table from its manifest, embedding what changed.

    Only new and changed rows of MANIFEST go through the towers."""
    from jobs.reembed import run_reembed

    config = ReembedConfig(_embed_config(manifest, out, db, **options), prune=prune,
                           dry_run=dry_run)
    summary = _run(run_reembed, config)
    counts = (f"new {summary['new']}, image changed {summary['image_changed']}, "
              f"caption changed {summary['caption_changed']}, "
              f"model stale {'all' if summary['model_stale'] else 0}, "
              f"gone from the manifest {summary['deleted']}, unchanged {summary['unchanged']}")
    if dry_run:
        click.echo(f"dry run, nothing changed: {counts}; would embed {summary['images_to_embed']} "
                   f"images and {summary['captions_to_embed']} captions, reuse "
                   f"{summary['images_reused']} image vectors")
        return
    click.echo(f"{counts}; embedded {summary['image_tower_rows']} images and "
               f"{summary['text_tower_rows']} captions, reused {summary['images_reused']} image "
               f"vectors; upserted {summary['rows_upserted']}, deleted {summary['rows_deleted']} rows "
               f"in {summary['seconds_total']:.1f} s", err=True)
    click.echo(json.dumps(summary, default=str))


@main.group("table")
def table_group() -> None:
    """A table's versions and indexes: list, roll back, rebuild."""


@table_group.command("versions")
@click.argument("db")
@table_name
@storage_option
def table_versions_command(db, table_name, storage_options):
    """List the table's versions in DB, each with what made it."""
    from pipeline.table import table_versions

    versions = _run(table_versions, db, table_name, parse_storage_options(storage_options))
    _print_rows([{"version": v["version"], "time": v["timestamp"], "rows": v["rows"],
                  "made by": v["made_by"]} for v in versions], as_json=False, as_csv=False, cut=None)


@table_group.command("index")
@click.argument("db")
@table_name
@storage_option
def table_index_command(db, table_name, storage_options):
    """Rebuild the table's indexes: full-text on captions, ANN per vector column when large."""
    from pipeline.table import index_table, open_table

    built = _run(index_table, _run(open_table, db, table_name, parse_storage_options(storage_options)))
    for column, info in built.items():
        click.echo(f"{column}: IVF_HNSW_SQ, cosine, {info['partitions']} partitions over "
                   f"{info['vectors']} vectors")
    if not built:
        click.echo("full-text index rebuilt; too few vectors for an ANN index: search is exact")


@table_group.command("restore")
@click.argument("db")
@click.argument("version", type=int)
@table_name
@storage_option
def table_restore_command(db, version, table_name, storage_options):
    """Make VERSION of the table in DB the latest again (as a new version)."""
    from pipeline.table import restore_version

    result = _run(restore_version, db, table_name, version, parse_storage_options(storage_options))
    click.echo(f"table: {result['uri']} '{result['name']}' restored to version {version} "
               f"({result['rows']} rows, now version {result['version']})")


def _print_summary(summary: dict) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors_by_kind"].items()) or "none"
    rejected = summary["rows_rejected"]
    retried = summary.get("retried")
    if retried is not None and retried["rows"] == 0:
        click.echo("nothing to retry: no row of the output has an error of the kinds asked for", err=True)
    elif retried is not None:
        still = ", ".join(f"{k} {v}" for k, v in retried["still_failing"].items())
        click.echo(f"retried {retried['rows']} rows: {retried['succeeded']} now succeeded"
                   + (f"; still failing: {still}" if still else "")
                   + f" ({summary['seconds_total']:.1f} s)", err=True)
    elif summary["rows_in"] == 0:
        click.echo("the manifest has no rows: nothing to embed", err=True)
    elif summary["rows_embedded"] == 0:
        click.echo(f"nothing to do: all {summary['rows_out']} rows are already in the output "
                   "(no model work)", err=True)
    else:
        resumed = (f" (resumed: {summary['rows_already_done']} rows were already done)"
                   if summary["rows_already_done"] else "")
        click.echo(f"embedded {summary['rows_embedded']} rows in {summary['seconds_total']:.1f} s, "
                   f"{summary['rows_per_second']} rows/s{resumed}", err=True)
    click.echo(
        f"output: {summary['rows_out']} of {summary['rows_in']} manifest rows "
        f"(image vectors {summary['image_ok']}, text vectors {summary['text_ok']}; errors: {errors}; "
        f"rejected: {rejected['missing_id']} without id, {rejected['duplicate_id']} duplicate ids)",
        err=True,
    )
    click.echo(f"summary: {summary['summary_uri']}", err=True)
    if "table" in summary:
        t = summary["table"]
        click.echo(f"table: {t['uri']} '{t['name']}' ({t['rows']} rows, version {t['version']})", err=True)


@main.command("load")
@click.argument("outputs")
@db_option(required=True, help="LanceDB database folder or URI (created if absent).")
@table_name
@storage_option
def load_command(outputs, db, table_name, storage_options):
    """Load the outputs of `embed` into a table.

    The Parquet shards in OUTPUTS are upserted by id."""
    from jobs.load import run_load

    config = _run(lambda: LoadConfig(outputs, db, table_name, parse_storage_options(storage_options)))
    result = _run(run_load, config)
    click.echo(f"table: {result['uri']} '{result['name']}' ({result['rows']} rows: "
               f"{result['inserted']} inserted, {result['updated']} updated; version {result['version']})")


@main.command("search")
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
    from jobs.search import run_search

    config = _run(lambda: SearchConfig(db=db, text=text, image=image, vector=vector,
                                       hybrid=hybrid, against=against, k=k,
                                       where=where, model=model, table_name=table_name,
                                       storage_options=parse_storage_options(storage_options),
                                       nprobes=nprobes, refine_factor=refine_factor))
    hits = _run(run_search, config)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit, ensure_ascii=False, default=str))
        return
    _print_rows([{"rank": rank, "score": hit["score"], "id": hit["id"],
                  "caption": hit.get("caption") or "", "image": hit.get("image") or ""}
                 for rank, hit in enumerate(hits, 1)], as_json=False, as_csv=False)


@main.command("sql")
@click.argument("db_and_query", nargs=-1, required=True, metavar="[DB] QUERY")
@click.option("--parquet", "outputs", default=None, metavar="OUT",
              help="Also the outputs of `embed` in OUT, visible as `outputs`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row and line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line.")
@click.option("--db", hidden=True, expose_value=False,
              callback=renamed("altclip sql DB QUERY (the database first)"))
@table_name
@storage_option
def sql_command(db_and_query, outputs, as_json, as_csv, table_name, storage_options):
    """Run a DuckDB SQL query over a table and/or outputs.

    The table in DB is visible by its name, the outputs of --parquet as `outputs`.

    `altclip sql DB "SELECT ..."`; `altclip sql --parquet OUT "SELECT ... FROM outputs"`."""
    from pipeline.sql import run_sql

    if len(db_and_query) > 2:
        raise click.UsageError("give the database and one query: altclip sql DB \"SELECT ...\" "
                               "(quote the query)")
    db, query = db_and_query if len(db_and_query) == 2 else (None, db_and_query[0])
    if not db and not outputs:
        raise click.UsageError("name what to query: altclip sql DB QUERY, and/or --parquet OUT")
    result = _run(run_sql, query, db, table_name, outputs, parse_storage_options(storage_options))
    _print_rows(result.to_pylist(), as_json, as_csv, names=result.column_names)


def _print_rows(rows: list[dict], as_json: bool, as_csv: bool, names: list[str] | None = None,
                cut: int | None = 60) -> None:
    """Rows as JSON lines, CSV, or a table with a header row (cells longer than `cut` shortened);
    `names` when rows may be none."""
    names = names if names is not None else list(rows[0]) if rows else []
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False, default=str))
    elif as_csv:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(pa.Table.from_pylist(rows) if rows else pa.table({n: [] for n in names}), buf)
        click.echo(buf.getvalue().decode(), nl=False)
    else:
        cells = [[_cell(v, cut) for v in row.values()] for row in rows]
        widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
        click.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)).rstrip())
        for row in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value, cut: int | None) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text if cut is None or len(text) <= cut else text[:cut - 3] + "..."


@main.command("classify")
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
def classify_command(db, label_files, templates, top_k, out, model, table_name, storage_options):
    """Zero-shot labels for every image of a table in DB.

    Adds label, label_score and the top k labels to each row."""
    from jobs.classify import run_classify

    config = _run(lambda: ClassifyConfig(
        db=db, labels=label_files, templates=templates or (DEFAULT_TEMPLATE,), top_k=top_k,
        out=out, model=model, table_name=table_name, storage_options=parse_storage_options(storage_options)))
    result = _run(run_classify, config)
    where = f"Parquet under {out}" if out else f"the table (version {result['version']})"
    click.echo(f"labelled {result['rows']} images with {result['labels']} labels into {where}")


@main.command("report")
@click.argument("outputs")
@click.option("--html", "html_path", default="report.html",
              help="Where to write the page.")
@click.option("--samples", default=12, type=int,
              help="Images on the contact sheet.")
@storage_option
def report_command(outputs, html_path, samples, storage_options):
    """Render a run as one self-contained HTML page.

    From the outputs of `embed` in OUTPUTS: counts, errors, a contact sheet."""
    from pipeline.report import render_report

    page = _run(render_report, outputs, parse_storage_options(storage_options), samples)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    click.echo(f"report: {html_path}")


@main.command("make-test-model")
@click.argument("out_dir")
@click.option("--seed", default=0, type=int, help="Seed of the random weights.")
def make_test_model_command(out_dir, seed):
    """Save a tiny random-weight AltCLIP to OUT_DIR (for tests).

    Its vectors are meaningless; the tokenizer is a real SentencePiece one."""
    from jobs.make_test_model import make_test_model

    make_test_model(out_dir, seed=seed)
    click.echo(f"tiny random-weight AltCLIP saved to {out_dir}")


@main.command("demo")
@click.option("--workdir", default="altclip-demo",
              help="Where the sample corpus, outputs and table go (replaced on each run).")
@click.option("--model", default=None, show_default=f"{DEFAULT_MODEL}, else a tiny random one",
              help="Model to use.")
@click.option("--query", default="un círculo rojo", help="Text to search the sample for.")
def demo_command(workdir, model, query):
    """Embed, load and search a small multilingual sample."""
    from jobs.demo import run_demo

    _run(run_demo, workdir, model, query)


main.add_command(serve_command)

if __name__ == "__main__":
    sys.exit(main())
