"""The pipeline's vectors equal transformers' AltCLIP reference on the same inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.decode.images import decode, preprocess
from pipeline.embed.model import resolve_model
from tests.conftest import altclip, read_output
from tests.corpus import odd_images, write_corpus

FLOAT32_MIN_COSINE = 0.99999
# bfloat16 keeps 8 bits of mantissa: the tiny model's worst row measured 0.99996; deeper towers
# drift further, so the stated tolerance is 0.99.
BFLOAT16_MIN_COSINE = 0.99
LONG_CAPTION = " ".join(["una foto de un gato en la nieve"] * 40)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AltCLIPModel, AltCLIPProcessor, CLIPImageProcessorPil

    model = AltCLIPModel.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AltCLIPProcessor.from_pretrained(tiny_model).tokenizer
    # Without torchvision this is what AltCLIPProcessor uses; named so it stays the reference.
    image_processor = CLIPImageProcessorPil.from_pretrained(tiny_model)

    class Reference:
        def pixels(self, data: bytes) -> np.ndarray:
            return image_processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]

        def image(self, data: bytes) -> np.ndarray:
            pixel_values = torch.from_numpy(self.pixels(data))[None]
            with torch.inference_mode():
                out = model.get_image_features(pixel_values=pixel_values).pooler_output
            return torch.nn.functional.normalize(out, dim=-1)[0].numpy()

        def texts(self, captions: list[str], **tokenizer_options) -> np.ndarray:
            inputs = tokenizer(captions, padding=True, return_tensors="pt", **tokenizer_options)
            with torch.inference_mode():
                out = model.get_text_features(**inputs).pooler_output
            return torch.nn.functional.normalize(out, dim=-1).numpy()

    return Reference()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity")
    extra = [{"id": "long", "image": "images/exact.png", "caption": LONG_CAPTION, "lang": "es", "rank": 99}]
    return folder, write_corpus(folder, extra_rows=extra)


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_preprocessed_pixels_are_bit_identical_to_the_reference(tiny_model, reference):
    prep = resolve_model(tiny_model).preprocessing
    table = prep.normalization_table()
    for name, data in odd_images().items():
        pixels = preprocess(decode(data)[0], prep)  # uint8 (H, W, 3)
        ours = table[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]
        expected = reference.pixels(data)
        assert ours.shape == expected.shape, name
        assert np.array_equal(ours, expected), f"{name}: max diff {np.abs(ours - expected).max()}"


def test_float32_vectors_equal_the_reference(tiny_model, reference, corpus, ray_session, tmp_path):
    folder, manifest = corpus
    out = tmp_path / "out"
    # A batch size that does not divide the rows, so batches mix caption lengths and padding.
    altclip("embed", manifest, "--out", out, "--model", tiny_model, "--dtype", "float32",
            "--batch-size", "4")
    rows = read_output(out)
    images = odd_images()
    manifest_rows = pq.read_table(manifest).to_pylist()
    assert set(rows) == {r["id"] for r in manifest_rows}
    assert json.loads((out / "summary.json").read_text())["images_compiled"] == 0  # no --compile

    for r in manifest_rows:
        name = r["image"].split("/")[-1]
        got = rows[r["id"]]
        assert got["image_error"] is None and got["text_error"] is None, got
        assert _cosine(got["image_embedding"], reference.image(images[name])) >= FLOAT32_MIN_COSINE, name
        assert abs(np.linalg.norm(got["image_embedding"]) - 1) < 1e-5
        assert (got["width"], got["height"]) == Image.open(io.BytesIO(images[name])).size

    short = [r for r in manifest_rows if r["id"] != "long"]
    batched = reference.texts([r["caption"] for r in short])  # padded to the longest
    for r, expected in zip(short, batched):
        alone = reference.texts([r["caption"]])[0]  # no padding at all
        got = rows[r["id"]]["text_embedding"]
        assert _cosine(got, expected) >= FLOAT32_MIN_COSINE, r["caption"]
        assert _cosine(got, alone) >= FLOAT32_MIN_COSINE, r["caption"]
        assert rows[r["id"]]["caption_truncated"] is False

    long = rows["long"]
    max_tokens = resolve_model(tiny_model).max_tokens
    truncated = reference.texts([LONG_CAPTION], truncation=True, max_length=max_tokens)[0]
    assert long["caption_truncated"] is True
    assert _cosine(long["text_embedding"], truncated) >= FLOAT32_MIN_COSINE

    footer = json.loads(pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"altclip.provenance"])
    assert footer["dtype"] == "float32" and footer["dim"] == 64 and footer["model"] == tiny_model
    assert footer["preprocessing"]["crop_hw"] == [224, 224]


def test_bfloat16_vectors_are_close_to_the_float32_reference(tiny_model, reference, corpus,
                                                            ray_session, tmp_path):
    folder, manifest = corpus
    out = tmp_path / "out"
    altclip("embed", manifest, "--out", out, "--model", tiny_model, "--dtype", "bfloat16")
    rows = read_output(out)
    images = odd_images()
    worst = 1.0
    for r in pq.read_table(manifest).to_pylist():
        if r["id"] == "long":
            continue
        got = rows[r["id"]]
        worst = min(worst, _cosine(got["image_embedding"], reference.image(images[r["image"].split("/")[-1]])))
        worst = min(worst, _cosine(got["text_embedding"], reference.texts([r["caption"]])[0]))
    assert worst >= BFLOAT16_MIN_COSINE


def test_fast_mode_stays_within_cosine_0999_of_exact(tiny_model, ray_session, tmp_path):
    from tests.corpus import _pattern

    images = {}
    for name, (w, h) in {"a.jpg": (2000, 1500), "b.jpg": (3000, 2000), "c.jpg": (1200, 2600)}.items():
        buf = io.BytesIO()
        Image.fromarray(_pattern(w, h, w)).save(buf, "JPEG", quality=90)
        images[name] = buf.getvalue()
    image, stored = decode(images["b.jpg"], draft_short_side=448)
    assert stored == (3000, 2000) and min(image.size) >= 448 and image.size[0] < 3000  # drafted

    manifest = write_corpus(tmp_path, images=images)
    for mode in ("exact", "fast"):
        altclip("embed", manifest, "--out", tmp_path / mode, "--model", tiny_model, "--dtype",
                "float32", "--preprocess", mode)
    exact, fast = read_output(tmp_path / "exact"), read_output(tmp_path / "fast")
    for row_id, row in exact.items():
        assert _cosine(fast[row_id]["image_embedding"], row["image_embedding"]) >= 0.999, row_id
        assert (fast[row_id]["width"], fast[row_id]["height"]) == (row["width"], row["height"])
    footer = json.loads(pq.read_schema(next((tmp_path / "fast").glob("part-*.parquet")))
                        .metadata[b"altclip.provenance"])
    assert footer["preprocessing"]["mode"] == "fast"


def test_out_of_memory_halves_the_batch_and_keeps_every_row(tiny_model):
    import pyarrow as pa

    from pipeline.decode.text import tokenize_captions
    from pipeline.embed.towers import TextEmbedder

    spec = resolve_model(tiny_model)
    embedder = TextEmbedder(spec, "float32")
    batch = tokenize_captions(pa.table({"caption": [f"caption {n}" for n in range(8)]}), spec)
    expected = embedder(batch).column("text_embedding").to_pylist()

    real_tower, calls = embedder.tower, []

    def tower_with_little_memory(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_tower(**inputs)

    embedder.tower = tower_with_little_memory
    got = embedder(batch).column("text_embedding").to_pylist()
    assert calls[:3] == [8, 4, 2] and len(got) == 8
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_length_groups_keep_each_caption_its_own_vector(tiny_model):
    """A batch larger than a length group, captions of many lengths in shuffled order: every
    row gets the vector it gets alone."""
    import pyarrow as pa

    from pipeline.decode.text import tokenize_captions
    from pipeline.embed.towers import TEXT_GROUP_ROWS, TextEmbedder

    spec = resolve_model(tiny_model)
    embedder = TextEmbedder(spec, "float32")
    captions = [" ".join(["palabra"] * ((n * 7) % 23 + 1)) for n in range(3 * TEXT_GROUP_ROWS["cpu"] + 1)]
    captions[5] = None  # no caption: no vector, and the rows around it keep theirs
    got = embedder(tokenize_captions(pa.table({"caption": captions}), spec)).column("text_embedding").to_pylist()
    for caption, vector in zip(captions, got):
        if caption is None:
            assert vector is None
            continue
        alone = embedder(tokenize_captions(pa.table({"caption": [caption]}), spec))
        np.testing.assert_allclose(vector, alone.column("text_embedding")[0].as_py(), atol=1e-5)


def test_the_compiled_image_tower_gives_the_towers_vectors_and_compiles_once(tiny_model):
    """--compile: batches of the compiled size, and smaller ones padded up to it, run the
    compiled tower without compiling it again; a batch of at most half (a retry row by row)
    runs the tower as it is. Every vector is the uncompiled tower's."""
    import pyarrow as pa
    from torch._dynamo.utils import counters

    from pipeline.decode.images import preprocess_images
    from pipeline.embed.towers import ImageEmbedder
    from schemas.manifest import IMAGE, INLINE_IMAGE
    from tests.corpus import _pattern

    spec = resolve_model(tiny_model)
    images = []
    for seed in range(8):
        buf = io.BytesIO()
        Image.fromarray(_pattern(48 + seed, 40, seed)).save(buf, "JPEG")
        images.append(buf.getvalue())

    def batch(part: list[bytes]) -> pa.Table:
        return preprocess_images(pa.table({IMAGE: pa.array([None] * len(part), pa.string()),
                                           INLINE_IMAGE: pa.array(part, pa.binary())}), spec.preprocessing)

    eager = ImageEmbedder(spec, "float32")
    compiled = ImageEmbedder(spec, "float32", compile_batch=4)
    graphs = counters["stats"]["unique_graphs"]
    real, calls = compiled.compiled, []

    def counted(**inputs):
        calls.append(inputs["pixel_values"].shape[0])
        return real(**inputs)

    compiled.compiled = counted
    for part in (images[:4], images[4:7], images[7:]):
        got = compiled(batch(part)).column("image_embedding").to_pylist()
        expected = eager(batch(part)).column("image_embedding").to_pylist()
        for a, b in zip(got, expected):
            assert np.dot(a, b) >= FLOAT32_MIN_COSINE
    assert calls == [4, 4]  # 4 images, then 3 padded to 4; the single image ran uncompiled
    assert counters["stats"]["unique_graphs"] == graphs


