"""The demo job: a small multilingual sample corpus -> embed -> LanceDB -> a search, in one command."""

from __future__ import annotations

import os
import shutil

import click
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from jobs.embed import run_embed
from jobs.options import in_cli_terms, run_job
from jobs.search import run_search
from pipeline.config import DEFAULT_MODEL, ConfigError, EmbedConfig, SearchConfig

_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220),
            "yellow": (240, 210, 20), "black": (10, 10, 10), "purple": (140, 40, 170)}
_SHAPES = ("circle", "square", "triangle")
# caption templates per language, filled with (colour, shape) words of that language
_WORDS = {
    "en": ("a {c} {s} on a white background",
           {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "black": "black", "purple": "purple"},
           {"circle": "circle", "square": "square", "triangle": "triangle"}),
    "es": ("un {s} {c} sobre fondo blanco",
           {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "black": "negro", "purple": "morado"},
           {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}),
    "de": ("ein {c} {s} auf weißem Grund",
           {"red": "rotes", "green": "grünes", "blue": "blaues", "yellow": "gelbes", "black": "schwarzes", "purple": "lila"},
           {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck"}),
    "ru": ("{c} {s} на белом фоне",
           {"red": "красный", "green": "зелёный", "blue": "синий", "yellow": "жёлтый", "black": "чёрный", "purple": "фиолетовый"},
           {"circle": "круг", "square": "квадрат", "triangle": "треугольник"}),
    "zh": ("白色背景上的{c}{s}",
           {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "black": "黑色", "purple": "紫色"},
           {"circle": "圆形", "square": "正方形", "triangle": "三角形"}),
    "ar": ("{s} {c} على خلفية بيضاء",
           {"red": "أحمر", "green": "أخضر", "blue": "أزرق", "yellow": "أصفر", "black": "أسود", "purple": "بنفسجي"},
           {"circle": "دائرة", "square": "مربع", "triangle": "مثلث"}),
}


def make_sample_corpus(folder: str) -> str:
    """36 images (6 colours x 3 shapes x 2 sizes) with captions in 6 languages, and the shapes'
    names as label files (shapes.LANG.txt); returns the manifest."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    languages = list(_WORDS)
    for n, (colour, shape, size) in enumerate(
        (c, s, z) for c in _COLOURS for s in _SHAPES for z in ((640, 480), (300, 500))
    ):
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        w, h = size
        box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[colour])
        else:
            draw.polygon([(w / 2, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)], fill=_COLOURS[colour])
        name = f"{n:03d}-{colour}-{shape}.jpg"
        image.save(os.path.join(images, name), quality=90)
        lang = languages[n % len(languages)]
        template, colours, shapes = _WORDS[lang]
        rows.append({"id": f"sample-{n:03d}", "image": f"images/{name}",
                     "caption": template.format(c=colours[colour], s=shapes[shape]), "lang": lang,
                     "colour": colour, "shape": shape})
    manifest = os.path.join(folder, "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    for lang, (_, _, shapes) in _WORDS.items():  # label files for `altclip classify`, a language each
        with open(os.path.join(folder, f"shapes.{lang}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{shapes[s]}\n" for s in _SHAPES))
    return manifest


def _pick_model(workdir: str, model: str | None) -> str:
    if model is not None:
        return model
    from pipeline.embed.model import resolve_model  # torch: not for `altclip demo -h`

    try:
        resolve_model(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except ConfigError as exc:
        tiny = os.path.join(workdir, "tiny-random-model")
        banner = "!" * 78
        click.echo(
            f"{banner}\n{in_cli_terms(exc)}\n"
            f"The demo goes on with a TINY MODEL OF RANDOM WEIGHTS saved to {tiny}.\n"
            "It shows the pipeline working end to end; its vectors and search results are\n"
            f"MEANINGLESS. Pass --model with a real AltCLIP folder for real results.\n{banner}",
            err=True,
        )
        from jobs.make_test_model import make_test_model

        return make_test_model(tiny)


def run_demo(workdir: str, model: str | None, query: str) -> list[dict]:
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    model = _pick_model(workdir, model)
    manifest = make_sample_corpus(os.path.join(workdir, "corpus"))
    db = os.path.join(workdir, "db")
    summary = run_embed(EmbedConfig(manifest=manifest, out=os.path.join(workdir, "out"),
                                    model=model, db=db))
    click.echo(
        f"embedded {summary['rows_embedded']} rows in {summary['seconds_total']:.1f} s "
        f"({summary['rows_per_second']} rows/s); summary: {summary['summary_uri']}",
        err=True,
    )
    hits = run_search(SearchConfig(db=db, text=query, k=5))
    click.echo(f'\ntop 5 images for "{query}":')
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank}. {hit['score']:.4f}  {hit['id']}  {hit['image']}  ({hit['caption']})")
    click.echo(f"\nTry: altclip search {os.path.abspath(db)} --text \"{query}\" --k 5 --json")
    return hits


@click.command("demo")
@click.option("--workdir", default="altclip-demo",
              help="Where the sample corpus, outputs and table go (replaced on each run).")
@click.option("--model", default=None, show_default=f"{DEFAULT_MODEL}, else a tiny random one",
              help="Model to use.")
@click.option("--query", default="un círculo rojo", help="Text to search the sample for.")
def demo_command(workdir, model, query):
    """Embed, load and search a small multilingual sample."""
    run_job(run_demo, workdir, model, query)
