"""Images by http(s) URL: timeouts, retries with backoff, a size cap; failures stay per row."""

from __future__ import annotations

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import __version__
from pipeline.decode import http_get
from pipeline.decode.barrier import ImageError
from pipeline.decode.fetch import FetchPolicy
from pipeline.decode.http_get import fetch_url
from tests.conftest import altclip, read_output
from tests.corpus import odd_images

PNG = odd_images()["exact.png"]


@pytest.fixture(scope="module")
def server():
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.split("?")[0]
            hits[path] = hits.get(path, 0) + 1
            hits[f"agent {path}"] = self.headers.get("User-Agent")
            if path == "/ok.png" or (path == "/flaky.png" and hits[path] > 2):
                self._send(200, PNG)
            elif path.startswith("/robots/"):  # the X-Robots-Tag values after /robots/, by |
                tags = urllib.parse.unquote(path[len("/robots/"):]).split("|")
                self._send(200, PNG, [("X-Robots-Tag", tag) for tag in tags])
            elif path.startswith("/latency/"):  # the image after half a second
                time.sleep(0.5)
                self._send(200, PNG)
            elif path.startswith("/silent/"):  # headers never come
                time.sleep(30)
            elif path == "/busy.png" and hits[path] == 1:
                self._send(503, b"busy", [("Retry-After", "2")])
            elif path == "/busy.png":
                self._send(200, PNG)
            elif path == "/flaky.png":
                self._send(503, b"busy")
            elif path == "/slow.png":
                time.sleep(1.5)
                self._send(200, PNG)
            elif path == "/trickle-headers.png":
                self._trickle(b"HTTP/1.1 200 OK\r\nX-Padding: ")
            elif path == "/trickle-body.png":
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            elif path == "/big.png":
                self._send(200, b"x" * 4096)
            else:
                self._send(404, b"no")

        def _trickle(self, start: bytes):
            """`start`, then a byte every 0.1 s for 60 s at most: never a read timeout's silence."""
            try:
                self.wfile.write(start)
                for _ in range(600):
                    time.sleep(0.1)
                    self.wfile.write(b"x")
            except OSError:  # the client gave up
                pass
            self.close_connection = True

        def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except BrokenPipeError:
                pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 512  # hundreds of fetches connect at once
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


