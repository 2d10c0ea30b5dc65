"""`altclip serve DB --ray`: the app as Ray Serve replicas on the test session's Ray answers as the
single-process server does, text queries of concurrent requests share a forward pass, and the
command starts, answers and stops."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import lancedb
import numpy as np
import pytest
from click.testing import CliRunner
from ray import serve

from jobs.serve import serve_command
from pipeline.config import ConfigError
from pipeline.query.query_table import open_query_table
from pipeline.serve import on_ray as serve_ray
from pipeline.serve.app import make_server
from pipeline.serve.searcher import Searcher
from tests.conftest import _free_port, embedded_corpus

REPO = Path(__file__).resolve().parents[1]
from tests.test_serve import get_json, http, image_row, search_url

# Fixed at two replicas; a quarter CPU each, so that both fit beside the session's other work on
# its 2 CPUs. A query waits up to 200 ms for others: concurrent queries surely meet in a batch.
REPLICA_ARGS = {"replicas": "2", "num_cpus": "0.25", "batch_wait_ms": "200",
                "allowed_hosts": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def corpus(standard_run, tmp_path_factory):
    return embedded_corpus(standard_run, tmp_path_factory, "serve-ray")


@pytest.fixture(scope="module")
def rows(corpus) -> dict[str, dict]:
    table = lancedb.connect(str(corpus / "db")).open_table("embeddings")
    return {r["id"]: r for r in table.search().select(["id", "image", "lang"]).limit(None).to_list()}


@pytest.fixture(scope="module")
def single(corpus):
    """The single-process server (as `altclip serve DB` runs it), to compare with."""
    httpd = make_server(Searcher(str(corpus / "db"), "embeddings"), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def replica_stats(expected: int) -> dict[str, dict]:
    """Each replica's stats, by replica id: asked until `expected` different replicas answered."""
    handle = serve.get_app_handle(serve_ray.APP_NAME)
    seen, deadline = {}, time.monotonic() + 30
    while len(seen) < expected and time.monotonic() < deadline:
        for stats in [r.result() for r in [handle.stats.remote() for _ in range(4)]]:
            seen[stats["replica"]] = stats
    assert len(seen) == expected, seen
    return seen


def same_results(ours: dict, theirs: dict) -> None:
    """The same hits in the same order, with the same fields; scores within float rounding
    (a batch's padding changes the sums' order, not the vectors)."""
    assert [h["id"] for h in ours["hits"]] == [h["id"] for h in theirs["hits"]]
    for mine, other in zip(ours["hits"], theirs["hits"]):
        assert abs(mine.pop("score") - other.pop("score")) < 1e-5
        assert mine == other
    assert {k: v for k, v in ours.items() if k not in ("hits", "search_ms")} == \
        {k: v for k, v in theirs.items() if k not in ("hits", "search_ms")}


