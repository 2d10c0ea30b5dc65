"""Command-line values the `altclip` commands share, parsed in one place."""

from __future__ import annotations

import click

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