def test_embed_compile_runs_the_compiled_tower_and_keeps_the_reference_vectors(tiny_model, reference,
                                                                               corpus, ray_session, tmp_path):
    folder, manifest = corpus
    out = tmp_path / "out"
    altclip("embed", manifest, "--out", out, "--model", tiny_model, "--dtype", "float32",
            "--batch-size", "4", "--compile")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_ok"] == summary["rows_out"]
    # Batches of 4 distinct images, or 3 padded to 4, went through the compiled tower.
    assert summary["images_compiled"] >= summary["image_ok"] // 2
    images = odd_images()
    rows = read_output(out)
    for r in pq.read_table(manifest).to_pylist():
        got = rows[r["id"]]["image_embedding"]
        assert _cosine(got, reference.image(images[r["image"].split("/")[-1]])) >= FLOAT32_MIN_COSINE


def test_pixels_pass_through_one_reused_buffer_without_changing_any_batch(tiny_model):
    """Batches of every size in turn (growing and shrinking the staging buffer) normalise to
    what the lookup gives each array alone, and a batch's tensor is not changed by the next
    batch's pixels taking the buffer."""
    from pipeline.embed.towers import ImageEmbedder

    embedder = ImageEmbedder(resolve_model(tiny_model), "float32")
    height, width = embedder.height, embedder.width
    rng = np.random.default_rng(7)
    lookup = torch.from_numpy(resolve_model(tiny_model).preprocessing.normalization_table())

    def expected(pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).long()
        return lookup[torch.arange(3)[None, :, None, None], x]

    kept, buffers = [], set()
    for rows in (3, 1, 5, 2, 5, 4):
        pixels = rng.integers(0, 256, (rows, height, width, 3), dtype=np.uint8)
        given = pixels if rows % 2 else [image.tobytes() for image in pixels]  # both forms
        kept.append((pixels, embedder.pixel_values(given)))
        buffers.add(embedder.staging.buffer.data_ptr())
    for pixels, got in kept:
        assert torch.equal(got, expected(pixels))
    # Grown at 3 and at 5 rows only: one buffer per size that outgrew the last.
    assert len(buffers) == 2 and embedder.staging.buffer.numel() == 5 * height * width * 3


