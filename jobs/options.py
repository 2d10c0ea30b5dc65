"""What the `altclip` commands share: options, how a job is run and its errors shown, and how
rows are printed."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import unicodedata

import click

from pipeline.config import (
    DEFAULT_MODEL,
    DTYPES,
    PREPROCESS_MODES,
    VECTOR_DTYPES,
    ConfigError,
    EmbedConfig,
)
from pipeline.storage import outage_in
from schemas.table import DEFAULT_TABLE_NAME

# Every command: -h as well as --help, each option's default shown, help not cut at 80 columns.
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


def parse_storage_options(pairs: tuple[str, ...]) -> dict:
    """Repeated `--storage-option KEY=VALUE` -> {KEY: VALUE}."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write it as KEY=VALUE", param_hint="--storage-option")
        options[key] = value
    return options


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Passed to the filesystem of every URI (fsspec storage options).",
)


# `load` and `table index`: where the table's fragments are written and its index segments built.
cluster_option = click.option(
    "--address", default=None, metavar="ADDRESS", show_default="RAY_ADDRESS, else this process",
    help="Ray cluster whose tasks write the table's fragments and build its ANN index's segments "
         "(auto: the cluster `ray start` began on this machine).")


def join_cluster(address: str | None) -> None:
    """Join the Ray cluster at `address`, or at RAY_ADDRESS (as `ray job submit` sets it).
    Without either the work stays in this process: starting a local Ray for it costs seconds
    and buys nothing on one machine."""
    import os

    if address or os.environ.get("RAY_ADDRESS"):
        from pipeline.run.stages import ensure_ray

        ensure_ray(address)


def table_name(command):
    """`--table NAME`, and a message for the names of before 0.2 (`--name`)."""
    command = click.option("--table", "table_name", default=DEFAULT_TABLE_NAME, metavar="NAME",
                           help="Table inside the LanceDB database.")(command)
    return click.option("--name", hidden=True, expose_value=False, callback=renamed("--table NAME"),
                        help="Before 0.2: the table's name.")(command)


def db_option(**kwargs):
    """`--db DB` of the writing commands: the LanceDB database, a folder or URI."""
    return click.option("--db", metavar="DB", **kwargs)


def renamed(now: str):
    """A callback for an option of before 0.2: a message that says what it is called now."""
    def refuse(ctx, param, value):
        if value is not None:
            raise click.UsageError(f"{param.opts[0]} was renamed: use {now} (the database is "
                                   "--db DB on embed, reembed and load, the first argument "
                                   "elsewhere; --table NAME names the table in it)", ctx)
    return refuse


@contextlib.contextmanager
def results_on_stdout():
    """Yields the stream a command's results go to; until then, whatever else is printed to
    stdout goes to stderr. Ray prints its processes' log lines ("(raylet) WARNING: ...") to
    the driver's stdout: results read by a program (`--json`) must stand alone there."""
    results = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield results
    finally:
        sys.stdout = results


json_result = click.option(
    "--json", "as_json", is_flag=True,
    help="Also print the result as one JSON object on stdout (the lines for a person go to stderr).")


def finish_job(result: dict, lines: list[str], as_json: bool) -> None:
    """How every job ends: its lines for a person on stderr and, with --json, its result as one
    JSON object alone on stdout, for a program to read. (A query's rows, from search, sql and
    table versions, are its result: those go to stdout, as a table or with --json as lines.)"""
    for line in lines:
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, default=str))


class StoreOutage(click.ClickException):
    # EX_TEMPFAIL: a scheduler may rerun the job, which resumes.
    exit_code = 75


def run_job(job, *args):
    """Run a job; bad configuration exits non-zero with the message and no traceback."""
    try:
        return job(*args)
    except KeyboardInterrupt:
        click.echo("interrupted: what was written so far is kept; run the same command again "
                   "to resume", err=True)
        sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except ConfigError as exc:
        raise click.ClickException(in_cli_terms(exc)) from None
    except Exception as exc:
        outage = outage_in(exc)
        if outage is None:
            raise
        ctx = click.get_current_context(silent=True)
        kept = " (what it wrote is kept: it resumes)" if ctx is not None and ctx.info_name == "embed" else ""
        raise StoreOutage(f"{outage}; rerun the same command when the store is back{kept}") from None


def in_cli_terms(message: ConfigError | str) -> str:
    """A library message (an error or a note) in the words of the running command: each setting
    it names (`out`, `vector_dtype`) becomes what sets it on the command line (--out on embed,
    OUT on load, --vector-dtype). A setting that is not one of this command's (embed's `towers`,
    named by dedup) takes its option's usual spelling, --towers."""
    ctx = click.get_current_context(silent=True)
    spelled = {}
    for param in ctx.command.params if ctx is not None else ():
        if isinstance(param, click.Argument):
            spelled[param.name] = param.human_readable_name
        elif param.opts:
            spelled[param.name] = param.opts[0]
            spelled.setdefault(param.opts[0].lstrip("-").replace("-", "_"), param.opts[0])
    error = message if isinstance(message, ConfigError) else ConfigError(message)
    return error.naming_settings(lambda setting: spelled.get(setting, "--" + setting.replace("_", "-")))


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


