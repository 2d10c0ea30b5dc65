"""Thumbnails for people to look at: an image's bytes -> a small JPEG, upright, in RGB, and a
bounded cache of the ones made recently."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageOps

from pipeline.decode.barrier import ImageError
from pipeline.decode.images import CRASH_TEST_VARIABLE, decode, to_rgb
from pipeline.decode.isolation import RowFailure, map_isolated
from schemas.embeddings import error

SIZES = (96, 128, 192, 256, 384, 512)
DEFAULT_SIZE = 256
CACHE_ENTRIES = 1024


def render_thumbnail(data: bytes, size: int) -> bytes:
    """JPEG bytes of the image fitted in size x size (raises pipeline.decode.http_get.ImageError when it
    cannot be decoded)."""
    # A JPEG is decoded at a reduced scale that still covers the thumbnail.
    image, _ = decode(data, draft_short_side=size)
    try:
        image = ImageOps.exif_transpose(image)  # as a viewer shows it
    except Exception:  # a broken EXIF block: show it unrotated
        pass
    image = _display_rgb(image)
    image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, optimize=True, progressive=True)
    return out.getvalue()


def make_thumbnails(images: list[bytes], size: int) -> list[bytes | str]:
    """Each image's thumbnail (render_thumbnail), or its error (`kind: message`), made in the
    decoding children (pipeline/decode/isolation.py): an image that crashes or hangs the decoder, or
    outgrows its memory bound, fails alone, never the server or the report."""
    made = map_isolated(thumbnail_of, [(data, size) for data in images])
    return [error(m.kind, m.message) if isinstance(m, RowFailure) else m for m in made]


def thumbnail_of(item: tuple[bytes, int]) -> bytes | str:
    """One thumbnail or its error: run in the decoding process, never raises."""
    data, size = item
    crash_on = os.environ.get(CRASH_TEST_VARIABLE)
    if crash_on and hashlib.sha256(data).hexdigest() == crash_on:
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        return render_thumbnail(data, size)
    except ImageError as exc:
        return str(exc)
    except MemoryError:
        return error("too_large", "out of memory making its thumbnail")
    except Exception as exc:  # whatever else this image's data causes is still this image's
        return error("decode_error", f"{type(exc).__name__}: {exc}")


def _display_rgb(image: Image.Image) -> Image.Image:
    """RGB for a person to look at: 16- and 32-bit greyscale scaled down (not clipped to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    return to_rgb(image)


class ThumbnailCache:
    """The most recently used thumbnails, by whatever key names an image's content and size."""

    def __init__(self, entries: int = CACHE_ENTRIES):
        self.entries = entries
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
