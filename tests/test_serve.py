"""`altclip serve`: the JSON API, its answers to malformed HTTP, and the page end to end in
headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import lancedb
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.serve import serve_command
from pipeline.query.filters import Filters
from pipeline.serve.app import MAX_JSON_BYTES, MAX_UPLOAD_BYTES, make_server
from pipeline.serve.searcher import Searcher, ServeError
from tests.conftest import _free_port, altclip, embedded_corpus

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def corpus(standard_run, tmp_path_factory):
    return embedded_corpus(standard_run, tmp_path_factory, "serve")


@pytest.fixture(scope="module")
def rows(corpus) -> dict[str, dict]:
    table = lancedb.connect(str(corpus / "db")).open_table("embeddings")
    return {r["id"]: r for r in table.search().select(["id", "image", "lang", "rank"])
            .limit(None).to_list()}


@pytest.fixture(scope="module")
def server(corpus):
    """The app on a free port of 127.0.0.1, in a thread of this process."""
    httpd = make_server(Searcher(str(corpus / "db"), "embeddings"), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def http(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body) of one request, errors included."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def get_json(url: str, **kw):
    status, headers, body = http(url, **kw)
    assert headers["Content-Type"].startswith("application/json"), headers["Content-Type"]
    return status, json.loads(body)


def search_url(server: str, **params) -> str:
    return f"{server}/api/search?{urllib.parse.urlencode(params)}"


def image_row(rows: dict, name: str) -> str:
    return next(i for i, r in rows.items() if r["image"].endswith(f"images/{name}"))


# ------------------------------------------------------------------------------------ the API


def test_openapi_spec_is_valid_and_names_the_paths(server):
    from openapi_spec_validator import validate

    status, headers, body = http(f"{server}/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    spec = json.loads(body)
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    assert {"/api/search", "/api/search/image", "/api/columns", "/api/thumbnail/{id}",
            "/api/similar/{id}", "/api/info"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/api/search"])
    params = {p["name"]: p for p in spec["paths"]["/api/search"]["get"]["parameters"]}
    assert params["filter.lang"]["schema"]["items"]["enum"] == ["de", "en", "es"]
    assert {"min.rank", "max.rank", "text", "k", "against"} <= set(params)


def test_columns_lists_metadata_with_types_and_values(server):
    status, body = get_json(f"{server}/api/columns")
    assert status == 200
    columns = {c["name"]: c for c in body["columns"]}
    assert columns["lang"] == {"name": "lang", "type": "string", "kind": "metadata",
                               "filter": "string", "values": ["de", "en", "es"]}
    assert columns["rank"]["filter"] == "integer" and columns["rank"]["kind"] == "metadata"
    assert columns["rank"]["min"] == 0
    # Vectors, hashes, errors and the model are never filters.
    assert not {"image_embedding", "text_embedding", "image_sha256", "model", "image_error"} & set(columns)


def test_show_uris_shows_the_stored_image_and_model(corpus, rows):
    from pipeline.query.filters import Filters

    searcher = Searcher(str(corpus / "db"), "embeddings", show_uris=True)
    hits = searcher.search(searcher.query.embed_text("un gato"), 50, "image", Filters({}))["hits"]
    assert {h["id"]: h["image"] for h in hits} == {i: r["image"] for i, r in rows.items()}
    assert searcher.info()["model"] == searcher.model.label and "/" in searcher.model.label


def test_text_search_with_a_filter_returns_only_matching_rows(server, rows):
    status, body = get_json(search_url(server, text="una foto de un gato", k=50, **{"filter.lang": "de"}))
    assert status == 200, body
    assert {h["id"] for h in body["hits"]} == {i for i, r in rows.items() if r["lang"] == "de"}
    assert body["where"] == "(`lang` = 'de')"
    hit = body["hits"][0]
    assert set(hit) >= {"id", "score", "caption", "image", "thumbnail", "metadata"}
    assert hit["thumbnail"] == f"/api/thumbnail/{hit['id']}"
    # Where the images and the model are stored stays on the server (no --show-uris).
    assert all(h["image"] == h["thumbnail"] for h in body["hits"])
    status, info = get_json(f"{server}/api/info")
    assert status == 200 and info["model"].startswith("tiny@") and "/" not in info["model"]
    assert "image_embedding" not in hit and "image_embedding" not in hit["metadata"]
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)

    # Several values are any of them; ranges on numbers; the same as JSON.
    status, body = get_json(search_url(server, text="x", k=50, **{"min.rank": 3, "max.rank": 7})
                            + "&filter.lang=de&filter.lang=es")
    expected = {i for i, r in rows.items() if r["lang"] in ("de", "es") and 3 <= r["rank"] <= 7}
    assert status == 200 and {h["id"] for h in body["hits"]} == expected
    status, body = get_json(f"{server}/api/search", method="POST",
                            headers={"Content-Type": "application/json"},
                            data=json.dumps({"text": "x", "k": 50, "filters": {
                                "lang": ["de", "es"], "rank": {"min": 3, "max": 7}}}).encode())
    assert status == 200 and {h["id"] for h in body["hits"]} == expected


def test_a_text_query_against_captions_finds_its_caption(server, rows, corpus):
    table = lancedb.connect(str(corpus / "db")).open_table("embeddings")
    caption = table.search().where("id = 'row-03'").select(["caption"]).to_list()[0]["caption"]
    status, body = get_json(search_url(server, text=caption, against="text", k=1))
    assert status == 200 and body["hits"][0]["id"] == "row-03"
    assert body["hits"][0]["score"] > 0.9999


@pytest.mark.parametrize("column", ["nope", "image_embedding", "lang) OR (1=1", "lang`", "id"])
def test_an_unknown_filter_column_is_a_400(server, column):
    status, body = get_json(search_url(server, text="x", **{f"filter.{column}": "de"}))
    assert status == 400 and "unknown filter column" in body["error"]
    status, body = get_json(f"{server}/api/search", method="POST",
                            headers={"Content-Type": "application/json"},
                            data=json.dumps({"text": "x", "filters": {column: "de"}}).encode())
    assert status == 400 and "unknown filter column" in body["error"]


@pytest.mark.parametrize("value", ["' OR 1=1 --", "de' OR '1'='1", "\\' OR 1=1 --", "de'; DROP TABLE x; --"])
def test_a_quote_in_a_filter_value_is_a_literal(server, value):
    status, body = get_json(search_url(server, text="x", k=50, **{"filter.lang": value}))
    assert status == 200, body
    assert body["hits"] == []
    status, body = get_json(f"{server}/api/search", method="POST",
                            headers={"Content-Type": "application/json"},
                            data=json.dumps({"text": "x", "filters": {"lang": value}}).encode())
    assert status == 200 and body["hits"] == []


@pytest.mark.parametrize("params, message", [
    ({"filter.rank": "1 OR 1=1"}, "not a valid int64"),
    ({"filter.rank": "abc"}, "not a valid int64"),
    ({"min.lang": "a"}, "numeric columns only"),
    ({"filter.caption_truncated": "maybe"}, "not a valid bool"),
    ({"k": "0"}, "k: '0' must be at least 1"),
    ({"k": "201"}, "k: '201' must be at most 200"),
    ({"k": "many"}, "k: 'many' is not an integer"),
    ({"text": "x" * 4001}, "text: at most 4000 characters"),
    ({"against": "audio"}, "against: 'audio'; choose image or text"),
    ({"text": ""}, "non-empty"),
])
def test_bad_values_are_a_400_that_says_why(server, params, message):
    status, body = get_json(search_url(server, **{"text": "x", **params}))
    assert status == 400 and message in body["error"], body


def test_thumbnails_are_jpeg_read_by_the_server(server, rows):
    row_id = image_row(rows, "rgba.png")
    status, headers, body = http(f"{server}/api/thumbnail/{row_id}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG" and max(image.size) == 256 and image.mode == "RGB"
    assert http(f"{server}/api/thumbnail/{row_id}?size=96")[0] == 200
    # Cached by the browser: the same ETag answers 304.
    status, _, _ = http(f"{server}/api/thumbnail/{row_id}", headers={"If-None-Match": headers["ETag"]})
    assert status == 304
    status, body = get_json(f"{server}/api/thumbnail/{urllib.parse.quote(chr(39) + ' OR 1=1 --')}")
    assert status == 404 and "no row" in body["error"]
    status, body = get_json(f"{server}/api/thumbnail/{row_id}?size=100000")
    assert status == 400


def test_an_uploaded_image_finds_itself_first(server, rows, corpus):
    row_id = image_row(rows, "rgba.png")
    data = (corpus / "images" / "rgba.png").read_bytes()
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, result = get_json(f"{server}/api/search/image", data=body, method="POST",
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, result
    assert result["count"] == 3 and result["hits"][0]["id"] == row_id
    assert result["hits"][0]["score"] > 0.9999
    # The raw body works too; and filters apply to image searches.
    lang = rows[row_id]["lang"]
    status, result = get_json(f"{server}/api/search/image?k=50&filter.lang={lang}", data=data,
                              method="POST", headers={"Content-Type": "image/png"})
    assert status == 200 and result["hits"][0]["id"] == row_id
    assert {h["metadata"]["lang"] for h in result["hits"]} == {lang}
    status, result = get_json(f"{server}/api/search/image", data=b"not an image", method="POST",
                              headers={"Content-Type": "image/png"})
    assert status == 400 and "decode_error" in result["error"]


def test_similar_uses_the_rows_own_vector(server, rows):
    row_id = image_row(rows, "landscape.jpg")
    status, body = get_json(f"{server}/api/similar/{row_id}?k=2")
    assert status == 200 and body["hits"][0]["id"] == row_id and body["hits"][0]["score"] > 0.9999
    status, body = get_json(f"{server}/api/similar/no-such-row")
    assert status == 404


def test_an_upload_over_the_limit_is_refused_unread(server):
    import http.client

    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/api/search/image")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(MAX_UPLOAD_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]
    connection.close()


def test_requests_for_another_host_are_refused(server):
    # Served on loopback: a page on another origin that rebinds its name to 127.0.0.1 gets nothing.
    status, body = get_json(f"{server}/api/info", headers={"Host": "attacker.example:80"})
    assert status == 403
    status, body = get_json(f"{server}/api/info", headers={"Host": "localhost:1@evil.com"})
    assert status == 400 and "is not a host" in body["error"]
    status, body = get_json(f"{server}/nope")
    assert status == 404 and body["error"] == "no such path: /nope"
    status, body = get_json(f"{server}/api/info", method="DELETE")
    assert status == 405 and "DELETE is not allowed" in body["error"]
    assert http(f"{server}/static/..%2Fapp.py")[0] == 404


def test_every_answer_has_the_security_headers_and_a_failure_names_only_its_type(server):
    status, headers, _ = http(f"{server}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for path in ("/", "/api/info", "/nope"):
        headers = http(server + path)[1]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["Referrer-Policy"] == "no-referrer"

    class Broken:  # a storage failure deep inside, with a signed URL in its message
        def info(self):
            raise OSError("GET s3://bucket/x?X-Amz-Signature=SECRET failed")

    httpd = make_server(Broken(), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        status, body = get_json(f"http://127.0.0.1:{httpd.server_address[1]}/api/info")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status == 500 and body == {"error": "internal error (OSError)"}


# ------------------------------------------------------------------------- HTTP on the wire


def exchange(server: str, data: bytes) -> tuple[list[tuple[int, dict, bytes]], bool]:
    """Write `data` on one connection; read what comes back until the server closes it or
    stays silent for 5 s. Returns the responses parsed from it and whether it closed."""
    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    received, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):  # closed before it read all of `data`
            closed = True
    return parse_responses(received), closed


def parse_responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """HTTP/1.1 responses one after the other: framed by Content-Length, chunked, or by the
    connection's end."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                body, rest = body + rest[:n], rest[n + 2:]
                if n == 0:
                    break
            data = rest
        else:
            body, data = rest, b""
        responses.append((status, headers, body))
    return responses


