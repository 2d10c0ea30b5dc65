"""Fetch, decode and preprocess images: bytes -> uint8 pixels the vision tower takes, per row."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.timing import add_stage_seconds
from schemas.embeddings import HEIGHT, IMAGE_ERROR, IMAGE_SHA256, WIDTH, error
from schemas.manifest import IMAGE, IMAGE_BYTES

PIXELS = "pixels"  # uint8 HxWx3 bytes, between the decode stage and the image tower
# PIL's own decompression-bomb threshold; checked from the header, before decoding.
MAX_IMAGE_PIXELS = 2 * 89_478_485
FETCH_THREADS = 16
HTTP_TIMEOUT_S = 20
HTTP_ATTEMPTS = 4
HTTP_BACKOFF_S = 0.5
MAX_DOWNLOAD_BYTES = 64 << 20
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


class ImageError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(error(kind, message))


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
    return image.convert("RGB")


def _resize_hw(prep: ImagePreprocessing, width: int, height: int) -> tuple[int, int]:
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


def decode(data: bytes, draft_short_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (a loaded PIL image, its size as stored), or an ImageError of a precise kind.

    With `draft_short_side`, a JPEG is decoded at the smallest power-of-two reduction that keeps
    its short side at least that long (libjpeg's DCT scaling: far less work than a full decode).
    """
    if not data:
        raise ImageError("decode_error", "empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("decode_error", f"not an image PIL can identify ({len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError("too_large", f"{width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
    if draft_short_side and image.format == "JPEG" and min(width, height) > draft_short_side:
        scale = draft_short_side / min(width, height)
        image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
    try:
        image.load()
    except OSError as exc:
        kind = "truncated" if "truncated" in str(exc) else "decode_error"
        raise ImageError(kind, str(exc)) from None
    except Exception as exc:  # PIL raises assorted errors on malformed files
        raise ImageError("decode_error", f"{type(exc).__name__}: {exc}") from None
    return image, (width, height)


def preprocess(image: Image.Image, prep: ImagePreprocessing) -> np.ndarray:
    """A decoded image -> uint8 (H, W, 3) pixels: RGB, resized, centre-cropped."""
    rgb = to_rgb(image)
    if prep.shortest_edge or prep.resize_hw:
        height, width = _resize_hw(prep, *rgb.size)
        rgb = rgb.resize((width, height), resample=prep.resample)
    pixels = np.asarray(rgb, dtype=np.uint8)
    return _center_crop(pixels, prep.crop_hw) if prep.crop_hw else pixels


@dataclass(frozen=True)
class FetchPolicy:
    """Where image fetches may go, and with which storage settings."""

    storage_options: dict = field(default_factory=dict, repr=False)
    # A manifest from object storage may not make the job read this machine's files ...
    allow_local_paths: bool = True
    # ... and URLs may not reach loopback, link-local or private addresses (the cluster's own
    # services, cloud metadata endpoints) unless allowed.
    allow_private_urls: bool = False
    # An unreachable store is waited out this long; then the job stops (see storage.patiently).
    patience_s: float = storage.DEFAULT_PATIENCE_S


def read_bytes(uri: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """An image's bytes from a path, an object-store URI or an http(s) URL."""
    shown = storage.redact(uri)
    if storage.is_url(uri):
        if not policy.allow_private_urls:
            _refuse_private_host(uri)
        return fetch_url(uri)
    if storage.is_local(uri) and not policy.allow_local_paths:
        raise ImageError("forbidden", f"{shown}: a local path in a manifest from object storage "
                         "(pass --allow-local-paths to permit it)")
    def read() -> bytes:
        fs, path = storage.filesystem(uri, policy.storage_options)
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        return storage.patiently(read, uri, policy.patience_s)
    except storage.StorageUnavailable:
        raise  # the store's fault, not the row's: the job stops and a rerun resumes
    except FileNotFoundError:
        raise ImageError("not_found", f"{shown} does not exist") from None
    except IsADirectoryError:
        raise ImageError("read_error", f"{shown} is a directory") from None
    except PermissionError:
        raise ImageError("read_error", f"{shown}: permission denied") from None
    except Exception as exc:  # every storage backend raises its own kinds
        raise ImageError("read_error", f"{shown}: {storage.describe(exc)}") from None


def _refuse_private_host(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise ImageError("read_error", f"{storage.redact(url)}: cannot resolve {host} ({exc})") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ImageError("forbidden", f"{storage.redact(url)}: {host} is a non-public address "
                             f"({ip}); pass --allow-private-urls to permit it")


def fetch_url(url: str) -> bytes:
    """GET with a timeout per attempt, retries with backoff on transient failures, a size cap."""
    shown = storage.redact(url)
    request = urllib.request.Request(url, headers={"User-Agent": "altclip-pipeline"})
    for attempt in range(HTTP_ATTEMPTS):
        last = attempt == HTTP_ATTEMPTS - 1
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                length = response.headers.get("Content-Length")
                if length and int(length) > MAX_DOWNLOAD_BYTES:
                    raise ImageError("too_large", f"{shown}: {length} bytes > {MAX_DOWNLOAD_BYTES}")
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
            if len(data) > MAX_DOWNLOAD_BYTES:
                raise ImageError("too_large", f"{shown}: more than {MAX_DOWNLOAD_BYTES} bytes")
            return data
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise ImageError("not_found", f"{shown}: HTTP {exc.code}") from None
            if exc.code not in _RETRYABLE_HTTP or last:
                raise ImageError("read_error", f"{shown}: HTTP {exc.code}") from None
        except (TimeoutError, socket.timeout):
            if last:
                raise ImageError("timeout", f"{shown}: no answer in {HTTP_TIMEOUT_S} s, "
                                 f"{HTTP_ATTEMPTS} attempts") from None
        except (urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (TimeoutError, socket.timeout)) and last:
                raise ImageError("timeout", f"{shown}: no answer in {HTTP_TIMEOUT_S} s, "
                                 f"{HTTP_ATTEMPTS} attempts") from None
            if last:
                raise ImageError("read_error", f"{shown}: {reason}") from None
        time.sleep(HTTP_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def fetch_all(batch: pa.Table, policy: FetchPolicy) -> list[bytes | ImageError]:
    """Every row's image bytes (inline, or fetched in parallel threads), or why not."""
    uris = batch.column(IMAGE).to_pylist()
    inline = batch.column(IMAGE_BYTES).to_pylist()

    def fetch(i: int) -> bytes | ImageError:
        if inline[i] is not None:
            return inline[i]
        if uris[i] is None:
            return ImageError("no_image", "the row has neither an image URI nor image bytes")
        try:
            return read_bytes(uris[i], policy)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(min(FETCH_THREADS, max(1, batch.num_rows))) as pool:
        return list(pool.map(fetch, range(batch.num_rows)))


def preprocess_images(
    batch: pa.Table, preprocessing: ImagePreprocessing, policy: FetchPolicy = FetchPolicy(),
    mode: str = "exact",
) -> pa.Table:
    """Ray Data stage: fetch + decode + preprocess every row; failures become `image_error`.

    `exact`: pixels bit-identical to the reference. `fast`: JPEGs are decoded at reduced scale
    (short side >= 2x the resize target) before the same bicubic resize. Fetch and decode are
    timed apart: one waits on storage, the other on cores.
    """
    started = time.perf_counter()
    draft_short_side = None
    if mode == "fast":
        draft_short_side = 2 * (preprocessing.shortest_edge or max(preprocessing.output_hw()))
    fetched = fetch_all(batch, policy)
    fetched_at = time.perf_counter()
    pixels, widths, heights, hashes, errors = [], [], [], [], []
    for data in fetched:
        sha = width = height = out = err = None
        if isinstance(data, ImageError):
            err = str(data)
        else:
            sha = hashlib.sha256(data).hexdigest()
            try:
                image, (width, height) = decode(data, draft_short_side)
                out = preprocess(image, preprocessing).tobytes()
            except ImageError as exc:
                err = str(exc)
        pixels.append(out)
        widths.append(width)
        heights.append(height)
        hashes.append(sha)
        errors.append(err)
    table = batch.drop_columns([IMAGE_BYTES])
    table = table.append_column(PIXELS, pa.array(pixels, pa.binary()))
    table = table.append_column(WIDTH, pa.array(widths, pa.int32()))
    table = table.append_column(HEIGHT, pa.array(heights, pa.int32()))
    table = table.append_column(IMAGE_SHA256, pa.array(hashes, pa.string()))
    table = table.append_column(IMAGE_ERROR, pa.array(errors, pa.string()))
    table = add_stage_seconds(table, "fetch", fetched_at - started)
    return add_stage_seconds(table, "decode", time.perf_counter() - fetched_at)



def hash_images(batch: pa.Table, policy: FetchPolicy = FetchPolicy()) -> pa.Table:
    """Ray Data stage: fetch each image and hash its bytes, without decoding (change detection)."""
    started = time.perf_counter()
    fetched = fetch_all(batch, policy)
    hashes = [None if isinstance(d, ImageError) else hashlib.sha256(d).hexdigest() for d in fetched]
    errors = [str(d) if isinstance(d, ImageError) else None for d in fetched]
    table = batch.append_column(IMAGE_SHA256, pa.array(hashes, pa.string()))
    table = table.append_column(IMAGE_ERROR, pa.array(errors, pa.string()))
    return add_stage_seconds(table, "hash", time.perf_counter() - started)