class TestTwoReplicas:
    @pytest.fixture(scope="class")
    def replicas(self, corpus):
        """The app built as `serve run pipeline.serve.on_ray:app db=DB ...` builds it (string
        args), behind Serve's proxy on a free port of 127.0.0.1; Serve is shut down after."""
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serve_ray.app({"db": str(corpus / "db"), **REPLICA_ARGS}),
                  name=serve_ray.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
        serve_ray.stop(shutdown_serve=True)

    def test_two_replicas_answer_as_the_single_process_server(self, replicas, single, rows, corpus):
        stats = replica_stats(2)
        assert {s["device"] for s in stats.values()} == {"cpu"}  # the session's Ray has no GPU
        for path in ("/api/info", "/api/columns", "/openapi.json"):
            assert get_json(replicas + path) == get_json(single + path), path

        # Text, filtered, as JSON, against captions, by a stored row.
        for params in ({"text": "una foto de un gato", "k": 50},
                       {"text": "ein Hund", "k": 50, "filter.lang": "de"},
                       {"text": "x", "k": 5, "against": "text", "min.rank": 3, "max.rank": 9}):
            (status, ours), (_, theirs) = (get_json(search_url(s, **params)) for s in (replicas, single))
            assert status == 200 and ours["count"] > 0, ours
            same_results(ours, theirs)
        body = b'{"text": "a dog", "k": 7, "filters": {"lang": ["en", "es"]}}'
        (status, ours), (_, theirs) = (get_json(f"{s}/api/search", data=body, method="POST",
                                                headers={"Content-Type": "application/json"})
                                       for s in (replicas, single))
        assert status == 200
        same_results(ours, theirs)
        row_id = image_row(rows, "landscape.jpg")
        (status, ours), (_, theirs) = (get_json(f"{s}/api/similar/{row_id}?k=4") for s in (replicas, single))
        assert status == 200 and ours["hits"][0]["id"] == row_id
        same_results(ours, theirs)

        # An uploaded image; a thumbnail, byte for byte with its ETag.
        data = (corpus / "images" / "rgba.png").read_bytes()
        (status, ours), (_, theirs) = (get_json(f"{s}/api/search/image?k=5", data=data, method="POST",
                                                headers={"Content-Type": "image/png"})
                                       for s in (replicas, single))
        assert status == 200 and ours["hits"][0]["id"] == image_row(rows, "rgba.png")
        same_results(ours, theirs)
        ours, theirs = (http(f"{s}/api/thumbnail/{row_id}?size=96") for s in (replicas, single))
        assert ours[0] == 200 and ours[1]["Content-Type"] == "image/jpeg"
        assert ours[2] == theirs[2] and ours[1]["ETag"] == theirs[1]["ETag"]

        # Refusals are the app's own, through Serve's proxy too.
        for url, headers in ((search_url(replicas, text="x", k=0), {}),
                             (f"{replicas}/api/info", {"Host": "attacker.example"}),
                             (f"{replicas}/api/similar/no-such-row", {})):
            status, body = get_json(url, headers=headers)
            assert (status, body) == get_json(url.replace(replicas, single), headers=headers)
            assert status in (400, 403, 404) and body["error"]

    def test_concurrent_text_queries_share_a_forward_pass(self, replicas, single):
        texts = [f"query number {i}" for i in range(8)]
        before = replica_stats(2)
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(lambda t: get_json(search_url(replicas, text=t, k=3)), texts))
        after = replica_stats(2)
        for text, (status, ours) in zip(texts, answers):
            assert status == 200
            same_results(ours, get_json(search_url(single, text=text, k=3))[1])
        batches = {}  # size -> batches run for these 8 queries, over both replicas
        for replica, stats in after.items():
            for size, count in stats["batches"].items():
                batches[size] = batches.get(size, 0) + count - before[replica]["batches"].get(size, 0)
        assert sum(size * count for size, count in batches.items()) == len(texts), batches
        assert max(size for size, count in batches.items() if count) > 1, batches