def _request(method: str, path: str, headers: dict | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# A request hidden in a body: if it were ever parsed as a request, its answer (the columns)
# would come back on the connection.
SMUGGLED = _request("GET", "/api/columns")
LAST = _request("GET", "/api/info", {"Connection": "close"})


def test_a_get_with_a_body_is_refused_and_its_body_never_read_as_a_request(server):
    responses, closed = exchange(server, _request("GET", "/api/info", {
        "Content-Length": len(SMUGGLED)}, SMUGGLED) + LAST)
    assert [r[0] for r in responses] == [400] and closed
    assert "takes no body" in json.loads(responses[0][2])["error"]


@pytest.mark.parametrize("framing", [
    {"Content-Length": ["5", "40"]},  # two lengths: which one ends the body is a guess
    {"Transfer-Encoding": "chunked", "Content-Length": "3"},
    {"Content-Length": "-1"},
    {"Transfer-Encoding": "gzip, chunked"},
])
def test_ambiguous_framing_is_a_400_and_closes_the_connection(server, framing):
    body = b'5\r\n{"tex\r\n0\r\n\r\n' + SMUGGLED
    lines = [f"{k}: {v}" for k, values in framing.items()
             for v in (values if isinstance(values, list) else [values])]
    data = ("\r\n".join(["POST /api/search HTTP/1.1", "Host: 127.0.0.1",
                           "Content-Type: application/json", *lines]) + "\r\n\r\n").encode()
    responses, closed = exchange(server, data + body + LAST)
    # One answer, the refusal, then the connection ends: nothing after it is read as a request
    # (and a length of -1 holds nothing open).
    assert [r[0] for r in responses] == [400] and closed, responses


def test_a_chunked_body_is_read_as_one_and_the_connection_goes_on(server):
    query = json.dumps({"text": "una foto de un gato", "k": 2}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (query[:7], query[7:]))
    chunked += b"0\r\n\r\n"
    responses, closed = exchange(server, _request("POST", "/api/search", {
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"}, chunked) + LAST)
    assert [r[0] for r in responses] == [200, 200] and closed
    assert json.loads(responses[0][2])["count"] == 2
    assert json.loads(responses[1][2])["table"] == "embeddings"  # the next request, answered

    # A chunked body has no length to refuse up front: it is counted as it comes.
    too_big = b"x" * (MAX_JSON_BYTES + 1)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(too_big), too_big)
    responses, closed = exchange(server, _request("POST", "/api/search", {
        "Content-Type": "application/json", "Transfer-Encoding": "chunked"}, chunked))
    assert [r[0] for r in responses] == [413] and closed


def _as_at_a_terminal():
    # Ctrl-C's SIGINT as a terminal delivers it: a test run started in the background by a
    # script has SIGINT ignored, and a child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop, quiet, show_uris", [(signal.SIGINT, False, False), (signal.SIGTERM, True, True)])
def test_the_serve_command(corpus, tmp_path, stop, quiet, show_uris):
    """`altclip serve` as a user starts it: a process that answers, logs each request without
    its query (unless --quiet), and stops on Ctrl-C (SIGINT) or SIGTERM (what Kubernetes and
    systemd send)."""
    result = CliRunner().invoke(serve_command, [str(tmp_path / "nothing-here")])
    assert result.exit_code == 1 and "no database there" in result.output
    assert not (tmp_path / "nothing-here").exists()  # reading commands create nothing
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(serve_command, [str(tmp_path / "empty")])
    assert result.exit_code == 1 and "has no table 'embeddings'" in result.output
    with socket.socket() as taken:  # a port in use fails at once, before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = CliRunner().invoke(serve_command, [str(corpus / "db"), "--port",
                                                    str(taken.getsockname()[1])])
    assert result.exit_code == 1 and "cannot listen there" in result.output

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "jobs.serve", str(corpus / "db"), "--port",
                                str(port), *(["--quiet"] if quiet else []),
                                *(["--show-uris"] if show_uris else [])], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_as_at_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = get_json(f"http://127.0.0.1:{port}/api/info")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the server did not answer in 120 s"
                time.sleep(0.5)
        assert status == 200 and body["table"] == "embeddings" and body["dim"] > 0
        # The model's folder by its name only, unless --show-uris: then its whole path.
        assert ("/" in body["model"]) == show_uris, body["model"]
        status, _ = get_json(search_url(f"http://127.0.0.1:{port}", text="private words", k=1))
        assert status == 200
    finally:
        process.send_signal(stop)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert f"on http://127.0.0.1:{port}/" in output
    # A query is the user's own text: the log has the path, never the query string.
    assert "private" not in output and "text=" not in output
    logged = [line for line in output.splitlines() if line.startswith(("GET ", "POST "))]
    assert logged == ([] if quiet else ["GET /api/info 200", "GET /api/search 200"]), output


