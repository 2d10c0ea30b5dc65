"""Pillow's resize, computed for one window of the output only: the centre crop of a huge resize.

A 1x8000 PNG resized so its short side is 224 is 224x1,792,000 pixels (1.2 GB) before the
centre crop keeps 224x224 of them. Each output pixel of Pillow's two-pass resampling depends
only on its own filter coefficients and source pixels, so computing the window alone, with the
same arithmetic (coefficients in double precision, 22-bit fixed point, horizontal pass first,
the intermediate rounded to uint8), gives the same bytes as resizing the whole image and
cropping. Transcribed from Pillow's `libImaging/Resample.c`; tests compare it with Pillow's
own resize bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_PRECISION_BITS = 32 - 8 - 2


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# Filters whose arithmetic is exact in numpy (Pillow's Hamming and Lanczos call libm's sin and
# cos, whose last bits may differ from numpy's).
FILTERS = {Image.Resampling.BOX: (_box, 0.5), Image.Resampling.BILINEAR: (_bilinear, 1.0),
           Image.Resampling.BICUBIC: (_bicubic, 2.0)}


def _coefficients(in_size: int, out_size: int, start: int, count: int, resample: int):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs start..start+count:
    the first source index and the number of source pixels of each output, and int64 weights
    (count, taps), zero past each output's end."""
    kernel, support = FILTERS[resample]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    firsts = np.zeros(count, dtype=np.int64)
    lengths = np.zeros(count, dtype=np.int64)
    weights = np.zeros((count, taps), dtype=np.int64)
    for i, xx in enumerate(range(start, start + count)):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = kernel((np.arange(xmax, dtype=np.float64) + xmin - center + 0.5) * (1.0 / filterscale))
        total = 0.0
        for value in w:  # summed in order, as the C loop does
            total += value
        if total != 0.0:
            w = w / total
        scaled = w * (1 << _PRECISION_BITS)
        weights[i, :xmax] = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
        firsts[i], lengths[i] = xmin, xmax
    return firsts, lengths, weights


def _pass(pixels: np.ndarray, axis: int, firsts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One 8-bit pass along `axis` (0: rows, 1: columns) of uint8 HxWxC, `firsts` relative to
    `pixels`: int32 sums from half, shifted, clipped, as ImagingResample*_8bpc."""
    count, taps = weights.shape
    index = np.clip(firsts[:, None] + np.arange(taps)[None, :], 0, pixels.shape[axis] - 1)
    shape = [1] * (pixels.ndim + 1)
    shape[axis], shape[axis + 1] = count, taps
    out = []
    # In slices of the other axis, so the gathered taps stay a few tens of MB.
    other = 1 - axis
    step = max(1, (1 << 22) // max(1, count * taps * pixels.shape[2]))
    for lo in range(0, pixels.shape[other], step):
        part = np.take(pixels, np.arange(lo, min(lo + step, pixels.shape[other])), axis=other)
        gathered = np.take(part, index, axis=axis).astype(np.int64)
        total = (gathered * weights.reshape(shape)).sum(axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
        out.append(np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8))
    return np.concatenate(out, axis=other)


def resized_window(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int],
                   resample: int) -> np.ndarray:
    """`np.asarray(image.resize(size, resample))[top:bottom, left:right]`, without the rest.

    `image` is 8-bit RGB; `size` is (width, height); `box` is (left, top, right, bottom) inside it.
    """
    width, height = size
    left, top, right, bottom = box
    pixels = np.asarray(image)
    in_height, in_width = pixels.shape[:2]
    # Pillow's own order: the vertical pass first when the height shrinks more than twice as
    # much as the width, else the horizontal pass first.
    passes = [(1, in_width, width, left, right), (0, in_height, height, top, bottom)]
    if (in_height - height) > 0 and (in_height - height) > (in_width - width) * 2:
        passes.reverse()
    (first_axis, *first), (second_axis, *second) = passes
    # The first pass runs only on the source lines the second pass reads for the window.
    lines = pixels
    if second[0] != second[1]:
        firsts, lengths, weights = _coefficients(second[0], second[1], second[2], second[3] - second[2], resample)
        lo, hi = int(firsts.min()), int((firsts + lengths).max())
        lines = np.take(pixels, np.arange(lo, hi), axis=second_axis)
    else:
        lines = np.take(pixels, np.arange(second[2], second[3]), axis=second_axis)
    for axis, (in_size, out_size, start, stop) in ((first_axis, first), (second_axis, second)):
        if out_size == in_size:
            if axis == first_axis:
                lines = np.take(lines, np.arange(start, stop), axis=axis)
            continue
        if axis == first_axis:
            offsets, _, axis_weights = _coefficients(in_size, out_size, start, stop - start, resample)
        else:
            offsets, axis_weights = firsts - lo, weights
        lines = _pass(lines, axis, offsets, axis_weights)
    return np.ascontiguousarray(lines)
