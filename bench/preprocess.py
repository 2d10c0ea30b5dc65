"""Image preprocessing alone: transformers' CLIPImageProcessor (PIL backend) against ours, exact
and fast, on JPEGs of 3 to 12 megapixels, in one run on one machine.

    python -m bench.preprocess [--images 12] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time

import numpy as np
from PIL import Image

from pipeline.decode.images import ImagePreprocessing, decode, preprocess

SIZES = [(2000, 1500), (2448, 3264), (3000, 2000), (4000, 3000)]  # 3, 8, 6, 12 MP


def _jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for n in range(count):
        w, h = SIZES[n % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1)
        pixels = np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _time(fn, images) -> float:
    started = time.perf_counter()
    for data in images:
        fn(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil()
    prep = ImagePreprocessing.from_image_processor(reference)
    table = prep.normalization_table()
    images = _jpegs(args.images)

    def ours(data, draft=None):
        pixels = preprocess(decode(data, draft)[0], prep)
        return table[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # what the actor does

    timings = {
        "reference CLIPImageProcessorPil": _time(
            lambda d: reference(images=Image.open(io.BytesIO(d)), return_tensors="np"), images),
        "ours exact": _time(ours, images),
        "ours fast": _time(lambda d: ours(d, 2 * prep.shortest_edge), images),
    }
    base = timings["reference CLIPImageProcessorPil"]
    print(f"{args.images} JPEGs of 3-12 MP, {platform.processor() or platform.machine()}")
    print(f"{'':34} {'images/s':>9} {'x reference':>12}")
    for name, seconds in timings.items():
        print(f"{name:34} {args.images / seconds:9.2f} {base / seconds:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "seconds": timings}, f, indent=2)


if __name__ == "__main__":
    main()