# -------------------------------------------------------------------------------- the browser

_THUMBNAILS_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#results .card img')];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def _cards(page) -> list[dict]:
    return page.eval_on_selector_all("#results .card", """cards => cards.map(c => ({
        id: c.dataset.id,
        score: c.querySelector('.score').textContent,
        caption: c.querySelector('.caption').textContent,
        lang: (c.querySelector('.chip[data-column=lang]') || {}).textContent}))""")


def test_the_page_in_chromium(server, rows, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium: apt-get install chromium")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems, requests = [], []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
            page.goto(server + "/")
            page.wait_for_selector("body[data-ready=true]")
            assert "rows" in page.inner_text("#info")
            assert page.get_attribute("a[href='/openapi.json']", "href") == "/openapi.json"

            # A text query: every row comes back (k 24 > rows), each with a loaded thumbnail.
            page.fill("#q", "una foto de un gato en la nieve")
            page.click("#search-button")
            page.wait_for_function(_THUMBNAILS_LOADED, timeout=60_000)
            cards = _cards(page)
            assert {c["id"] for c in cards} == set(rows)
            assert all(c["caption"] for c in cards)
            scores = [float(c["score"]) for c in cards]
            assert scores == sorted(scores, reverse=True)
            page.screenshot(path=str(tmp_path / "serve-text.png"), full_page=True)

            # A filter: only German rows remain.
            german = {i for i, r in rows.items() if r["lang"] == "de"}
            page.click("fieldset[data-column=lang] label.choice:has(input[value=de]) span")
            page.wait_for_function(
                "n => document.querySelectorAll('#results .card').length === n && "
                "[...document.querySelectorAll('#results .chip[data-column=lang]')]"
                ".every(c => c.textContent === 'lang: de')", arg=len(german), timeout=60_000)
            page.wait_for_function(_THUMBNAILS_LOADED, timeout=60_000)
            assert {c["id"] for c in _cards(page)} == german
            assert "`lang` = 'de'" in page.inner_text("#where")
            assert "filter.lang=de" in page.url  # the search is in the address, to share
            page.screenshot(path=str(tmp_path / "serve-filter.png"), full_page=True)

            # Image to image: the uploaded image is its own nearest row.
            page.click("#clear-filters")
            query = image_row(rows, "rgba.png")
            page.set_input_files("#file", rows[query]["image"])
            page.wait_for_function(
                "id => { const c = document.querySelector('#results .card');"
                " return c && c.dataset.id === id && c.querySelector('.score').textContent === '1.000'; }",
                arg=query, timeout=60_000)
            page.wait_for_function(_THUMBNAILS_LOADED, timeout=60_000)
            assert len(_cards(page)) == len(rows)
            assert page.is_visible("#query-image")
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)

            # The API's page: Swagger UI from the package's own files, every operation listed.
            page.goto(server + "/docs")
            page.wait_for_selector(".opblock", timeout=60_000)
            listed = page.eval_on_selector_all(".opblock .opblock-summary-path", "ps => ps.map(p => p.textContent)")
            documented = json.loads(http(f"{server}/openapi.json")[2])["paths"]
            assert {p.replace("\u200b", "") for p in listed} == set(documented)
        finally:
            browser.close()
    assert not problems, problems
    # The browser only ever talked to the server: no storage URI, no signed URL, no other host.
    assert all(u.startswith((server + "/", "blob:", "data:")) for u in requests), requests
    assert not any(rows[query]["image"] in u for u in requests)
    if os.environ.get("ALTCLIP_UPDATE_SCREENSHOTS"):  # refresh the README's picture on request
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "serve.png")