def test_batched_vectors_equal_one_at_a_time(corpus, monkeypatch):
    """TextBatches on an event loop of its own: 8 texts from 8 threads at once share a batch,
    each vector is the one the text gets alone, and a text that cannot be embedded fails only
    its own call."""
    # Outside a replica, Serve's batching asks the replica's settings only to warn about them.
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=serve_ray.MAX_ONGOING_REQUESTS)))
    query = open_query_table(str(corpus / "db"), "embeddings")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        batches = serve_ray.TextBatches(query, loop, max_batch_size=16, wait_s=0.5)
        texts = ["una foto de un gato en la nieve", "a dog", "ein Hund im Schnee", "x" * 300,
                 "猫", "a", "μια γάτα στο χιόνι", ""]
        start = threading.Barrier(len(texts))

        def embed(text):
            start.wait()
            try:
                return batches.embed_text(text)
            except ConfigError as exc:
                return exc

        with ThreadPoolExecutor(len(texts)) as pool:
            vectors = list(pool.map(embed, texts))
    finally:
        asyncio.run_coroutine_threadsafe(_cancel_tasks(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    assert max(batches.sizes) > 1, batches.sizes
    assert isinstance(vectors[-1], ConfigError) and "empty_caption" in str(vectors[-1])
    for text, vector in zip(texts[:-1], vectors[:-1]):
        alone = query.embed_text(text)
        assert float(vector @ alone) / float(np.linalg.norm(vector) * np.linalg.norm(alone)) >= 0.99999


async def _cancel_tasks():
    """Ends the tasks Serve's batching left on the loop (its queue's), before the loop stops."""
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()


def test_app_args_as_serve_run_and_a_rayservice_give_them():
    options = serve_ray.parse_options({"db": "s3://tables/db", "replicas": "1,4", "num_gpus": "1",
                                       "batch_size": "32", "access_log": "false"})
    assert serve_ray.deployment_options(options) == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0},
        "max_ongoing_requests": 64,
        "logging_config": {"enable_access_log": False},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                               "target_ongoing_requests": serve_ray.TARGET_ONGOING_REQUESTS}}
    fixed = serve_ray.deployment_options(serve_ray.parse_options({"db": "d", "replicas": "3",
                                                                  "num_gpus": 0}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_gpus"] == 0
    for args, message in (({"db": "d", "replicas": "0"}, "`replicas` '0': give N"),
                          ({"db": "d", "replicas": "3,2"}, "0 <= MIN <= MAX"),
                          ({"db": "d", "tabel": "x"}, "tabel: Extra inputs are not permitted"),
                          ({"table": "x"}, "db: Field required"),
                          ({"db": "d", "num_gpus": "-1"}, "num_gpus: Input should be greater")):
        with pytest.raises(ConfigError, match=message):
            serve_ray.parse_options(args)


def test_the_serve_command_with_ray(corpus, ray_session, tmp_path):
    """`altclip serve DB --ray` as a user starts it (here on the session's Ray, in a thread):
    it answers, refuses other Hosts as on loopback, and returns once the app is deleted."""
    runner = CliRunner()
    result = runner.invoke(serve_command, [str(corpus / "db"), "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas applies with --ray only" in result.output
    result = runner.invoke(serve_command, [str(tmp_path / "nothing-here"), "--ray"])
    assert result.exit_code == 1 and "no database there" in result.output
    # What only the replicas find (here, a model that is not there) is said as they fail.
    result = runner.invoke(serve_command, [str(corpus / "db"), "--ray", "--port", str(_free_port()),
                                           "--model", str(tmp_path / "no-model"), "--num-cpus", "0.25"])
    assert result.exit_code == 1, result.output
    assert "the replicas did not start" in result.output and "no-model: not a folder" in result.output
    assert not serve.status().applications  # the failed app is gone

    port, log, done = _free_port(), io.StringIO(), {}

    def run():
        with contextlib.redirect_stderr(log):  # read below while the command runs
            try:
                serve_command.main([str(corpus / "db"), "--ray", "--port", str(port), "--replicas",
                                    "1", "--num-cpus", "0.25", "--quiet"], standalone_mode=False)
            except BaseException as exc:
                done["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while "serving table" not in log.getvalue():
            assert thread.is_alive(), (done, log.getvalue())
            assert time.monotonic() < deadline, "no start-up line in 120 s"
            time.sleep(0.5)
        status, body = get_json(f"http://127.0.0.1:{port}/api/info")
        assert status == 200 and body["table"] == "embeddings"
        status, _ = get_json(f"http://127.0.0.1:{port}/api/info", headers={"Host": "attacker.example"})
        assert status == 403
    finally:
        serve.delete(serve_ray.APP_NAME)  # as `serve delete altclip` does
        thread.join(60)
    assert not thread.is_alive() and not done, (done, log.getvalue())
    assert "serving table 'embeddings' (" in log.getvalue()
    assert f"on http://127.0.0.1:{port}/" in log.getvalue()
    assert "replicas: 1, 0.25 CPUs and 0 GPUs each, on cpu" in log.getvalue()
    assert not serve.status().applications and not serve.status().proxies  # Serve shut down


def test_the_proxy_callback_makes_serves_uvicorn_parse_with_h11(monkeypatch):
    """What `altclip serve --ray` (and the RayService manifest) name in
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: Serve's proxy builds its uvicorn with
    http="auto", which would take httptools (installed by ray[serve]); after the callback it
    takes h11, the parser `altclip serve` uses."""
    import uvicorn
    import uvicorn.protocols.http.auto as auto
    from ray._common.utils import import_attr
    from uvicorn.protocols.http.h11_impl import H11Protocol

    monkeypatch.setattr(auto, "AutoHTTPProtocol", auto.AutoHTTPProtocol)  # restored afterwards
    config = uvicorn.Config(lambda scope, receive, send: None, http="auto", lifespan="off")
    config.load()
    assert config.http_protocol_class is not H11Protocol  # httptools, where it is installed
    assert import_attr(serve_ray.PROXY_CALLBACK)() == []  # no middleware added
    config = uvicorn.Config(lambda scope, receive, send: None, http="auto", lifespan="off")
    config.load()
    assert config.http_protocol_class is H11Protocol
    manifest = (REPO / "deploy" / "rayservice.yaml").read_text()
    assert f"value: {serve_ray.PROXY_CALLBACK}" in manifest
