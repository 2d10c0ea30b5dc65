"""Run every file under a folder through the decode stage as the embed job does, and count what
became of them: vectors-to-be, or errors by kind. Nothing may escape as an exception.

    python -m bench.poison DIR [--model M]

Meant for collections nobody here made (Pillow's own test images, a crawl's rejects): it prints
the counts by kind, a few files per unforeseen exception type (`decode_error: <Type>: ...`),
and the seconds it took.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import pyarrow as pa

from pipeline.decode.images import ImagePreprocessing, preprocess_images
from schemas.embeddings import IMAGE_ERROR
from schemas.manifest import IMAGE, INLINE_IMAGE

BATCH = 64


def _preprocessing(model: str | None) -> ImagePreprocessing:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(model) if model else CLIPImageProcessor()
    return ImagePreprocessing.from_image_processor(processor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--model", default=None, help="a saved model whose image processor to use "
                        "[CLIP's defaults: 224, bicubic]")
    args = parser.parse_args()
    prep = _preprocessing(args.model)
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(args.folder) for name in names)
    kinds: collections.Counter = collections.Counter()
    unforeseen: dict[str, list[str]] = collections.defaultdict(list)
    started = time.perf_counter()
    for start in range(0, len(paths), BATCH):
        part = paths[start:start + BATCH]
        batch = pa.table({IMAGE: pa.array(part, pa.string()), INLINE_IMAGE: pa.nulls(len(part), pa.binary())})
        out = preprocess_images(batch, prep)
        assert out.num_rows == len(part), "rows lost"
        for path, failure in zip(part, out.column(IMAGE_ERROR).to_pylist()):
            kind = "ok" if failure is None else failure.split(":", 1)[0]
            kinds[kind] += 1
            detail = (failure or "").split(": ")
            if kind == "decode_error" and len(detail) > 2 and detail[1].isidentifier():
                unforeseen[detail[1]].append(os.path.relpath(path, args.folder))
    seconds = time.perf_counter() - started
    print(f"{len(paths)} files in {seconds:.1f} s: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    for name, files in sorted(unforeseen.items()):
        print(f"  decode_error {name}: {len(files)}, e.g. {', '.join(files[:3])}")


if __name__ == "__main__":
    main()
