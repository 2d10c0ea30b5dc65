"""The `altclip` command."""

from __future__ import annotations

import io
import json
import sys

import click

from jobs.options import parse_storage_options
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


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Passed to the filesystem of every URI (fsspec storage options).",
)
table_name = click.option("--name", "table_name", default=DEFAULT_TABLE_NAME, show_default=True,
                          help="Table name inside the LanceDB database.")


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


@click.group()
def main() -> None:
    """Embed image/caption corpora with AltCLIP on Ray, load them into LanceDB, search them."""


def _concurrency(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: N or MIN,MAX") from None
    if len(parts) not in (1, 2):
        raise click.BadParameter(f"{text!r}: N or MIN,MAX")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


_JOB_OPTIONS = [
    click.option("--model", default=DEFAULT_MODEL, show_default=True,
                 help="Hub id, a folder saved with save_pretrained, or its URI."),
    click.option("--towers", default="image,text", show_default=True, help="image, text or both."),
    click.option("--id-col", default="id", show_default=True),
    click.option("--image-col", default=None,
                 help="Column of image URIs/paths or bytes [image|image_bytes]."),
    click.option("--caption-col", default=None, help="Column of captions [caption]."),
    click.option("--batch-size", default=64, show_default=True, type=int),
    click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES)),
    click.option("--preprocess", default="exact", show_default=True, type=click.Choice(PREPROCESS_MODES),
                 help="exact: the reference's pixels bit for bit; fast: JPEGs decoded at reduced "
                      "scale first (cosine >= 0.999 to exact)."),
    click.option("--concurrency", default=None, type=_concurrency, metavar="N|MIN,MAX",
                 help="Actors per tower, or a range the pool autoscales in [one per GPU, or 1]."),
    click.option("--num-gpus", default=None, type=float,
                 help="GPUs per tower actor [1/number of towers when the cluster has GPUs, else 0]."),
    click.option("--address", default=None,
                 help="Ray cluster address [RAY_ADDRESS, else in-process Ray]."),
    click.option("--allow-local-paths", is_flag=True,
                 help="Let a manifest from object storage name local files."),
    click.option("--allow-private-urls", is_flag=True,
                 help="Let image URLs reach loopback, link-local and private addresses."),
    click.option("--storage-patience", "storage_patience_s", default=300.0, show_default=True,
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


def _embed_config(manifest: str, out: str | None, table: str | None, towers: str,
                  storage_options: tuple[str, ...], **options) -> EmbedConfig:
    return _run(lambda: EmbedConfig(
        manifest=manifest, out=out or "", table=table,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()),
        storage_options=parse_storage_options(storage_options), **options,
    ))


@main.command("embed", cls=ManifestCommand)
@click.argument("manifest")
@click.option("--out", required=True, help="Output folder or URI for Parquet shards and summary.json.")
@click.option("--table", default=None, help="Also load the rows into this LanceDB database.")
@click.option("--rows-per-shard", default=10_000, show_default=True, type=int)
@click.option("--overwrite", is_flag=True,
              help="Replace what OUT holds; without it a rerun resumes (and refuses other settings).")
@click.option("--log-format", "progress", default="auto", show_default=True,
              type=click.Choice(["auto", "text", "json"]),
              help="Progress: auto = bars on a terminal, else a text line per interval; json lines.")
@click.option("--progress-interval", "progress_interval_s", default=10.0, show_default=True,
              type=float, help="Seconds between progress lines.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--retry-errors", is_flag=True,
              help=f"Embed again only the rows of OUT whose error may be transient "
                   f"({', '.join(TRANSIENT_ERROR_KINDS)}), replacing them in place.")
@click.option("--retry-kind", "retry_kind", multiple=True, metavar="KIND",
              help="Also retry rows with this error kind (repeatable), e.g. decode_error after "
                   "a Pillow upgrade; implies --retry-errors.")
@job_options
def embed_command(manifest, out, table, quiet, retry_errors, retry_kind, **options):
    """Embed the images and captions of MANIFEST (Parquet, CSV or JSON Lines; file, folder, glob;
    WebDataset shards)."""
    if quiet:
        options["progress"] = "quiet"
    if retry_errors or retry_kind:
        kinds = (*(TRANSIENT_ERROR_KINDS if retry_errors else ()), *retry_kind)
        options["retry_kinds"] = tuple(dict.fromkeys(kinds))
    config = _embed_config(manifest, out, table, **options)
    from jobs.embed import run_embed

    summary = _run(run_embed, config)
    if not quiet:
        _print_summary(summary)


