"""`altclip report`: one self-contained HTML page about a run."""

from __future__ import annotations

import click

from jobs.options import finish_job, json_result, parse_storage_options, run_job, storage_option
from pipeline.write.report import render_report


@click.command("report")
@click.argument("outputs")
@click.option("--html", "html_path", default="report.html",
              help="Where to write the page.")
@click.option("--samples", default=12, type=int,
              help="Images on the contact sheet.")
@storage_option
@json_result
def report_command(outputs, html_path, samples, storage_options, as_json):
    """Render a run as one self-contained HTML page.

    From the outputs of `embed` in OUTPUTS: counts, errors, a contact sheet."""
    page = run_job(render_report, outputs, parse_storage_options(storage_options), samples)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    finish_job({"report": html_path}, [f"report: {html_path}"], as_json)
