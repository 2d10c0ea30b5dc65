"""Fetch, decode and preprocess images: bytes -> uint8 pixels the vision tower takes, per row."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.decode.barrier import ImageError
from pipeline.decode.fetch import FetchPolicy, read_bytes, source_of
from pipeline.decode.isolation import RowFailure, map_isolated
from pipeline.decode.resample import FILTERS, resized_window
from pipeline.timing import add_stage_record
from schemas.embeddings import HEIGHT, IMAGE_ERROR, IMAGE_SHA256, WIDTH, error
from schemas.manifest import IMAGE, INLINE_IMAGE, INTERNAL_PREFIX

PIXELS = INTERNAL_PREFIX + "pixels"  # uint8 HxWx3 bytes, between the decode stage and the image tower
# PIL's own decompression-bomb threshold; checked from the header, before decoding.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# The resize before the centre crop may not make more pixels than this (48 MB of RGB): a 1x8000
# image resized to a short side of 224 would be 224x1,792,000. Beyond it only the crop's window
# of the resize is computed (pipeline/decode/resample.py, the same bytes); where that cannot be done
# (no crop, a filter it does not transcribe) the image is `too_large`.
MAX_RESIZED_PIXELS = 16_000_000
# Fetches in flight in one ImageFetcher actor, and to one host from one batch. A web image is a
# round trip of a few hundred milliseconds that takes next to no CPU: latency, not cores, sets
# how many must be in flight to keep the decoders fed (at 250 ms, 256 in flight ~1,000 images/s).
FETCHES_IN_FLIGHT = 256
FETCHES_PER_HOST = 16
# Set only by tests: the decoding process kills itself with SIGSEGV on the image with this
# sha256, as a damaged file crashing a native decoder would.
CRASH_TEST_VARIABLE = "ALTCLIP_TEST_CRASH_ON_SHA256"


@dataclass(frozen=True)
class ImagePreprocessing:
    """What the model's saved image processor asks for, as the PIL reference applies it."""

    shortest_edge: int | None  # resize the short side to this, keeping the aspect ratio ...
    resize_hw: tuple[int, int] | None  # ... or resize to exactly (height, width)
    crop_hw: tuple[int, int] | None
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_image_processor(cls, processor) -> "ImagePreprocessing":
        size = dict(processor.size) if processor.do_resize else {}
        crop = dict(processor.crop_size) if processor.do_center_crop else None
        return cls(
            shortest_edge=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            crop_hw=(crop["height"], crop["width"]) if crop else None,
            resample=int(processor.resample),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=tuple(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0),
            std=tuple(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def normalization_table(self) -> np.ndarray:
        """(3, 256) float32: uint8 value -> normalised value per channel.

        The same arithmetic as the reference (rescale in float64, then float32 (x - mean) / std),
        so a lookup gives bit-identical values while pixels travel as uint8 until the tower.
        """
        values = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return (values[None, :] - mean) / std

    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        raise ValueError("images of varying size: the processor neither crops nor resizes to a fixed size")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference converts: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # convert() of an RGB image is a copy of it (2% of a decode): the same pixels without it.
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_hw(prep: ImagePreprocessing, width: int, height: int) -> tuple[int, int]:
    """(height, width) of the resize before the crop, as the reference computes it."""
    if prep.resize_hw:
        return prep.resize_hw
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = prep.shortest_edge, int(prep.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    height, width = pixels.shape[:2]
    crop_h, crop_w = crop_hw
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    # Smaller than the crop: zero-pad around it, as the reference does.
    padded = np.zeros((max(crop_h, height), max(crop_w, width), 3), dtype=pixels.dtype)
    pad_top, pad_left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : top + crop_h, max(0, left) : left + crop_w]


def decode(data: bytes, draft_short_side: int | None = None,
           max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (a loaded PIL image, its size as stored), or an ImageError of a precise kind.

    Pillow raises far more than its own error types on damaged files (OSError, ValueError,
    SyntaxError, NotImplementedError, struct.error, ... from any plugin, from `open` as from
    `load`): every one is this image's error, never the batch's.

    With `draft_short_side`, a JPEG is decoded at the smallest power-of-two reduction that keeps
    its short side at least that long (libjpeg's DCT scaling: far less work than a full decode).
    """
    if not data:
        raise ImageError("decode_error", "empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
        if draft_short_side and image.format == "JPEG" and min(width, height) > draft_short_side:
            scale = draft_short_side / min(width, height)
            image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode_error", f"not an image PIL can identify ({len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except MemoryError:
        raise ImageError("too_large", "out of memory decoding it") from None
    except Exception as exc:
        kind = "truncated" if "truncat" in str(exc).lower() else "decode_error"
        raise ImageError(kind, f"{type(exc).__name__}: {exc}") from None
    return image, (width, height)


def preprocess(image: Image.Image, prep: ImagePreprocessing) -> np.ndarray:
    """A decoded image -> uint8 (H, W, 3) pixels: RGB, resized, centre-cropped."""
    rgb = to_rgb(image)
    if not (prep.shortest_edge or prep.resize_hw):
        pixels = np.asarray(rgb, dtype=np.uint8)
        return _center_crop(pixels, prep.crop_hw) if prep.crop_hw else pixels
    height, width = _resize_hw(prep, *rgb.size)
    if height * width > MAX_RESIZED_PIXELS:
        crop_h, crop_w = prep.crop_hw or (0, 0)
        if not prep.crop_hw or prep.resample not in FILTERS or height < crop_h or width < crop_w:
            raise ImageError("too_large", f"{rgb.size[0]}x{rgb.size[1]} would be resized to "
                             f"{width}x{height}, more than {MAX_RESIZED_PIXELS} pixels")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return resized_window(rgb, (width, height), (left, top, left + crop_w, top + crop_h), prep.resample)
    pixels = np.asarray(rgb.resize((width, height), resample=prep.resample), dtype=np.uint8)
    return _center_crop(pixels, prep.crop_hw) if prep.crop_hw else pixels


def pixels_of(item: tuple[bytes, str], prep: ImagePreprocessing, draft_short_side: int | None,
              max_pixels: int = MAX_IMAGE_PIXELS):
    """One image's (pixels, width, height, error): run in the decoding process, never raises."""
    data, sha = item
    if sha == os.environ.get(CRASH_TEST_VARIABLE):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        image, (width, height) = decode(data, draft_short_side, max_pixels)
        return preprocess(image, prep).tobytes(), width, height, None
    except ImageError as exc:
        return None, None, None, str(exc)
    except MemoryError:
        return None, None, None, error("too_large", "out of memory preprocessing it")
    except Exception as exc:  # anything else this image's data causes is still this image's
        return None, None, None, error("decode_error", storage.redact_text(f"{type(exc).__name__}: {exc}"))


class ImageFetcher:
    """Ray Data stage: an actor that fetches many batches at once (a call per batch, in its own
    thread), their fetches sharing FETCHES_IN_FLIGHT threads. A batch waits for its slowest row;
    a host that never answers holds one call for its timeouts while the others go on. So the
    fetches in flight are set by latency, apart from the cores the decoders need."""

    def __init__(self, policy: FetchPolicy = FetchPolicy(), in_flight: int = FETCHES_IN_FLIGHT,
                 per_host: int = FETCHES_PER_HOST):
        self.policy, self.per_host = policy, per_host
        self.pool = ThreadPoolExecutor(in_flight, thread_name_prefix="fetch")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return fetch_images(batch, self.policy, per_host=self.per_host, pool=self.pool)


def fetch_images(batch: pa.Table, policy: FetchPolicy = FetchPolicy(), in_flight: int = FETCHES_IN_FLIGHT,
                 per_host: int = FETCHES_PER_HOST, pool: ThreadPoolExecutor | None = None) -> pa.Table:
    """The batch with each row's image bytes in INLINE_IMAGE (inline bytes as they were), or its
    error in IMAGE_ERROR. Up to `in_flight` of its fetches run at once, `per_host` at most to
    one http(s) host, in `pool`'s threads (default: a pool of the call's own)."""
    started = time.perf_counter()
    uris = batch.column(IMAGE).to_pylist()
    outcomes: list[bytes | str | None] = [_given(batch, i) for i in range(batch.num_rows)]
    waiting: dict[str | None, collections.deque] = collections.defaultdict(collections.deque)
    for i, given in enumerate(outcomes):
        if given is None:
            waiting[_host(uris[i])].append(i)
    running: dict = {}  # future -> (row, host)
    busy: collections.Counter = collections.Counter()
    own = pool is None
    pool = pool or ThreadPoolExecutor(max(1, min(in_flight, batch.num_rows)))
    try:
        while waiting or running:
            # Round the hosts that have rows waiting and a free slot, a row each, until full.
            while len(running) < in_flight:
                hosts = [h for h in waiting if h is None or busy[h] < per_host]
                if not hosts:
                    break
                for host in hosts:
                    if len(running) >= in_flight or (host is not None and busy[host] >= per_host):
                        continue
                    row = waiting[host].popleft()
                    if not waiting[host]:
                        del waiting[host]
                    busy[host] += 1
                    running[pool.submit(_fetch_row, uris[row], policy)] = (row, host)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                row, host = running.pop(future)
                busy[host] -= 1
                outcomes[row] = future.result()
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
    return add_stage_record(_with_fetched(batch, outcomes), "fetch", time.perf_counter() - started)


def _given(batch: pa.Table, i: int) -> bytes | str | None:
    """A row's bytes or error without a fetch: the error it already has, its inline bytes, or
    that it has neither (None: it is to be fetched)."""
    if IMAGE_ERROR in batch.column_names and batch.column(IMAGE_ERROR)[i].is_valid:
        return batch.column(IMAGE_ERROR)[i].as_py()
    if batch.column(INLINE_IMAGE)[i].is_valid:
        return batch.column(INLINE_IMAGE)[i].as_py()
    if not batch.column(IMAGE)[i].is_valid:
        return error("no_image", "the row has neither an image URI nor image bytes")
    return None


def _host(uri: str) -> str | None:
    """The http(s) host a fetch goes to (None: object stores and files, which need no limit)."""
    if not storage.is_url(uri):
        return None
    try:
        return source_of(uri)
    except ValueError:  # a malformed URL: its fetch fails on its own
        return ""


def _fetch_row(uri: str, policy: FetchPolicy) -> bytes | str:
    """A row's image bytes, or why they could not be had."""
    try:
        return read_bytes(uri, policy)
    except ImageError as exc:
        return str(exc)
    except storage.StorageUnavailable:
        raise  # the job's store is down: the job stops, a rerun resumes
    except Exception as exc:  # whatever else reading this row's URI raises is the row's
        return error("read_error", f"{storage.redact(uri)}: {storage.describe(exc)}")


def _with_fetched(table: pa.Table, outcomes: list[bytes | str]) -> pa.Table:
    table = _set(table, INLINE_IMAGE, pa.array([o if isinstance(o, bytes) else None for o in outcomes],
                                                pa.binary()))
    return _set(table, IMAGE_ERROR, pa.array([o if isinstance(o, str) else None for o in outcomes],
                                             pa.string()))


def fetch_all(batch: pa.Table, policy: FetchPolicy) -> list[bytes | str]:
    """Every row's image bytes or its error, in the rows' order (see fetch_images)."""
    fetched = fetch_images(batch, policy)
    return [failure if failure is not None else data for data, failure in
            zip(fetched.column(INLINE_IMAGE).to_pylist(), fetched.column(IMAGE_ERROR).to_pylist())]


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def preprocess_images(
    batch: pa.Table, preprocessing: ImagePreprocessing, policy: FetchPolicy = FetchPolicy(),
    mode: str = "exact", max_pixels: int = MAX_IMAGE_PIXELS, decode_timeout_s: float | None = None,
) -> pa.Table:
    """fetch_images, then decode_images, over one batch (a query's image, the plan's sample)."""
    return decode_images(fetch_images(batch, policy), preprocessing, mode, max_pixels, decode_timeout_s)


def decode_images(batch: pa.Table, preprocessing: ImagePreprocessing, mode: str = "exact",
                  max_pixels: int = MAX_IMAGE_PIXELS, decode_timeout_s: float | None = None) -> pa.Table:
    """Ray Data stage: the bytes fetch_images put in INLINE_IMAGE -> pixels, width, height and
    hash; failures become `image_error`.

    `exact`: pixels bit-identical to the reference. `fast`: JPEGs are decoded at reduced scale
    (short side >= 2x the resize target) before the same bicubic resize. Decoding runs in child
    processes (pipeline/decode/isolation.py), so an image that crashes the decoder fails alone, and one
    that decodes longer than `decode_timeout_s` (default isolation.ROW_TIMEOUT_S) is a `timeout`.
    """
    started = time.perf_counter()
    draft_short_side = None
    if mode == "fast":
        draft_short_side = 2 * (preprocessing.shortest_edge or max(preprocessing.output_hw()))
    n = batch.num_rows
    data = batch.column(INLINE_IMAGE).to_pylist()
    errors = batch.column(IMAGE_ERROR).to_pylist()
    pixels, widths, heights, hashes = [None] * n, [None] * n, [None] * n, [None] * n
    todo = [i for i in range(n) if errors[i] is None and data[i] is not None]
    for i in todo:
        hashes[i] = hashlib.sha256(data[i]).hexdigest()
    decoded = map_isolated(pixels_of, [(data[i], hashes[i]) for i in todo],
                           (preprocessing, draft_short_side, max_pixels), decode_timeout_s)
    for i, result in zip(todo, decoded):
        if isinstance(result, RowFailure):
            errors[i] = error(result.kind, result.message)
        else:
            pixels[i], widths[i], heights[i], errors[i] = result
    table = batch.drop_columns([INLINE_IMAGE])
    table = _set(table, PIXELS, pa.array(pixels, pa.binary()))
    table = _set(table, WIDTH, pa.array(widths, pa.int32()))
    table = _set(table, HEIGHT, pa.array(heights, pa.int32()))
    table = _set(table, IMAGE_SHA256, pa.array(hashes, pa.string()))
    table = _set(table, IMAGE_ERROR, pa.array(errors, pa.string()))
    return add_stage_record(table, "decode", time.perf_counter() - started)


def hash_images(batch: pa.Table, policy: FetchPolicy = FetchPolicy()) -> pa.Table:
    """Ray Data stage: fetch each image and hash its bytes, without decoding (change detection)."""
    started = time.perf_counter()
    fetched = fetch_all(batch, policy)
    hashes = [None if isinstance(d, str) else hashlib.sha256(d).hexdigest() for d in fetched]
    errors = [d if isinstance(d, str) else None for d in fetched]
    table = _set(batch, IMAGE_SHA256, pa.array(hashes, pa.string()))
    table = _set(table, IMAGE_ERROR, pa.array(errors, pa.string()))
    return add_stage_record(table, "hash", time.perf_counter() - started)
