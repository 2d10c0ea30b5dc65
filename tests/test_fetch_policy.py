"""Fetches that cannot be steered: redirects checked hop by hop, the connection made to the address
checked, only the schemes a job reads, every read bounded; malformed URLs and servers that answer
garbage are the row's error within seconds."""

from __future__ import annotations

import os
import socket
import threading
import time
import zipfile

import pytest

from pipeline.decode import http_get
from pipeline.decode.barrier import ImageError
from pipeline.decode.fetch import FetchPolicy, read_bytes
from tests.corpus import odd_images
from tests.fuzz import BAD_URLS

PNG = odd_images()["exact.png"]


class RawServer:
    """A TCP server on `address` answering each request path with crafted bytes (or, for the
    path "/count", nothing: it only counts connections)."""

    def __init__(self, address: str, port: int = 0, answers: dict[str, bytes] | None = None):
        self.answers = answers or {}
        self.hits: list[str] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            self.hits.append(path)
            answer = self.answers.get(path.split("?")[0], _response(404, b"no"))
            if callable(answer):
                answer = answer(self.port)
            try:
                conn.sendall(answer)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def _response(status: int, body: bytes, headers: dict | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture
def fake_internet(monkeypatch):
    """`public.test` and `rebind.test` resolve to 127.0.0.1, which counts as public here;
    127.0.0.2 stands for the cluster's internal services. `rebind.test` answers 127.0.0.2 from
    its second lookup on, as a DNS rebinding attacker would."""
    lookups: dict[str, int] = {}
    real = http_get.resolve_host

    def resolve(host, port):
        lookups[host] = lookups.get(host, 0) + 1
        if host == "public.test":
            return ["127.0.0.1"]
        if host == "rebind.test":
            return ["127.0.0.1"] if lookups[host] == 1 else ["127.0.0.2"]
        if host == "internal.test":
            return ["127.0.0.2"]
        return real(host, port)

    monkeypatch.setattr(http_get, "resolve_host", resolve)
    monkeypatch.setattr(http_get, "is_public_address", lambda address: address == "127.0.0.1")
    monkeypatch.setattr(http_get, "HTTP_BACKOFF_S", 0.01)
    monkeypatch.setattr(http_get, "HTTP_TIMEOUT_S", 2)
    servers = []

    def serve(answers, address="127.0.0.1", port=0):
        server = RawServer(address, port, answers)
        servers.append(server)
        return server

    yield serve, lookups
    for server in servers:
        server.close()


def _kind(call) -> str:
    try:
        call()
    except ImageError as exc:
        return str(exc).split(":", 1)[0]
    return "ok"


def test_every_redirect_hop_is_checked(fake_internet):
    serve, _ = fake_internet
    internal = serve({"/secret": _response(200, PNG)}, address="127.0.0.2")
    public = serve({
        "/ok.png": _response(200, PNG),
        "/hop": _response(302, b"", {"Location": "/ok.png"}),
        "/to-internal-ip": _response(302, b"", {"Location": f"http://127.0.0.2:{internal.port}/secret"}),
        "/to-internal-name": _response(302, b"", {"Location": f"http://internal.test:{internal.port}/secret"}),
        "/to-ftp": _response(301, b"", {"Location": "ftp://public.test/a.jpg"}),
        "/to-file": _response(307, b"", {"Location": "file:///etc/passwd"}),
        "/loop": _response(302, b"", {"Location": "/loop"}),
        "/no-location": _response(302, b""),
    })
    base = f"http://public.test:{public.port}"
    assert http_get.fetch_url(f"{base}/hop") == PNG  # a redirect on the public host is followed
    for path, kind in [("/to-internal-ip", "forbidden"), ("/to-internal-name", "forbidden"),
                       ("/to-ftp", "forbidden"), ("/to-file", "forbidden"),
                       ("/loop", "read_error"), ("/no-location", "read_error")]:
        with pytest.raises(ImageError) as raised:
            http_get.fetch_url(f"{base}{path}?token=SECRET")
        assert str(raised.value).startswith(f"{kind}: "), (path, str(raised.value))
        assert "SECRET" not in str(raised.value)
    assert internal.hits == []  # the internal service was never reached


def test_the_connection_goes_to_the_address_that_was_checked(fake_internet):
    serve, lookups = fake_internet
    public = serve({"/ok.png": _response(200, PNG)})
    internal = serve({"/ok.png": _response(200, b"internal data")}, address="127.0.0.2", port=public.port)
    # One lookup, checked and connected to; urllib would resolve again when connecting and reach
    # 127.0.0.2.
    assert http_get.fetch_url(f"http://rebind.test:{public.port}/ok.png") == PNG
    assert lookups["rebind.test"] == 1
    assert internal.hits == [] and public.hits == ["/ok.png"]
    # The next fetch looks again, sees the private address and refuses it.
    assert _kind(lambda: http_get.fetch_url(f"http://rebind.test:{public.port}/ok.png")) == "forbidden"
    assert internal.hits == []


def test_servers_answering_garbage_are_row_errors_within_seconds(fake_internet):
    serve, _ = fake_internet
    long_header = b"X-Long: " + b"a" * 70000 + b"\r\n"
    public = serve({
        "/garbage": b"this is not http\r\n\r\n",
        "/bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nConnection: close\r\n\r\n" + PNG,
        "/negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\nConnection: close\r\n\r\n" + PNG,
        "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 900\r\n\r\nhello",
        "/cut-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nabc",
        "/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "/long-header": b"HTTP/1.1 200 OK\r\n" + long_header + b"Content-Length: 2\r\n\r\nhi",
        "/many-headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150))
                         + b"Content-Length: 2\r\n\r\nhi",
        "/short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nConnection: close\r\n\r\nabc",
        "/status-999": _response(999, b"?"),
        "/forbidden": _response(403, b"no"),
        "/gone": _response(410, b"gone"),
    })
    base = f"http://public.test:{public.port}"
    kinds = {}
    for path in ["/garbage", "/bad-length", "/negative-length", "/two-lengths", "/cut-chunked",
                 "/bad-chunk", "/long-header", "/many-headers", "/short-body", "/status-999",
                 "/forbidden", "/gone"]:
        started = time.monotonic()
        kinds[path] = _kind(lambda: http_get.fetch_url(base + path))
        assert time.monotonic() - started < 15, path
    assert kinds["/gone"] == "not_found"
    # Every garbage answer is a row error, never an exception out of the fetch (the job's
    # barrier would catch it anyway; here the fetch itself names it).
    assert set(kinds.values()) <= {"read_error", "not_found", "ok"}, kinds
    assert kinds["/garbage"] == kinds["/cut-chunked"] == kinds["/short-body"] == "read_error"


@pytest.mark.parametrize("url", BAD_URLS)
def test_malformed_urls_and_foreign_schemes_fail_their_row_at_once(url):
    policy = FetchPolicy(allow_local_paths=False, job_schemes=frozenset({"s3"}))
    started = time.monotonic()
    kind = _kind(lambda: read_bytes(url, policy))
    assert kind in {"forbidden", "read_error", "not_found"}, (url, kind)
    assert time.monotonic() - started < 10, url
    if url.split(":", 1)[0] in ("ftp", "sftp", "gopher", "local", "zip", "tar", "simplecache", "file"):
        assert kind == "forbidden", url


def test_local_paths_are_an_allow_list(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.write(image, "inside.png")
    remote = FetchPolicy(allow_local_paths=False, job_schemes=frozenset({"s3"}))
    local = FetchPolicy(allow_local_paths=True)
    for uri in [str(image), f"file://{image}", f"local://{image}", f"zip://inside.png::{tmp_path}/images.zip",
                f"zip://inside.png::file://{tmp_path}/images.zip", f"simplecache::file://{image}",
                "gs://bucket/a.png"]:
        assert _kind(lambda: read_bytes(uri, remote)) == "forbidden", uri
    assert read_bytes(f"zip://inside.png::{tmp_path}/images.zip", local) == PNG
    assert read_bytes(f"file://{image}", local) == PNG
    assert _kind(lambda: read_bytes("ftp://example.com/a.png", local)) == "forbidden"
    assert _kind(lambda: read_bytes("zip://inside.png::ftp://example.com/x.zip", local)) == "forbidden"
    # fsspec's protocols with `_` in their names are schemes too, not relative paths.
    for uri in [f"arrow_hdfs://namenode/{image}", f"async_wrapper://{image}",
                "zip://inside.png::arrow_hdfs://namenode/x.zip"]:
        assert _kind(lambda: read_bytes(uri, local)) == "forbidden", uri


@pytest.mark.parametrize("address, public", [
    ("::ffff:127.0.0.1", False),  # IPv4-mapped
    ("::127.0.0.1", False),  # IPv4-compatible
    ("::ffff:0:10.0.0.1", False),  # IPv4-translated
    ("64:ff9b::169.254.169.254", False),  # NAT64 to the metadata service
    ("64:ff9b:1::7f00:1", False),  # local-use NAT64
    ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
    ("64:ff9b::8.8.8.8", True), ("2002:808:808::1", True), ("2606:4700::1111", True),
    ("::1", False), ("::", False), ("8.8.8.8", True),
])
def test_an_ipv6_address_is_judged_by_the_ipv4_address_it_carries(address, public):
    assert http_get.is_public_address(address) is public


def test_a_url_with_a_double_colon_is_a_url(tmp_path):
    """`::` in a URL (an IPv6 address, a query) is not fsspec's chaining: the URL is fetched,
    and its address judged."""
    server = RawServer("127.0.0.1", answers={"/ok.png": _response(200, PNG)})
    url = f"http://127.0.0.1:{server.port}/ok.png?range=a::b"
    assert read_bytes(url, FetchPolicy(allow_private_urls=True)) == PNG
    assert _kind(lambda: read_bytes(url, FetchPolicy())) == "forbidden"
    assert _kind(lambda: read_bytes(f"http://[::ffff:127.0.0.1]:{server.port}/ok.png",
                                    FetchPolicy())) == "forbidden"
    server.close()


def test_every_local_read_is_bounded(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    monkeypatch.setattr(http_get, "MAX_IMAGE_BYTES", 4096)
    results = {}

    def read_all():
        for path in (fifo, "/dev/zero", loop, tmp_path, big):
            results[str(path)] = _kind(lambda: read_bytes(str(path)))

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "a read hung"
    assert results == {str(fifo): "read_error", "/dev/zero": "read_error", str(loop): "read_error",
                       str(tmp_path): "read_error", str(big): "too_large"}


def test_a_store_the_job_is_not_configured_for_is_not_waited_for(monkeypatch):
    # Nothing listens on this port: the S3 endpoint is down. For a job whose own stores are
    # local, an image on S3 is that row's error within seconds, not a wait of --storage-patience.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
    policy = FetchPolicy(options, allow_local_paths=True, patience_s=300, job_schemes=frozenset({"file"}))
    started = time.monotonic()
    kind = _kind(lambda: read_bytes("s3://bucket/a.jpg", policy))
    assert kind in {"timeout", "read_error"}
    assert time.monotonic() - started < 60


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(fake_internet, tmp_path,
                                                                                   monkeypatch):
    import datetime
    import ssl
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "public.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("public.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        # Not trusted yet: the certificate is refused (a row error, not an exception).
        assert _kind(lambda: http_get.fetch_url(f"https://public.test:{port}/a.png")) == "read_error"
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
        http_get.close_pools()
        assert http_get.fetch_url(f"https://public.test:{port}/a.png") == PNG
        # The same address under another name: the certificate does not name it.
        monkeypatch.setattr(http_get, "resolve_host", lambda host, p: ["127.0.0.1"])
        assert _kind(lambda: http_get.fetch_url(f"https://other.test:{port}/a.png")) == "read_error"
    finally:
        http_get.close_pools()
        httpd.shutdown()


def test_a_host_is_resolved_once_while_its_addresses_are_kept(monkeypatch):
    calls = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kw: calls.append(args) or real(*args, **kw))
    monkeypatch.setattr(http_get, "_RESOLVED", type(http_get._RESOLVED)())
    assert http_get.resolve_host("localhost", 80) == http_get.resolve_host("LOCALHOST", 80)
    assert len(calls) == 1
    monkeypatch.setattr(http_get, "DNS_CACHE_S", 0.0)  # kept no longer: asked again
    http_get.resolve_host("localhost", 81)
    http_get.resolve_host("localhost", 81)
    assert len(calls) == 3
