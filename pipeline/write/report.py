"""A run as one self-contained HTML page: figures, a throughput plot, errors, provenance, and a
contact sheet of images with their nearest captions."""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.decode.fetch import FetchPolicy, read_bytes
from pipeline.decode.thumbnails import make_thumbnails
from pipeline.write.shards import outputs_dataset
from pipeline.write.summary import SUMMARY_NAME
from schemas.embeddings import IMAGE_EMBEDDING, IMAGE_SHA256, TEXT_EMBEDDING
from schemas.manifest import CAPTION, ID, IMAGE

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def read_summary(out: str, storage_options: dict | None = None) -> dict:
    fs, path = storage.filesystem(out, storage_options)
    try:
        with fs.open(f"{path.rstrip('/')}/{SUMMARY_NAME}") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{out} has no {SUMMARY_NAME}: is it the {named('out')} of an embed run?") from None


def _throughput_svg(timeline: dict[str, list], first_row: float | None, width: int = 720,
                    height: int = 260) -> str:
    """Cumulative rows finished per stage over the run's seconds, as an SVG line plot, with the
    start-up (until the first row out of a tower, `first_row` seconds) shaded."""
    if not timeline:
        return "<p>No timeline recorded.</p>"
    series = {stage: np.cumsum([rows for _, rows in points]) for stage, points in timeline.items()}
    times = {stage: [t for t, _ in points] for stage, points in timeline.items()}
    t_max = max(max(t) for t in times.values()) or 1.0
    y_max = max(s[-1] for s in series.values()) or 1
    left, bottom, plot_w, plot_h = 60, height - 40, width - 200, height - 60
    parts = [f'<svg id="throughput" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    if first_row:
        start_w = plot_w * min(first_row / t_max, 1.0)
        parts += [f'<rect id="start-up" x="{left}" y="{bottom - plot_h}" width="{start_w:.1f}" '
                  f'height="{plot_h}" fill="#eee"/>',
                  f'<text x="{left + 4}" y="{bottom - plot_h + 14}" font-size="12" fill="#777">'
                  f'start-up {first_row:.1f} s</text>']
    parts += [
             f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{bottom - plot_h}" stroke="#333"/>',
             f'<text x="{left}" y="{height - 10}" font-size="12">0 s</text>',
             f'<text x="{left + plot_w - 40}" y="{height - 10}" font-size="12">{t_max:.1f} s</text>',
             f'<text x="5" y="{bottom - plot_h + 4}" font-size="12">{y_max}</text>',
             f'<text x="5" y="{bottom}" font-size="12">0 rows</text>']
    for n, (stage, cumulative) in enumerate(sorted(series.items())):
        colour = _COLOURS[n % len(_COLOURS)]
        # From nothing at its first bucket: no rows before it, the start-up included.
        points = [(left + plot_w * times[stage][0] / t_max, bottom)] + [
            (left + plot_w * t / t_max, bottom - plot_h * c / y_max)
            for t, c in zip(times[stage], cumulative)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{left + plot_w + 12}" y="{bottom - plot_h + 16 * n + 10}" '
                     f'font-size="13" fill="{colour}">{html.escape(stage)}</text>')
    parts.append("</svg>")
    return "".join(parts)


THUMBNAIL_SIZE = 160


def _thumbnails(uris: list[str | None], storage_options: dict | None) -> list[str | None]:
    """Each image as a data: URI of its thumbnail; None for any that cannot be shown."""
    policy = FetchPolicy(storage_options or {}, allow_local_paths=True)
    read: dict[int, bytes] = {}
    for n, uri in enumerate(uris):
        try:
            if uri:
                read[n] = read_bytes(uri, policy)
        except Exception:  # any image that cannot be read is shown as missing
            continue
    made = dict(zip(read, make_thumbnails(list(read.values()), THUMBNAIL_SIZE)))
    return ["data:image/jpeg;base64," + base64.b64encode(made[n]).decode()
            if isinstance(made.get(n), bytes) else None for n in range(len(uris))]


def spread_sample(rows: list[dict], samples: int) -> list[dict]:
    """One row per distinct image (by its bytes' hash, else its path), `samples` of them spread
    evenly over the run's rows: a corpus with copies of one photo shows it once."""
    seen, distinct = set(), []
    for row in rows:
        key = row.get(IMAGE_SHA256) or row[IMAGE]
        if key not in seen:
            seen.add(key)
            distinct.append(row)
    if len(distinct) <= samples:
        return distinct
    return [distinct[int(i)] for i in np.linspace(0, len(distinct) - 1, samples).round()]


def _contact_sheet(rows: list[dict], storage_options: dict | None, samples: int) -> str:
    texts = [r for r in rows if r[TEXT_EMBEDDING] is not None]
    # Only images the job embedded: what it refused (a local file from a remote manifest, a
    # private URL) is not read here either.
    images = spread_sample([r for r in rows if r[IMAGE_EMBEDDING] is not None], samples)
    if not texts or not images:
        return "<p>No rows with both kinds of vectors to show.</p>"
    text_matrix = np.asarray([r[TEXT_EMBEDDING] for r in texts], dtype=np.float32)
    cells = []
    thumbs = _thumbnails([row[IMAGE] for row in images], storage_options)
    for row, thumb in zip(images, thumbs):
        scores = text_matrix @ np.asarray(row[IMAGE_EMBEDDING], dtype=np.float32)
        best = int(np.argmax(scores))
        picture = f'<img src="{thumb}" alt="{html.escape(row[ID])}">' if thumb else "<div>(no image)</div>"
        own = " (its own)" if texts[best][ID] == row[ID] else ""
        cells.append(
            f'<figure>{picture}<figcaption><b>{html.escape(row[ID])}</b><br>'
            f'nearest caption{own}: {html.escape(texts[best][CAPTION] or "")} '
            f'<span class="score">{scores[best]:.3f}</span></figcaption></figure>')
    return '<div class="sheet">' + "".join(cells) + "</div>"


def _error_rows(errors: dict, examples: dict, image_of: dict) -> str:
    """A row per error kind: its count and example ids, each image error's id beside its path."""
    def example(kind: str, id_: str) -> str:
        path = image_of.get(id_) if kind.startswith("image.") else None
        return f"{id_} ({storage.redact(path)})" if path else id_
    return "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v}</td>"
        f"<td>{html.escape(', '.join(example(k, i) for i in examples.get(k, [])))}</td></tr>"
        for k, v in errors.items()) or '<tr><td colspan="3">none</td></tr>'