@main.command("reembed", cls=ManifestCommand)
@click.argument("manifest")
@click.option("--table", required=True, help="LanceDB database folder or URI (created if absent).")
@click.option("--out", default=None, help="Also write the re-embedded rows as Parquet here.")
@click.option("--prune", is_flag=True, help="Delete table rows whose id left the manifest.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@job_options
def reembed_command(manifest, table, out, prune, dry_run, **options):
    """Bring TABLE up to date with MANIFEST: embed only new and changed rows, upsert them."""
    from jobs.reembed import run_reembed

    config = ReembedConfig(_embed_config(manifest, out, table, **options), prune=prune,
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
    """Versions of a table: list them, roll back."""


@table_group.command("versions")
@click.argument("db")
@table_name
@storage_option
def table_versions_command(db, table_name, storage_options):
    """List TABLE's versions with what each run changed."""
    from pipeline.table import table_versions

    for v in _run(table_versions, db, table_name, parse_storage_options(storage_options)):
        run = v["run"] or {}
        what = ", ".join(f"{k} {val}" for k, val in run.items() if k != "job") if run else ""
        click.echo(f"{v['version']:>5}  {v['timestamp']}  {v['rows']:>9} rows  {run.get('job', '')}  {what}")


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
    """Make VERSION of the table the latest again (as a new version)."""
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
@click.option("--table", required=True, help="LanceDB database folder or URI.")
@table_name
@storage_option
def load_command(outputs, table, table_name, storage_options):
    """Load the Parquet OUTPUTS of `embed` into a LanceDB table (upsert on id)."""
    from jobs.load import run_load

    result = _run(run_load, LoadConfig(outputs, table, table_name, parse_storage_options(storage_options)))
    click.echo(f"table: {result['uri']} '{result['name']}' ({result['rows']} rows: "
               f"{result['inserted']} inserted, {result['updated']} updated; version {result['version']})")


@main.command("search")
@click.argument("table")
@click.option("--text", default=None, help="Query text, in any language.")
@click.option("--image", default=None, help="Query image path or URI.")
@click.option("--vector", default=None, help="Query vector: a .npy file or a JSON list.")
@click.option("--hybrid", is_flag=True, help="With --text: vector + full-text search on captions, fused.")
@click.option("--against", type=click.Choice(["image", "text"]), default=None,
              help="Which vectors to search [image].")
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--where", default=None, help="SQL filter on the table's columns, applied before ranking.")
@click.option("--model", default=None, help="Query model [the one the table was built with].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit and line, best first.")
@click.option("--nprobes", default=None, type=int,
              help=f"ANN index partitions to search; more: better recall, slower [{SEARCH_NPROBES}].")
@click.option("--refine-factor", default=None, type=int,
              help=f"Candidates re-ranked by exact distance, per hit [{SEARCH_REFINE_FACTOR}].")
@table_name
@storage_option
def search_command(table, text, image, vector, hybrid, against, k, where, model, as_json, nprobes,
                   refine_factor, table_name, storage_options):
    """Nearest rows of TABLE (a LanceDB database) to a text or an image, by cosine."""
    from jobs.search import run_search

    config = _run(lambda: SearchConfig(table=table, text=text, image=image, vector=vector,
                                       hybrid=hybrid, against=against, k=k,
                                       where=where, model=model, table_name=table_name,
                                       storage_options=parse_storage_options(storage_options),
                                       nprobes=nprobes, refine_factor=refine_factor))
    hits = _run(run_search, config)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit, ensure_ascii=False, default=str))
        return
    for rank, hit in enumerate(hits, 1):
        caption = (hit.get("caption") or "")[:60]
        click.echo(f"{rank:>3}  {hit['score']:.4f}  {hit['id']:<20} {caption:<60} {hit.get('image') or ''}")


@main.command("sql")
@click.argument("query")
@click.option("--db", default=None, help="LanceDB database whose table the query can name.")
@click.option("--parquet", "outputs", default=None, help="Embed outputs, visible as `outputs`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per row and line.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header line.")
@table_name
@storage_option
def sql_command(query, db, outputs, as_json, as_csv, table_name, storage_options):
    """Run the SQL QUERY (DuckDB) over a table (`--db`, visible by its name) and/or outputs."""
    from pipeline.sql import run_sql

    if not db and not outputs:
        raise click.UsageError("name what to query: --db DB and/or --parquet OUT")
    result = _run(run_sql, query, db, table_name, outputs, parse_storage_options(storage_options))
    _print_rows(result, as_json, as_csv)


def _print_rows(result, as_json: bool, as_csv: bool) -> None:
    if as_json:
        for row in result.to_pylist():
            click.echo(json.dumps(row, ensure_ascii=False, default=str))
    elif as_csv:
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(result, buf)
        click.echo(buf.getvalue().decode(), nl=False)
    else:
        rows = [[_cell(v) for v in row.values()] for row in result.to_pylist()]
        widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(result.column_names)]
        click.echo("  ".join(n.ljust(w) for n, w in zip(result.column_names, widths)))
        for row in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(value) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@main.command("classify")
@click.argument("db")
@click.option("--labels", "label_files", multiple=True, required=True,
              help="One label per line; repeat with the same classes in other languages.")
@click.option("--template", "templates", multiple=True,
              help='Prompt template, repeatable, averaged ["a photo of a {}"].')
@click.option("--top-k", default=3, show_default=True, type=int)
@click.option("--out", default=None, help="Write id + labels as Parquet here instead of into the table.")
@click.option("--model", default=None, help="[the model the table was built with]")
@table_name
@storage_option
def classify_command(db, label_files, templates, top_k, out, model, table_name, storage_options):
    """Zero-shot labels for every image of the table in DB: label, label_score, top k."""
    from jobs.classify import run_classify

    config = _run(lambda: ClassifyConfig(
        table=db, labels=label_files, templates=templates or (DEFAULT_TEMPLATE,), top_k=top_k,
        out=out, model=model, table_name=table_name, storage_options=parse_storage_options(storage_options)))
    result = _run(run_classify, config)
    where = f"Parquet under {out}" if out else f"the table (version {result['version']})"
    click.echo(f"labelled {result['rows']} images with {result['labels']} labels into {where}")


@main.command("report")
@click.argument("outputs")
@click.option("--html", "html_path", default="report.html", show_default=True,
              help="Where to write the page.")
@click.option("--samples", default=12, show_default=True, type=int,
              help="Images on the contact sheet.")
@storage_option
def report_command(outputs, html_path, samples, storage_options):
    """Render the run in OUTPUTS as one self-contained HTML page."""
    from pipeline.report import render_report

    page = _run(render_report, outputs, parse_storage_options(storage_options), samples)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    click.echo(f"report: {html_path}")


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


main.add_command(serve_command)

if __name__ == "__main__":
    sys.exit(main())
