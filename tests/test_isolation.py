"""The decoding children: hangs that overlap, a bound on each child's memory, and callers in
parallel threads that do not wait on each other."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from pipeline.decode import isolation
from pipeline.decode.images import ImagePreprocessing, pixels_of
from pipeline.decode.isolation import RowFailure, map_isolated
from tests.child_work import allocate, crash_or_echo, hang_or_echo


@pytest.fixture(autouse=True)
def fresh_children():
    isolation.stop()  # children started here read this test's settings
    yield
    isolation.stop()


def test_the_hangs_of_one_batch_overlap(monkeypatch):
    monkeypatch.setattr(isolation, "STRAGGLER_S", 0.5)
    items = ["a", "hang", "b", "hang", "c", "hang", "d"]
    started = time.monotonic()
    results = map_isolated(hang_or_echo, items, timeout_s=4)
    elapsed = time.monotonic() - started
    assert results[::2] == ["a", "b", "c", "d"]
    assert all(isinstance(r, RowFailure) and r.kind == "timeout" for r in results[1::2])
    assert "no result after 4 s" in results[1].message
    # One after another the three would cost 12 s; overlapped, one timeout and the straggler
    # waits before each.
    assert elapsed < 4 + 3 * 0.5 + 2.5, elapsed


def test_a_crash_fails_its_row_alone_whatever_was_sent_behind_it():
    """Rows are sent ahead of answers: those queued behind a crash go to a new child."""
    items = ["a", "crash", "b", "c", "crash", "crash", "d", "e"]
    results = map_isolated(crash_or_echo, items)
    assert [r for r in results if isinstance(r, str)] == ["a", "b", "c", "d", "e"]
    crashed = [n for n, r in enumerate(results) if isinstance(r, RowFailure)]
    assert crashed == [1, 4, 5] and all(results[n].kind == "worker_crash" and "SIGSEGV" in results[n].message
                                        for n in crashed)


def test_large_rows_both_ways_do_not_block_the_pipes():
    """Rows and answers larger than a pipe holds, several in flight: neither side waits on the other."""
    items = ["x" * (1 << 20) + str(n) for n in range(20)]
    assert map_isolated(hang_or_echo, items) == items


def test_more_hangs_than_a_call_may_hold_children_are_all_timed_out(monkeypatch):
    monkeypatch.setattr(isolation, "STRAGGLER_S", 0.2)
    items = ["hang"] * (isolation.CHILDREN_PER_CALL + 2) + ["last"]
    results = map_isolated(hang_or_echo, items, timeout_s=1.5)
    assert results[-1] == "last"
    assert [r.kind for r in results[:-1]] == ["timeout"] * (len(items) - 1)


def test_a_child_allocating_past_its_bound_fails_that_row_and_goes_on(monkeypatch):
    monkeypatch.setattr(isolation, "CHILD_MEMORY_BYTES", 256 << 20)
    assert map_isolated(allocate, [16 << 20, 1 << 30, 16 << 20]) == ["ok", "MemoryError", "ok"]


def test_an_image_too_large_for_the_bound_is_too_large_not_the_machines_problem(monkeypatch):
    """8000x8000 RGBA, under the pixel cap: 256 MB of pixels once decoded."""
    monkeypatch.setattr(isolation, "CHILD_MEMORY_BYTES", 128 << 20)
    buf = io.BytesIO()
    Image.new("RGBA", (8000, 8000), (10, 20, 30, 255)).save(buf, "PNG")
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(small, "PNG")
    prep = ImagePreprocessing(shortest_edge=224, resize_hw=None, crop_hw=(224, 224),
                              resample=Image.Resampling.BICUBIC, rescale_factor=1 / 255,
                              mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    big, ok = map_isolated(pixels_of, [(buf.getvalue(), "big"), (small.getvalue(), "small")],
                           (prep, None))
    assert big[3] is not None and big[3].startswith("too_large: "), big
    assert ok[3] is None and len(ok[0]) == 224 * 224 * 3


def test_callers_in_other_threads_do_not_wait_behind_a_hang():
    """The query server decodes each request's upload in a child of its own."""
    hung = threading.Thread(target=map_isolated, args=(hang_or_echo, ["hang"]), kwargs={"timeout_s": 6})
    hung.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert map_isolated(hang_or_echo, ["quick"]) == ["quick"]
    assert time.monotonic() - started < 3
    hung.join()