def test_docs_serve_swagger_ui_from_the_package(server):
    status, headers, body = http(f"{server}/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "/docs-assets/swagger-ui-bundle.js" in page and "/docs-assets/swagger-ui.css" in page
    assert "//" not in page.replace("<!doctype html>", "")  # no other host: no CDN
    for asset, kind in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css")):
        status, headers, body = http(f"{server}/docs-assets/{asset}")
        assert status == 200 and kind in headers["content-type"] and len(body) > 100_000
    status, _, body = http(f"{server}/static/docs.js")
    assert status == 200 and b'url: "/openapi.json"' in body


def test_an_upload_of_too_many_pixels_is_refused_from_its_header(server):
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    # The header says 13000x13000 (a 160 KB file of that size costs 0.8 GB to decode).
    header = b"IHDR" + struct.pack(">II", 13000, 13000) + bytes(png[24:29])
    png[12:33] = header + struct.pack(">I", zlib.crc32(header))
    started = time.monotonic()
    status, result = get_json(f"{server}/api/search/image", data=bytes(png), method="POST",
                              headers={"Content-Type": "image/png"})
    assert status == 400 and "too_large: 13000x13000 exceeds 40000000 pixels" in result["error"]
    assert time.monotonic() - started < 10


def test_rows_the_job_did_not_read_have_no_thumbnail(tiny_model, ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ok.png").write_bytes(_png_bytes())
    manifest = pa.table({"id": ["ok", "private"], "caption": ["a", "b"],
                         "image": ["ok.png", "http://127.0.0.1:9/secret.png"]})
    pq.write_table(manifest, tmp_path / "m.parquet")
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model,
            "--db", tmp_path / "db")
    searcher = Searcher(str(tmp_path / "db"), "embeddings")
    assert searcher.thumbnail("ok", 96)[0][:2] == b"\xff\xd8"  # a JPEG
    with pytest.raises(ServeError) as raised:
        searcher.thumbnail("private", 96)  # the job refused this URL: the server does not read it
    assert raised.value.status == 404 and "forbidden" in str(raised.value)


def test_an_image_that_crashes_the_decoder_fails_its_thumbnail_and_report_not_the_process(
        tiny_model, ray_session, tmp_path):
    """The row's file was a good PNG when embedded, and is now one that crashes the decoder:
    the thumbnail is a 502 and the report shows the image as missing, in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.corpus import crash_image

    for name, colour in (("ok.png", (200, 20, 20)), ("crash.png", (20, 20, 200))):  # two images
        (tmp_path / name).write_bytes(_png_bytes(colour))
    pq.write_table(pa.table({"id": ["ok", "crash"], "caption": ["a", "b"], "image": ["ok.png", "crash.png"]}),
                   tmp_path / "m.parquet")
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model,
            "--db", tmp_path / "db")
    (tmp_path / "crash.png").write_bytes(crash_image())

    searcher = Searcher(str(tmp_path / "db"), "embeddings")
    with pytest.raises(ServeError) as raised:
        searcher.thumbnail("crash", 96)
    assert raised.value.status == 502 and "worker_crash" in str(raised.value)
    assert searcher.thumbnail("ok", 96)[0][:2] == b"\xff\xd8"

    altclip("report", tmp_path / "out", "--html", tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 1 and "(no image)" in page


def _png_bytes(colour=(200, 20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def test_scores_are_cosines_on_a_table_with_an_ann_index(corpus, tmp_path):
    """From ANN_INDEX_MIN_ROWS rows the table has an IVF_HNSW_SQ index, whose own distances are
    quantized squared L2: each score must still be the cosine of the two vectors."""
    import numpy as np
    import pyarrow as pa

    from pipeline.table.indexes import index_table
    from schemas.table import ANN_INDEX_MIN_ROWS

    source = lancedb.connect(str(corpus / "db")).open_table("embeddings").to_arrow()
    rng = np.random.default_rng(0)
    copies = -(-ANN_INDEX_MIN_ROWS // source.num_rows)
    tiled = pa.concat_tables([source] * copies)
    vectors = np.asarray(tiled.column("image_embedding").combine_chunks().values.to_numpy(
        zero_copy_only=False), dtype=np.float32).reshape(tiled.num_rows, -1)
    vectors = vectors + rng.normal(0, 0.05, vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    tiled = tiled.set_column(tiled.schema.get_field_index("id"), "id",
                             pa.array([f"r{i}" for i in range(tiled.num_rows)]))
    tiled = tiled.set_column(tiled.schema.get_field_index("image_embedding"),
                             tiled.schema.field("image_embedding"), column.cast(
                                 tiled.schema.field("image_embedding").type))
    table = lancedb.connect(str(tmp_path / "db")).create_table("embeddings", data=tiled)
    assert index_table(table)  # an ANN index was built
    searcher = Searcher(str(tmp_path / "db"), "embeddings")
    hits = searcher.search(vectors[7], 10, "image", Filters({}))["hits"]
    by_id = {f"r{i}": i for i in range(len(vectors))}
    assert hits[0]["id"] == "r7"
    for hit in hits:
        assert abs(hit["score"] - float(vectors[by_id[hit["id"]]] @ vectors[7])) < 1e-4, hit


def test_a_host_that_turns_slow_cannot_take_the_servers_workers(tiny_model, ray_session, tmp_path,
                                                                monkeypatch):
    """A row's host answered at embed time and trickles a byte at a time now: 50 thumbnail
    requests for that row take a few of the server's workers, the rest are refused at once, and
    every other request is answered as before."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.serve import searcher as searcher_module

    png = _png_bytes()
    slow = threading.Event()

    class Host(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            try:
                for start in range(0, len(png), 1 if slow.is_set() else len(png)):
                    self.wfile.write(png[start:start + (1 if slow.is_set() else len(png))])
                    if slow.is_set():
                        time.sleep(0.5)
            except OSError:
                pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Host)
    host.daemon_threads = True
    threading.Thread(target=host.serve_forever, daemon=True).start()
    (tmp_path / "ok.png").write_bytes(png)
    manifest = pa.table({"id": ["ok", "remote"], "caption": ["a", "b"],
                         "image": ["ok.png", f"http://127.0.0.1:{host.server_address[1]}/a.png"]})
    pq.write_table(manifest, tmp_path / "m.parquet")
    altclip("embed", tmp_path / "m.parquet", "--out", tmp_path / "out", "--model", tiny_model,
            "--db", tmp_path / "db", "--allow-private-urls")
    slow.set()

    monkeypatch.setattr(searcher_module, "THUMBNAIL_FETCH_TIMEOUT_S", 3.0)
    httpd = make_server(Searcher(str(tmp_path / "db"), "embeddings", allow_private_urls=True),
                        "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        statuses = []
        requests = [threading.Thread(target=lambda: statuses.append(
            http(f"{base}/api/thumbnail/remote?size=96")[:2])) for _ in range(50)]
        for thread in requests:
            thread.start()
        time.sleep(1.0)  # the first fetches are in flight, trickling
        started = time.monotonic()
        assert http(f"{base}/api/info")[0] == 200
        status, headers, body = http(f"{base}/api/thumbnail/ok?size=96")
        assert status == 200 and body[:2] == b"\xff\xd8"
        assert get_json(search_url(base, text="a"))[0] == 200
        # Had the slow host all 40 workers, these would wait 6.5 s for its two attempts.
        assert time.monotonic() - started < 4
        for thread in requests:
            thread.join(timeout=60)
        # At most THUMBNAIL_FETCHES_PER_HOST reads of the slow host, each cut off after its two
        # attempts (a 502); the others were refused at once, saying when to come back.
        assert len(statuses) == 50
        refused = [headers for status, headers in statuses if status == 503]
        assert len(refused) >= 50 - searcher_module.THUMBNAIL_FETCHES_PER_HOST
        assert all(headers["Retry-After"] == str(searcher_module.RETRY_AFTER_S) for headers in refused)
        assert {status for status, _ in statuses} <= {502, 503}
    finally:
        httpd.shutdown()
        httpd.server_close()
        host.shutdown()