def test_caption_token_ids_equal_transformers_tokenizer_without_importing_torch(tiny_model):
    """The tokenizer the decode workers load (tokenizer.json through `tokenizers`) gives the ids
    transformers' AltCLIP processor gives, on every kind of caption and at every length, and
    loading it imports neither transformers nor torch."""
    import subprocess
    import sys

    from transformers import AltCLIPProcessor

    from pipeline.decode.text import CaptionTokenizer, load_tokenizer, token_ids
    from tests.fuzz import CAPTIONS

    ours = load_tokenizer(tiny_model)
    assert isinstance(ours, CaptionTokenizer)
    reference = AltCLIPProcessor.from_pretrained(tiny_model).tokenizer
    captions = [*CAPTIONS, LONG_CAPTION, "a red circle", "红色圆形", "<s> a </s> b <mask> <pad>", "", " ",
                "नमस्ते दुनिया", "مرحبا بالعالم", "ＦＵＬＬ ｗｉｄｔｈ", "e\u0301te\u0301", "a\u200bb"]
    for max_tokens in (4, 16, 62):
        assert token_ids(ours, captions, max_tokens) == token_ids(reference, captions, max_tokens), max_tokens
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline.decode.text import load_tokenizer; "
         f"load_tokenizer({str(tiny_model)!r})(['a red circle']); "
         "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