def _directives(text: str) -> tuple[str, ...]:
    return tuple(d.strip().lower() for d in str(text).split(",") if d.strip())


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
                 help="Tower precision; auto: float16 on GPUs, bfloat16 on CPUs with native bfloat16, "
                      "else float32."),
    click.option("--vector-dtype", default="float32", type=click.Choice(VECTOR_DTYPES),
                 help="How the vectors are stored, in the outputs and the table; float16: half the "
                      "bytes (cosine to float32 >= 0.9999, same search results)."),
    click.option("--preprocess", default="exact", type=click.Choice(PREPROCESS_MODES),
                 help="exact: the reference's pixels bit for bit; fast: JPEGs decoded at reduced "
                      "scale first (cosine >= 0.999 to exact)."),
    click.option("--compile", is_flag=True,
                 help="torch.compile the image tower in each actor before its first batch: about "
                      "20-60 s more at its start, then faster (1.2-1.3x on a CPU)."),
    click.option("--concurrency", default=None, type=_concurrency, metavar="N|MIN,MAX",
                 show_default="one per GPU, or 1",
                 help="Actors per tower, or a range the pool autoscales in."),
    click.option("--num-gpus", default=None, type=float,
                 show_default="1/number of towers when the cluster has GPUs, else 0",
                 help="GPUs per tower actor."),
    click.option("--address", default=None, show_default="RAY_ADDRESS, else a local Ray",
                 help="Ray cluster address."),
    click.option("--verbose", is_flag=True,
                 help="Also print Ray's, Ray Data's and Lance's own log lines (execution plans, "
                      "notes about Ray itself); they are always in Ray's log files."),
    click.option("--allow-local-paths", is_flag=True,
                 help="Let a manifest from object storage name local files."),
    click.option("--allow-private-urls", is_flag=True,
                 help="Let image URLs reach loopback, link-local and private addresses."),
    click.option("--fetch-timeout", "fetch_timeout_s", default=None, type=float, show_default="20",
                 help="Seconds an image URL has to answer in full (headers and body), per attempt; "
                      "a second attempt after a timeout, then the row's error is timeout."),
    click.option("--user-agent", default=None, show_default="altclip-pipeline/VERSION",
                 help="The User-Agent of image fetches; its first word is the agent an "
                      "X-Robots-Tag may address (`altclip-pipeline: noai`)."),
    click.option("--disallowed-header-directives", default=None, type=_directives,
                 metavar="D,D,...", show_default="noai,noimageai,noindex,noimageindex,none",
                 help="X-Robots-Tag directives that opt an image out: its row is opted_out, its bytes "
                      "unread. An empty string honours none."),
    click.option("--decode-timeout", "decode_timeout_s", default=None, type=float, show_default="120",
                 help="Seconds one image may take to decode; past it the row's error is timeout "
                      "(the hangs of a batch overlap: several cost one timeout)."),
    click.option("--storage-patience", "storage_patience_s", default=300.0,
                 type=float, help="Seconds to wait out an unreachable store before stopping "
                                  "(the outputs so far are kept: rerun to resume)."),
    storage_option,
    table_name,
]


def job_options(command):
    """The options `embed` and `reembed` share, turned into one EmbedConfig by `embed_config`."""
    for option in reversed(_JOB_OPTIONS):
        command = option(command)
    return command


def embed_config(manifest: str, out: str | None, db: str | None, towers: str,
                  storage_options: tuple[str, ...], **options) -> EmbedConfig:
    return run_job(lambda: EmbedConfig(
        manifest=manifest, out=out or "", db=db,
        towers=tuple(t.strip() for t in towers.split(",") if t.strip()),
        storage_options=parse_storage_options(storage_options), **options,
    ))


def print_rows(rows: list[dict], as_json: bool, as_csv: bool, names: list[str] | None = None,
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
        widths = [max([display_width(n)] + [display_width(r[i]) for r in cells]) for i, n in enumerate(names)]
        for line in [names, *cells]:
            click.echo("  ".join(_padded(v, w) for v, w in zip(line, widths)).rstrip())


def display_width(text: str) -> int:
    """Columns `text` takes in a terminal: two for each wide character (CJK, Hangul, full-width
    forms), none for a combining mark (Devanagari's vowel signs), one for the others."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _padded(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def _cell(value, cut: int | None) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text if cut is None or len(text) <= cut else text[:cut - 3] + "..."
