"""The `altclip` command: the group that lists each job's command.

Each job module owns its command; a module is imported only when its command runs, and a job's
stages (Ray, torch, LanceDB: seconds of imports) only when the job runs, so that `altclip -h`
and every `altclip COMMAND -h` answer at once (tests/test_cli_messages.py holds them to it). The
summaries listed here are the commands' own first lines (a test keeps them equal).
"""

from __future__ import annotations

import importlib
import sys

import click

from jobs.options import CONTEXT

# name -> (module, command, summary)
COMMANDS = {
    "classify": ("jobs.classify", "classify_command", "Zero-shot labels for every image of a table in DB."),
    "dedup": ("jobs.dedup", "dedup_command", "Mark near-duplicate images or captions in a table in DB."),
    "demo": ("jobs.demo", "demo_command", "Embed, load and search a small multilingual sample."),
    "embed": ("jobs.embed", "embed_command", "Embed a manifest's images and captions."),
    "load": ("jobs.load", "load_command", "Load the outputs of `embed` into a table."),
    "export": ("jobs.export", "export_command",
               "Write a run's outputs in clip-retrieval's layout (embedding-reader, autofaiss)."),
    "make-test-model": ("jobs.make_test_model", "make_test_model_command",
                        "Save a tiny random-weight AltCLIP to OUT_DIR (for tests)."),
    "reembed": ("jobs.reembed", "reembed_command", "Update a table from its manifest, embedding what changed."),
    "report": ("jobs.report", "report_command", "Render a run as one self-contained HTML page."),
    "search": ("jobs.search", "search_command", "Nearest rows to a text, an image or a vector."),
    "serve": ("jobs.serve", "serve_command", "Serve a search page and a JSON API over a table in DB."),
    "sql": ("jobs.sql", "sql_command", "Run a DuckDB SQL query over a table and/or outputs."),
    "table": ("jobs.table", "table_group", "A table's versions and indexes: list, roll back, rebuild."),
}


class JobsGroup(click.Group):
    """Lists COMMANDS without importing them; imports a job's module when its command runs."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, command, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), command)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in sorted(COMMANDS.items())])


@click.group(cls=JobsGroup, context_settings=CONTEXT)
@click.version_option(package_name="altclip-pipeline", prog_name="altclip")
def main() -> None:
    """Embed image/caption corpora with AltCLIP on Ray, load them into LanceDB, search them.

    A LanceDB database is a folder or URI (DB); its table is --table NAME [embeddings]."""


if __name__ == "__main__":
    sys.exit(main())
