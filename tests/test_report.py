"""Seeing a run: progress lines while it runs, the summary's figures, and the HTML report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.embed.towers import accelerator_stats
from pipeline.progress import format_progress
from pipeline.read.ids import scan_ids
from pipeline.write.report import spread_sample
from tests.conftest import altclip
from tests.corpus import odd_images, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def run(tiny_model, ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    images = odd_images()
    write_corpus(folder, images={k: images[k] for k in sorted(images)[:8]})
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    rows.append({"id": "broken", "image": "images/missing.jpg", "caption": "lost", "lang": "en",
                 "rank": 99})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    import pipeline.run.resume

    def noisy_scan(*args):  # as Ray's log monitor prints its processes' lines, during the job
        print("(raylet) WARNING: 26 PYTHON worker processes have been started on node ...", file=sys.stdout)
        return scan_ids(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.run.resume, "scan_ids", noisy_scan)
        result = altclip("embed", folder / "manifest.parquet", "--out", folder / "out", "--model",
                         tiny_model, "--log-format", "json", "--progress-interval", "0.2",
                         "--batch-size", "4")
    return folder, result, len(rows)


def test_progress_lines_and_summary_figures(run):
    folder, result, rows = run
    # --log-format json: stdout holds the JSON lines and nothing else, for a log shipper; what
    # Ray prints there during the job goes to stderr.
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert "(raylet) WARNING" in result.stderr
    assert events and events[-1]["event"] == "finished"
    assert events[-1]["rows_done"] == events[-1]["rows_total"] == rows
    assert all(e["rows_done"] <= rows for e in events)
    stages = events[-1]["stages"]
    assert set(stages) == {"fetch", "decode", "tokenize", "image_tower", "text_tower", "write"}
    assert stages["image_tower"]["busy_seconds"] > 0 and stages["image_tower"]["rows_per_busy_second"] > 0
    assert events[-1]["bottleneck"] == max(stages, key=lambda s: stages[s]["busy_seconds"])
    assert events[-1]["accelerators"] == {}  # a CPU reports none
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == rows
    assert summary["image_ok"] + summary["errors_by_kind"]["image.not_found"] == rows
    assert summary["error_examples"] == {"image.not_found": ["broken"]}
    assert set(summary["stage_busy_seconds"]) == {"fetch", "decode", "tokenize", "image_tower", "text_tower", "write"}
    assert sum(r for _, r in summary["stage_timeline"]["image_tower"]) == rows
    # The timeline counts from the run's start: the start-up is the time before the first rows.
    assert summary["stage_timeline"]["image_tower"][0][0] >= summary["seconds_to_first_row"] - 0.01
    assert summary["bottleneck"] in summary["stage_busy_seconds"]
    assert summary["stage_busy_seconds"][summary["bottleneck"]] == max(summary["stage_busy_seconds"].values())
    assert 0 < summary["seconds_to_first_row"] < summary["seconds_total"]
    for tower in ("image_tower", "text_tower"):
        actors = summary["tower_actors"][tower]
        assert sum(a["rows"] for a in actors) == rows and all(a["rows_per_busy_second"] > 0 for a in actors)


def test_report_renders_plot_errors_and_contact_sheet(run, tmp_path):
    folder, _, rows = run
    page = tmp_path / "report.html"
    altclip("report", folder / "out", "--html", page, "--samples", "6")
    text = page.read_text()
    assert '<svg id="throughput"' in text and text.count("<polyline") == 6
    assert "image.not_found" in text and "broken (" in text and "missing.jpg)" in text  # id and path
    assert text.count('src="data:image/jpeg;base64,') == 6
    assert 'id="start-up"' in text and "seconds to first row" in text and "<th>bottleneck</th>" in text
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the page was checked as HTML only")
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1000,1500",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    picture = Image.open(shot).convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 20)
    assert picture.size == (1000, 1500) and colours is not None and len(colours) > 200  # not blank
    if os.environ.get("ALTCLIP_UPDATE_SCREENSHOTS"):  # refresh the README's picture on request
        shutil.copy(shot, os.path.join(REPO, "docs", "report.png"))


def test_the_contact_sheet_shows_each_image_once_spread_over_the_run():
    # Ten copies of one photo first (a corpus with repeats), then twenty distinct images.
    rows = ([{"id": f"copy{n}", "image": f"c{n}.jpg", "image_sha256": "same"} for n in range(10)]
            + [{"id": f"r{n}", "image": f"r{n}.jpg", "image_sha256": f"h{n}"} for n in range(20)])
    picked = spread_sample(rows, 6)
    assert [r["id"] for r in picked] == ["copy0", "r3", "r7", "r11", "r15", "r19"]
    assert len(spread_sample(rows, 50)) == 21  # fewer distinct images than asked: each once
    without_hashes = [{"id": "a", "image": "x.jpg"}, {"id": "b", "image": "x.jpg"}, {"id": "c", "image": "y.jpg"}]
    assert [r["id"] for r in spread_sample(without_hashes, 5)] == ["a", "c"]


def test_progress_line_names_stages_bottleneck_and_accelerators():
    snapshot = {"rows": 50, "stage_rows": {"decode": 50, "image_tower": 50},
                "stage_seconds": {"decode": 2.0, "image_tower": 5.0},
                "devices": {"image_tower": {"a1": {"name": "NVIDIA H100", "memory_peak_gib": 3.2,
                                                   "memory_total_gib": 79.1, "utilisation_percent": 97}}}}
    assert format_progress(snapshot, 100, 10.0, "text", final=False) == (
        "progress: 50/100 rows (50%), 5.0 rows/s, ETA 10 s; busy s (rows per busy s): decode 2.0 (25), "
        "image_tower 5.0 (10); bottleneck image_tower; image_tower on NVIDIA H100: 3.2/79.1 GiB peak, 97% busy")
    event = json.loads(format_progress(snapshot, 100, 10.0, "json", final=True))
    assert event["event"] == "finished" and event["bottleneck"] == "image_tower"
    assert event["stages"]["decode"] == {"busy_seconds": 2.0, "rows_per_busy_second": 25.0}
    assert event["accelerators"]["image_tower"]["a1"]["utilisation_percent"] == 97


def test_accelerator_stats_come_from_torch_cuda_and_nvml(monkeypatch):
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some GPU")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 4 * gib)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: 88)
    cuda = torch.device("cuda", 0)
    assert accelerator_stats(cuda) == {"name": "Some GPU", "memory_peak_gib": 3.0, "memory_reserved_gib": 4.0,
                                       "memory_used_gib": 20.0, "memory_total_gib": 80.0,
                                       "utilisation_percent": 88}

    def no_nvml(device):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert "utilisation_percent" not in accelerator_stats(cuda)
    assert accelerator_stats(torch.device("cpu")) == {}
