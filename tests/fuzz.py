"""Inputs made to break the job: every format Pillow writes, cut and flipped and inflated; files
that are not images; names, URLs, captions and ids of every awkward shape."""

from __future__ import annotations

import io
import random
import struct

import numpy as np
from PIL import Image

from tests.corpus import _pattern


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def seed_images() -> dict[str, bytes]:
    """One small valid file per format and variant Pillow writes (name -> bytes)."""
    rgb = Image.fromarray(_pattern(48, 36, 21))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(_pattern(48, 36, 22)[..., 0]))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [Image.fromarray(_pattern(32, 24, s)) for s in (23, 24, 25)]
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "maker " * 40
    seeds = {
        "baseline.jpg": _encode(rgb, "JPEG", quality=90),
        "progressive.jpg": _encode(rgb, "JPEG", progressive=True, quality=80),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "exif.jpg": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "grey.jpg": _encode(rgb.convert("L"), "JPEG"),
        "rgb8.png": _encode(rgb, "PNG"),
        "grey16.png": _encode(Image.fromarray((_pattern(48, 36, 26)[..., 0].astype(np.uint16) * 257)), "PNG"),
        "palette-transparent.png": _encode(palette, "PNG", transparency=0),
        "rgba.png": _encode(rgba, "PNG"),
        "animated.png": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "animated.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "still.webp": _encode(rgb, "WEBP", quality=80),
        "lossless.webp": _encode(rgba, "WEBP", lossless=True),
        "animated.webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "raw.tiff": _encode(rgb, "TIFF"),
        "lzw.tiff": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "deflate.tiff": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "jpeg.tiff": _encode(rgb, "TIFF", compression="jpeg"),
        "packbits.tiff": _encode(rgb, "TIFF", compression="packbits"),
        "rgb.bmp": _encode(rgb, "BMP"),
        "palette.bmp": _encode(palette, "BMP"),
        "icon.ico": _encode(rgb, "ICO", sizes=[(32, 32)]),
        "rgb.ppm": _encode(rgb, "PPM"),
        "grey.pgm": _encode(rgb.convert("L"), "PPM"),
        "rgb.pcx": _encode(rgb, "PCX"),
        "rgb.tga": _encode(rgb, "TGA"),
        "rle.tga": _encode(rgb, "TGA", compression="tga_rle"),
        "rgb.sgi": _encode(rgb, "SGI"),
        "rgb.qoi": _encode(rgb, "QOI"),
        "rgb.dds": _encode(rgba, "DDS"),
        "rgb.im": _encode(rgb, "IM"),
        "grey.msp": _encode(rgb.convert("1"), "MSP"),
        "bits.xbm": _encode(rgb.convert("1"), "XBM"),
    }
    for name, fmt in (("rgb.jp2", "JPEG2000"), ("rgb.avif", "AVIF")):
        try:
            seeds[name] = _encode(rgb, fmt)
        except (OSError, KeyError, ValueError):  # the codec is not in this Pillow build
            pass
    return seeds


def _inflate_dimensions(name: str, data: bytes) -> bytes | None:
    """The file with its width and height fields rewritten to huge values, where the format
    keeps them at a known place."""
    out = bytearray(data)
    if name.endswith(".png"):  # IHDR: width, height at 16..24
        out[16:24] = struct.pack(">II", 0x7FFFFFFF, 0x7FFFFFFF)
    elif name.endswith(".bmp"):  # BITMAPINFOHEADER: width, height at 18..26
        out[18:26] = struct.pack("<ii", 0x7FFFFFFF, 0x7FFFFFFF)
    elif name.endswith(".gif"):  # logical screen 6..10
        out[6:10] = struct.pack("<HH", 0xFFFF, 0xFFFF)
    elif name.endswith((".jpg", ".tiff")) and b"\xff\xc0" in data:  # SOF0: height, width
        at = data.index(b"\xff\xc0") + 5
        out[at:at + 4] = struct.pack(">HH", 0xFFFF, 0xFFFF)
    elif name.endswith(".ppm") or name.endswith(".pgm"):
        header = b"P6" if name.endswith(".ppm") else b"P5"
        return header + b"\n99999999 99999999\n255\n" + data[data.index(b"255\n") + 4:]
    else:
        return None
    return bytes(out)


def mutants(seeds: dict[str, bytes], flips: int = 24, seed: int = 0) -> dict[str, bytes]:
    """Derived inputs per seed: cut at every offset of the first 64 bytes and at 16 offsets
    spread after; `flips` random single-byte changes in the first 256 bytes; the dimensions
    inflated."""
    rng = random.Random(seed)
    out = {}
    for name, data in seeds.items():
        cuts = set(range(min(64, len(data))))
        cuts |= {64 + (len(data) - 64) * k // 16 for k in range(16)} if len(data) > 64 else set()
        for cut in sorted(cuts):
            out[f"{name}.cut{cut}"] = data[:cut]
        for n in range(flips):
            flipped = bytearray(data)
            at = rng.randrange(min(256, len(data)))
            flipped[at] = (flipped[at] + rng.randrange(1, 256)) % 256
            out[f"{name}.flip{n}@{at}"] = bytes(flipped)
        inflated = _inflate_dimensions(name, data)
        if inflated is not None:
            out[f"{name}.huge"] = inflated
    return out


NOT_IMAGES = {
    "page.html": b"<!doctype html><html><body>404 Not Found</body></html>",
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    "document.pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    "notes.txt": "plain text, not a picture\n".encode(),
    "empty.jpg": b"",
    "zeros.png": bytes(4096),
    "random.webp": random.Random(7).randbytes(3000),
    "eps-without-box.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%EndComments\nshowpage\n",
}


def long_thin_png(width: int, height: int) -> bytes:
    """A tiny file whose resize would be enormous: 1x8000 is 224x1,792,000 at a 224 short side."""
    return _encode(Image.new("RGB", (width, height), (120, 30, 200)), "PNG")


# URLs malformed every way a manifest can hold them, and schemes the job does not read.
BAD_URLS = [
    "http://host with space/a.jpg",
    "http://foo..com/x.jpg",
    "http://" + "a" * 64 + ".example/x.jpg",
    "http://:80/x.jpg",
    "http:///nohost.jpg",
    "http://[::1/x.jpg",
    "http://h:99999/x.jpg",
    "http://h:port/x.jpg",
    "https://",
    "ftp://example.com/a.jpg",
    "sftp://example.com/a.jpg",
    "gopher://example.com/a.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "local:///etc/passwd",
    "zip://a.jpg::file:///tmp/x.zip",
    "tar://a.jpg::/tmp/x.tar",
    "simplecache::file:///etc/hostname",
    "s3://",
    "\x00nul.jpg",
]

CAPTIONS = [
    "0", "3.14", "true", "null", "\x00\x00", "a\x00b", "\u202eevil\u202c", "\u200b\u200b",
    "\t\n\r", "line\nbreaks\nand\ttabs", "🐱" * 600, "x" * 1_000_000, "长" * 3000,
    "mixed ∑ ≠ ∞ \U0001F600 عربى", "\x1b[31mred\x1b[0m", " leading and trailing ",
]
