"""Images and captions the tests write for themselves: odd sizes, modes and scripts."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CAPTIONS = [
    "a photo of a cat",
    "una foto de un gato en la nieve",
    "ein Hund im Schnee bei Nacht",
    "кошка в снегу",
    "صورة قطة في الليل",
    "一只猫的照片",
    "猫の写真",
    "고양이의 사진",
    "μια γάτα στο χιόνι",
    "x",
    "a much longer caption about a red car parked in the mountains at night with two children",
    "emoji 🐱 and mixed 猫 scripts кошка",
]


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                     ((x + y) * 7) % 256], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def odd_images() -> dict[str, bytes]:
    """name -> encoded image bytes, covering sizes, aspect ratios and colour modes."""
    images = {}

    def save(name: str, image: Image.Image, fmt: str, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        images[name] = buf.getvalue()

    save("landscape.jpg", Image.fromarray(_pattern(640, 480, 1)), "JPEG", quality=92)
    save("portrait.png", Image.fromarray(_pattern(300, 517, 2)), "PNG")
    save("wide.jpg", Image.fromarray(_pattern(1000, 61, 3)), "JPEG")
    save("tall.png", Image.fromarray(_pattern(45, 700, 4)), "PNG")
    save("tiny.png", Image.fromarray(_pattern(7, 5, 5)), "PNG")
    save("exact.png", Image.fromarray(_pattern(224, 224, 6)), "PNG")
    save("grey.jpg", Image.fromarray(_pattern(333, 250, 7)).convert("L"), "JPEG")
    rgba = Image.fromarray(_pattern(256, 300, 8)).convert("RGBA")
    alpha = np.zeros((300, 256), dtype=np.uint8)
    alpha[50:250, 40:200] = 255
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba.png", rgba, "PNG")
    palette = Image.fromarray(_pattern(240, 260, 9)).convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette.png", palette, "PNG", transparency=0)
    save("cmyk.jpg", Image.fromarray(_pattern(400, 300, 10)).convert("CMYK"), "JPEG")
    grey16 = Image.fromarray(_pattern(260, 240, 11)[..., 0].astype(np.uint16) * 257)  # I;16
    save("grey16.png", grey16, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display; the reference does not apply it
    save("exif-rotated.jpg", Image.fromarray(_pattern(320, 200, 12)), "JPEG", exif=exif.tobytes())
    frames = [Image.fromarray(_pattern(120, 90, seed)) for seed in (13, 14, 15)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    images["animated.gif"] = buf.getvalue()
    save("one-pixel.png", Image.fromarray(_pattern(1, 1, 16)), "PNG")
    save("needle.png", Image.fromarray(_pattern(20000, 20, 17)), "PNG")
    return images


def write_corpus(folder, images: dict[str, bytes] | None = None, extra_rows: list[dict] = (),
                 manifest_name: str = "manifest.parquet") -> str:
    """Images under folder/images and a Parquet manifest beside them (relative paths)."""
    images = odd_images() if images is None else images
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for n, (name, data) in enumerate(sorted(images.items())):
        with open(os.path.join(folder, "images", name), "wb") as f:
            f.write(data)
        rows.append({"id": f"row-{n:02d}", "image": f"images/{name}",
                     "caption": CAPTIONS[n % len(CAPTIONS)], "lang": ["en", "es", "de"][n % 3],
                     "rank": n})
    rows.extend(extra_rows)
    manifest = os.path.join(folder, manifest_name)
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def crash_image() -> bytes:
    """A valid PNG that the decoding process is told to crash on (tests set
    ALTCLIP_TEST_CRASH_ON_SHA256 to its hash before Ray starts), as a damaged file crashing a
    native decoder would."""
    buf = io.BytesIO()
    Image.fromarray(_pattern(64, 48, 666)).save(buf, "PNG")
    return buf.getvalue()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    """A tar holding these members, in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def webdataset_members(key: str, image: bytes, caption: str) -> list[tuple[str, bytes]]:
    """One sample in img2dataset's layout: KEY.jpg, KEY.txt, KEY.json."""
    meta = json.dumps({"key": key, "caption": caption, "url": f"https://example.com/{key}.jpg",
                       "width": 123, "status": "success"}).encode()
    return [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


def webdataset_shard(samples: list[tuple[str, bytes, str]]) -> bytes:
    """A WebDataset shard of (key, image, caption) samples, each sample's members adjacent."""
    return tar_of([m for sample in samples for m in webdataset_members(*sample)])
