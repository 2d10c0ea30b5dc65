"""What the benchmarks run on: random-weight AltCLIP models and synthetic corpora, built once and
cached, plus a description of the machine for the reports."""

from __future__ import annotations

import math
import os
import platform
import shutil
import uuid
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.make_test_model import _train_tokenizer, make_test_model, sample_captions
from pipeline.embed.model import cache_root

CONFIGS = ("tiny", "base", "full")
# Bump when the generators below change, so that stale caches are not reused.
CORPUS_VERSION = "v1"
MAX_TOKENS = 512  # BAAI/AltCLIP's caption limit: XLM-R's 514 positions less the two never used
TOKENIZER_VOCAB = 600  # what jobs.make_test_model trains; see _build_model for `full`


def bench_cache(*parts: str) -> str:
    """Under the project's cache (`$ALTCLIP_CACHE`, default ~/.cache/altclip-pipeline)."""
    return os.path.join(cache_root(), *parts)


def cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _publish(target: str, build) -> str:
    """Build into a private folder and rename it into place: a killed build leaves no half
    model or corpus that a later run would take as complete."""
    if os.path.isdir(target):
        return target
    partial = f"{target}.partial-{uuid.uuid4().hex[:8]}"
    try:
        build(partial)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(partial, target)
        except OSError:
            if not os.path.isdir(target):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Models


def model_dir(config: str) -> str:
    """The folder of the benchmark model `config` (tiny, base, full), built on first use."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; one of {', '.join(CONFIGS)}")
    return _publish(bench_cache("bench-models", config), lambda out: _build_model(config, out))


def _build_model(config: str, out_dir: str) -> None:
    if config == "tiny":
        make_test_model(out_dir)  # what `altclip make-test-model` saves
        return
    import torch
    from transformers import (
        AltCLIPConfig,
        AltCLIPModel,
        AltCLIPProcessor,
        AltCLIPTextConfig,
        AltCLIPVisionConfig,
        CLIPImageProcessorPil,
    )

    # No internet: a real tokenizer of BAAI/AltCLIP cannot be fetched. The test model's
    # SentencePiece tokenizer (a few hundred pieces, trained offline) tokenizes the captions
    # instead; caption lengths in tokens come out of the same order as XLM-R's.
    tokenizer = _train_tokenizer(TOKENIZER_VOCAB, MAX_TOKENS)
    if config == "full":
        # BAAI/AltCLIP: CLIP ViT-L/14 at 224 + XLM-R large. The text config's vocabulary is
        # XLM-R's 250002 so that the embedding table (a quarter of the text tower's weights)
        # has its real size in memory and load time; the small tokenizer only ever emits ids
        # below its own size, which changes no compute.
        vision = AltCLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768,
        )
        # transformers' AltCLIPTextConfig defaults already describe BAAI/AltCLIP's text tower;
        # spelled out so that a change of defaults upstream does not change the benchmark.
        text = AltCLIPTextConfig(
            vocab_size=250002, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, max_position_embeddings=514, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, project_dim=768,
        )
        projection_dim = 768
    else:  # base: ViT-B/16 + a 6-layer XLM-R-base-width text tower; a mid-size check
        vision = AltCLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16, projection_dim=512,
        )
        text = AltCLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=6,
            num_attention_heads=12, max_position_embeddings=514, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, project_dim=768,
        )
        projection_dim = 512
    model_config = AltCLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )
    torch.manual_seed(0)
    model = AltCLIPModel(model_config).eval()  # random weights: only the timings mean anything
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    AltCLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer).save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Captions


def _caption_sources() -> list[tuple[list[str], bool]]:
    """Per language: its words (from jobs.make_test_model's captions), and whether its script
    writes words without spaces (Chinese, Japanese)."""
    by_lang = defaultdict(list)
    for lang, caption in sample_captions():
        by_lang[lang].append(caption)
    sources = []
    for lang in sorted(by_lang):
        captions = by_lang[lang]
        if any(" " in c for c in captions):
            sources.append((" ".join(captions).split(), False))
        else:
            sources.append((list("".join(captions)), True))
    return sources


def captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions of 5 to 40 words in a dozen languages and scripts.

    Draws are sequential from one seed, so the first k captions are the same for every n >= k.
    """
    sources = _caption_sources()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pieces, unspaced = sources[rng.integers(len(sources))]
        words = int(rng.integers(5, 41))
        if unspaced:
            # About two characters per word, a run of running text.
            start = int(rng.integers(len(pieces)))
            out.append("".join(pieces[(start + k) % len(pieces)] for k in range(2 * words)))
        else:
            out.append(" ".join(pieces[i] for i in rng.integers(len(pieces), size=words)))
    return out


# ---------------------------------------------------------------------------------------------
# Corpora

# Photo-like aspect ratios (width / height), landscape and portrait.
_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3 / 4, 2 / 3, 9 / 16)
MIN_MEGAPIXELS, MAX_MEGAPIXELS = 0.3, 12.0
JPEG_QUALITY = 90
# Uniform noise of this amplitude over smooth content gives ~2 bits per pixel at quality 90:
# the size of a camera or web photo (a 12 MP file of about 3 MB), so reading and decoding cost
# what they cost on real images.
_NOISE = 12