def test_fetch_retries_transient_errors_and_gives_up_precisely(server, monkeypatch):
    base, hits = server
    monkeypatch.setattr(http_get, "HTTP_BACKOFF_S", 0.01)
    assert fetch_url(f"{base}/ok.png", allow_private=True) == PNG
    assert fetch_url(f"{base}/flaky.png", allow_private=True) == PNG and hits["/flaky.png"] == 3  # two 503s, then 200

    with pytest.raises(ImageError, match=r"^not_found: .*/missing.png: HTTP 404"):
        fetch_url(f"{base}/missing.png", allow_private=True)

    monkeypatch.setattr(http_get, "HTTP_TIMEOUT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"^timeout: .*/slow.png\?…: no complete answer in 0.3 s, 2 attempts"):
        fetch_url(f"{base}/slow.png?signature=SECRET", allow_private=True)
    assert time.monotonic() - started < 5

    monkeypatch.setattr(http_get, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(ImageError, match=r"^too_large: .*/big.png: 4096 bytes > 1000"):
        fetch_url(f"{base}/big.png", allow_private=True)


@pytest.mark.parametrize("tags, opted_out", [
    (["noai"], True), (["noindex, nofollow"], True), (["NoImageAI"], True), (["none"], True),
    (["altclip-pipeline: noimageai"], True), (["googlebot: noindex"], False),
    (["nofollow", "otherbot: noai"], False), (["nofollow", "noai"], True), (["max-image-preview:large"], False),
])
def test_images_whose_x_robots_tag_opts_out_are_not_taken(server, tags, opted_out):
    base, _ = server
    url = f"{base}/robots/{urllib.parse.quote('|'.join(tags))}"
    if opted_out:
        with pytest.raises(ImageError, match=r"^opted_out: .*X-Robots-Tag: "):
            fetch_url(url, allow_private=True)
        # The directives are the caller's to choose: none honoured, the image is fetched.
        assert fetch_url(url, allow_private=True, disallowed_directives=frozenset()) == PNG
    else:
        assert fetch_url(url, allow_private=True) == PNG


def test_fetches_name_the_tool_and_wait_as_retry_after_asks(server, monkeypatch):
    base, hits = server
    monkeypatch.setattr(http_get, "HTTP_BACKOFF_S", 0.01)
    fetch_url(f"{base}/ok.png", allow_private=True)
    assert hits["agent /ok.png"] == f"altclip-pipeline/{__version__}"
    fetch_url(f"{base}/ok.png", allow_private=True, user_agent="my-crawler/2 (+https://example.org)")
    assert hits["agent /ok.png"] == "my-crawler/2 (+https://example.org)"
    started = time.monotonic()
    assert fetch_url(f"{base}/busy.png", allow_private=True) == PNG
    assert hits["/busy.png"] == 2 and time.monotonic() - started >= 2  # not the 0.01 s backoff


def test_fetches_in_flight_are_set_by_latency_not_by_batches(server):
    """300 images that each take half a second arrive in about one round trip per window of
    fetches in flight (one host: as many windows as its limit makes), and a URL that never
    answers holds only its own batch."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from pipeline.decode.images import ImageFetcher
    from schemas.manifest import INLINE_IMAGE

    base, _ = server
    fetcher = ImageFetcher(FetchPolicy(allow_private_urls=True, http_timeout_s=3), per_host=100)

    def batch(urls):
        return pa.table({"image": urls, INLINE_IMAGE: pa.array([None] * len(urls), pa.binary())})

    started = time.monotonic()
    fetched = fetcher(batch([f"{base}/latency/{n}.png" for n in range(300)]))
    assert time.monotonic() - started < 4  # 3 windows of 100; one at a time: 150 s
    assert fetched.column(INLINE_IMAGE).to_pylist() == [PNG] * 300
    started = time.monotonic()
    ImageFetcher(FetchPolicy(allow_private_urls=True), per_host=16)(
        batch([f"{base}/latency/{n}.png" for n in range(64)]))
    assert time.monotonic() - started >= 4 * 0.5  # 16 at a time to one host

    held = batch([f"{base}/latency/a.png", f"{base}/silent/never.png"])
    with ThreadPoolExecutor(2) as calls:  # the actor's calls, as Ray Data makes them
        slow = calls.submit(fetcher, held)
        time.sleep(0.2)
        started = time.monotonic()
        quick = calls.submit(fetcher, batch([f"{base}/latency/{n}.png" for n in range(64)])).result()
        assert time.monotonic() - started < 3 and quick.column("image_error").null_count == 64
        errors = slow.result().column("image_error").to_pylist()
    assert errors[0] is None and errors[1].startswith("timeout: ")


@pytest.mark.parametrize("path", ["/trickle-headers.png", "/trickle-body.png"])
def test_a_server_that_trickles_bytes_is_cut_off_at_the_deadline(server, monkeypatch, path):
    """A byte every 0.1 s never leaves a read waiting long enough for a socket timeout: the
    deadline is the attempt's wall clock, headers and body alike."""
    base, _ = server
    monkeypatch.setattr(http_get, "HTTP_BACKOFF_S", 0.01)
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"^timeout: .*: no complete answer in 1 s, 2 attempts"):
        fetch_url(f"{base}{path}", allow_private=True, timeout_s=1, attempts=2)
    assert time.monotonic() - started < 2 * 1 + 1.5
    # The connection cut off is not handed to the next fetch from that host.
    assert fetch_url(f"{base}/ok.png", allow_private=True) == PNG


def test_http_images_through_the_embed_job(server, tiny_model, ray_session, tmp_path):
    base, _ = server
    table = pa.table({"id": ["ok", "gone", "trickles", "opted-out"],
                      "image": [f"{base}/ok.png", f"{base}/gone.png?token=SECRET", f"{base}/trickle-body.png",
                                f"{base}/robots/noai"],
                      "caption": ["un gato", "un perro", "un pájaro", "un pez"]})
    pq.write_table(table, tmp_path / "m.parquet")
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "refused", "--model", tiny_model)
    refused = read_output(tmp_path / "refused")
    assert refused["ok"]["image_error"].startswith("forbidden: ")  # 127.0.0.1 is not public
    assert "--allow-private-urls" in refused["ok"]["image_error"]

    started = time.monotonic()
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model,
            "--allow-private-urls", "--fetch-timeout", "1")
    rows = read_output(tmp_path / "out")
    # 2 attempts of 1 s (a timeout is tried once more) and the backoff; the job's start-up besides.
    assert rows["trickles"]["image_error"].startswith("timeout: ") and "no complete answer in 1 s" in \
        rows["trickles"]["image_error"]
    assert rows["trickles"]["text_embedding"] is not None
    assert rows["opted-out"]["image_error"].startswith("opted_out: ")
    assert time.monotonic() - started < 90
    assert rows["ok"]["image_embedding"] is not None and rows["ok"]["width"] == 224
    assert rows["gone"]["image_error"].startswith("not_found:")
    assert "SECRET" not in rows["gone"]["image_error"]
    assert rows["gone"]["image"] == f"{base}/gone.png?…"  # the signed part never reaches outputs
