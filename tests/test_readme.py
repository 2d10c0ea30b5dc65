"""The README's commands as a user runs them: `altclip demo`, then each line of the README's
demo block as written, from the folder the demo ran in."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import altclip

README = Path(__file__).resolve().parent.parent / "README.md"


def demo_block() -> list[str]:
    """The command lines of the README's "Try it on the demo" block."""
    section = README.read_text(encoding="utf-8").split("## Try it on the demo", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's demo section has no ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readmes_demo_commands_run_as_written(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    altclip("demo")  # no hub here: the demo goes on with its tiny model, as the README says
    said = {}
    for line in demo_block():
        command, *args = shlex.split(line)
        assert command == "altclip", line
        said[line] = altclip(*args)
    assert len(said) >= 10

    def result_of(start: str):
        return next(result for line, result in said.items() if line.startswith(start))

    found = [json.loads(hit) for hit in result_of("altclip search altclip-demo/db --image").stdout.splitlines()]
    assert len(found) == 3 and found[0]["id"] == "sample-000"  # the image itself comes first
    by_lang = result_of("altclip sql altclip-demo/db \"SELECT lang").stdout
    for lang in ("ar", "de", "en", "es", "ru", "zh"):
        assert re.search(rf"^{lang}\s+6$", by_lang, re.M), by_lang
    assert re.search(r"^36$", result_of("altclip sql altclip-demo/db \"SELECT count(*) AS n FROM outputs").stdout,
                     re.M)
    assert "labelled 36 images with 3 labels" in result_of("altclip classify").stderr
    labels = result_of("altclip sql altclip-demo/db \"SELECT id, label").stdout.splitlines()
    assert len(labels) == 4 and labels[1].startswith("sample-000")  # a header and 3 rows
    assert json.loads(result_of("altclip dedup").stdout)["against"] == "image"
    assert "classify" in result_of("altclip table versions").stdout
    exported = tmp_path / "altclip-demo" / "export"
    assert pq.read_table(exported / "metadata" / "metadata_0.parquet").num_rows == 36
    assert (tmp_path / "altclip-demo" / "report.html").stat().st_size > 0
