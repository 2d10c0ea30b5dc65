"""`embed --retry-errors`: the rows whose error may be transient are tried again and replaced in
place; permanent errors only when asked by kind."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import altclip, read_output
from tests.corpus import odd_images

PNG = odd_images()["exact.png"]


@pytest.fixture
def flaky_server():
    """Answers 503 to every request until `state["up"]` is set."""
    state = {"up": False, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            state["requests"] += 1
            status, body = (200, PNG) if state["up"] else (503, b"busy")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()


def test_transient_errors_are_retried_in_place(flaky_server, tiny_model, ray_session, tmp_path):
    base, state = flaky_server
    (tmp_path / "good.png").write_bytes(PNG)
    (tmp_path / "broken.png").write_bytes(PNG[: len(PNG) // 2])
    rows = [{"id": f"web-{n}", "image": f"{base}/img{n}.png", "caption": f"picture {n}"} for n in range(6)]
    rows += [{"id": "local", "image": "good.png", "caption": "local"},
             {"id": "broken", "image": "broken.png", "caption": "cut short"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    out = tmp_path / "out"
    args = ["embed", tmp_path / "m.parquet", "--out", out, "--model", tiny_model,
            "--allow-private-urls", "--rows-per-shard", "3"]

    altclip(*args)
    first = read_output(out)
    assert all(first[f"web-{n}"]["image_error"].startswith("read_error: ") for n in range(6))
    assert first["broken"]["image_error"].startswith("truncated")
    shards_before = sorted(p.name for p in out.glob("part-*.parquet"))

    state["up"] = True
    result = altclip(*args, "--retry-errors")

    got = read_output(out)  # asserts every id once
    assert set(got) == {r["id"] for r in rows}
    assert all(got[f"web-{n}"]["image_embedding"] is not None for n in range(6))
    assert got["local"] == first["local"]  # rows without errors are left as they were
    assert got["broken"]["image_error"].startswith("truncated")  # permanent: not retried
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retried"] == {"rows": 6, "succeeded": 6, "still_failing": {}}
    assert summary["rows_out"] == summary["rows_in"] == 8 and summary["image_ok"] == 7
    assert "retried 6 rows: 6 now succeeded" in result.stderr
    assert sorted(p.name for p in out.glob("part-*.parquet")) != shards_before

    # Nothing left that may succeed: nothing to do. A permanent kind only when asked for.
    again = altclip(*args, "--retry-errors")
    assert "nothing to retry" in again.stderr
    asked = altclip(*args, "--retry-kind", "truncated")
    assert "retried 1 rows: 0 now succeeded; still failing: image.truncated 1" in asked.stderr
    assert set(read_output(out)) == {r["id"] for r in rows}


def test_retrying_needs_an_output_and_known_kinds(tiny_model, tmp_path):
    pq.write_table(pa.table({"id": ["a"], "caption": ["x"]}), tmp_path / "m.parquet")
    result = altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "none", "--model", tiny_model,
                     "--towers", "text", "--retry-errors", expect_exit=1)
    assert "holds no embeddings to retry" in result.stderr
    result = altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "none", "--model", tiny_model,
                     "--retry-kind", "flaky", expect_exit=1)
    assert "--retry-kind flaky: choose among" in result.stderr