def image_size(index: int) -> tuple[int, int]:
    """(width, height) of throughput image `index`: log-uniform 0.3 to 12 MP, mixed aspects."""
    rng = np.random.default_rng([1, index])
    megapixels = math.exp(rng.uniform(math.log(MIN_MEGAPIXELS), math.log(MAX_MEGAPIXELS)))
    aspect = _ASPECTS[rng.integers(len(_ASPECTS))]
    width = max(1, round(math.sqrt(megapixels * 1e6 * aspect)))
    return width, max(1, round(megapixels * 1e6 / width))


def _write_photo(args: tuple[int, str]) -> int:
    """Smooth colour gradients + mid-scale blotches + noise, saved as JPEG (write, then rename)."""
    from PIL import Image

    index, path = args
    if os.path.exists(path):
        return 0
    width, height = image_size(index)
    rng = np.random.default_rng([2, index])
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    coarse = coarse.resize((width, height), Image.Resampling.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (max(1, height // 64), max(1, width // 64), 3),
                                       dtype=np.uint8))
    mid = mid.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(coarse, dtype=np.int16) * 3 // 4 + np.asarray(mid, dtype=np.int16) // 4
    pixels += rng.integers(-_NOISE, _NOISE + 1, pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    temporary = f"{path}.{os.getpid()}.tmp"
    image.save(temporary, "JPEG", quality=JPEG_QUALITY)
    os.replace(temporary, path)
    return 1


def _write_manifest(path: str, images: list[str], texts: list[str], first_id: int = 0) -> None:
    table = pa.table({
        "id": pa.array([f"{i:07d}" for i in range(first_id, first_id + len(images))], pa.string()),
        "image": pa.array(images, pa.string()),
        "caption": pa.array(texts, pa.string()),
    })
    temporary = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def throughput_corpus(rows: int, log=print) -> str:
    """Manifest of `rows` photo-sized JPEGs and captions; returns its path.

    Image i is the same file for every row count, so a larger corpus reuses a smaller one's
    images and only generates the rest (12 MP images take a while), in parallel.
    """
    root = bench_cache("bench-corpus", f"throughput-{CORPUS_VERSION}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    manifest = os.path.join(root, f"manifest-{rows}.parquet")
    relative = [f"images/{i:07d}.jpg" for i in range(rows)]
    todo = [(i, os.path.join(root, p)) for i, p in enumerate(relative)
            if not os.path.exists(os.path.join(root, p))]
    if todo:
        log(f"generating {len(todo)} JPEGs of {MIN_MEGAPIXELS}-{MAX_MEGAPIXELS} MP in {root} "
            f"(once; cached) ...")
        with ProcessPoolExecutor(max_workers=min(cores(), len(todo))) as pool:
            for _ in pool.map(_write_photo, todo, chunksize=1):
                pass
    if not os.path.exists(manifest):
        _write_manifest(manifest, relative, captions(rows))
    return manifest


SMALL_IMAGES = 50


def small_image_corpus(rows: int, files: int = 1) -> str:
    """Manifest of `rows` rows over 50 small PNGs (64x64) reused by path: disk use stays small
    at any row count, while every row is still fetched, decoded and embedded. With `files` > 1,
    a folder of that many Parquet files (the job's partitions), in order."""
    from PIL import Image

    root = bench_cache("bench-corpus", f"small-{CORPUS_VERSION}")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = [f"images/small-{k:02d}.png" for k in range(SMALL_IMAGES)]
    for k, name in enumerate(names):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            rng = np.random.default_rng([3, k])
            temporary = f"{path}.{os.getpid()}.tmp"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(temporary, "PNG")
            os.replace(temporary, path)
    if files > 1:
        folder = os.path.join(root, f"manifest-{rows}-in-{files}")
        os.makedirs(folder, exist_ok=True)
        texts = captions(rows)
        bounds = [rows * f // files for f in range(files + 1)]
        for f, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            path = os.path.join(folder, f"part-{f:05d}.parquet")
            if not os.path.exists(path):
                _write_manifest(path, [os.path.join(root, names[i % SMALL_IMAGES]) for i in range(start, stop)],
                                texts[start:stop], first_id=start)
        return folder
    manifest = os.path.join(root, f"manifest-{rows}.parquet")
    if not os.path.exists(manifest):
        _write_manifest(manifest, [names[i % SMALL_IMAGES] for i in range(rows)], captions(rows))
    return manifest


def read_corpus(manifest: str) -> tuple[list[str], list[str]]:
    """(absolute image paths, captions) of a manifest written here."""
    table = pq.read_table(manifest, columns=["image", "caption"])
    root = os.path.dirname(os.path.abspath(manifest))
    return ([os.path.join(root, p) for p in table.column("image").to_pylist()],
            table.column("caption").to_pylist())


def corpus_stats(manifest: str) -> dict:
    """Sizes of the corpus's images (header reads only) and captions, for the report."""
    from PIL import Image

    paths, texts = read_corpus(manifest)
    megapixels, file_bytes = [], []
    for path in paths:
        with Image.open(path) as image:
            megapixels.append(image.width * image.height / 1e6)
        file_bytes.append(os.path.getsize(path))
    words = [len(t.split()) for t in texts]
    return {
        "images": len(paths),
        "megapixels_mean": round(float(np.mean(megapixels)), 2),
        "megapixels_max": round(float(np.max(megapixels)), 2),
        "file_mib_total": round(sum(file_bytes) / 2**20, 1),
        "caption_chars_mean": round(float(np.mean([len(t) for t in texts])), 1),
        "caption_words_mean": round(float(np.mean(words)), 1),
    }


# ---------------------------------------------------------------------------------------------
# Machine


def machine(device: str) -> dict:
    """What the figures were measured on."""
    import ray
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:  # not Linux
        pass
    return {
        "cpu": cpu,
        "cores": cores(),
        "memory_gib": memory_gib,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
    }


def fresh_ray_env() -> dict:
    """The environment for an `altclip embed` being measured: a new Ray instance of its own.

    A RAY_ADDRESS in the caller's environment would send the job to another cluster, and a bare
    ray.init (in versions of the pipeline that call it without an address) joins the cluster
    that `ray start` last recorded in /tmp/ray/ray_current_cluster, or waits forever on it if it
    was stopped since. "local" always starts a new one, on this machine.
    """
    return {**os.environ, "RAY_ADDRESS": "local"}