def render_report(out: str, storage_options: dict | None = None, samples: int = 12) -> str:
    summary = read_summary(out, storage_options)
    figures = [("rows in", summary["rows_in"]), ("rows out", summary["rows_out"]),
               ("image vectors", summary["image_ok"]), ("text vectors", summary["text_ok"]),
               ("rows embedded this run", summary["rows_embedded"]),
               ("wall seconds", summary["seconds_total"]), ("rows/s", summary["rows_per_second"]),
               ("seconds to first row", summary.get("seconds_to_first_row")),
               ("bottleneck", summary.get("bottleneck"))]
    busy = summary.get("stage_busy_seconds", {})
    errors = summary.get("errors_by_kind", {})
    examples = summary.get("error_examples", {})
    provenance = summary.get("provenance", {})
    rows = lambda pairs: "".join(  # noqa: E731
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    dataset = outputs_dataset(out, storage_options)  # None: a run of an empty manifest
    outputs = [] if dataset is None else dataset.to_table(
        columns=[ID, IMAGE, CAPTION, IMAGE_EMBEDDING, TEXT_EMBEDDING, IMAGE_SHA256]).to_pylist()
    image_of = {r[ID]: r[IMAGE] for r in outputs}
    error_rows = _error_rows(errors, examples, image_of)
    throughput = _throughput_svg(summary.get("stage_timeline", {}), summary.get("seconds_to_first_row"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>altclip run: {html.escape(storage.redact(out))}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 16px; }}
th, td {{ text-align: left; padding: 3px 10px; border-bottom: 1px solid #ddd; }}
.sheet {{ display: grid; grid-template-columns: repeat(auto-fill, 190px); gap: 12px; }}
figure {{ margin: 0; font-size: 12px; }} figure img {{ max-width: 160px; max-height: 160px; }}
.score {{ color: #777; }}
</style></head><body>
<h1>Embedding run</h1><p>{html.escape(storage.redact(out))}</p>
<h2>Figures</h2><table>{rows(figures)}</table>
<h2>Throughput over time (rows finished per stage)</h2>{throughput}
<h2>Busy seconds per stage</h2><table>{rows(busy.items())}</table>
<h2>Errors by kind</h2><table><tr><th>kind</th><th>rows</th><th>example ids</th></tr>{error_rows}</table>
<h2>Provenance</h2><table>{rows((k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in provenance.items())}</table>
<h2>Contact sheet: images and their nearest captions</h2>{_contact_sheet(outputs, storage_options, samples)}
</body></html>"""
