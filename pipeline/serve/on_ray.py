"""`altclip serve --ray`: the query app as a Ray Serve deployment: replicas that autoscale, each
holding the table's model (on a GPU when it has one), and the text queries of concurrent requests
embedded together, one forward pass per batch.

Started by `altclip serve DB --ray`, by `serve run pipeline.serve.on_ray:app db=DB`, or by a KubeRay
RayService (deploy/rayservice.yaml) naming the same import path and args.
"""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from pipeline.config import ConfigError, named
from pipeline.embed.model import pick_device
from pipeline.serve.app import make_app
from pipeline.serve.searcher import Searcher
from schemas.table import DEFAULT_TABLE_NAME

APP_NAME = "altclip"
DEPLOYMENT_NAME = "search"
# Text queries that arrive together share a forward pass, up to MAX_BATCH_SIZE, each waiting at
# most BATCH_WAIT_MS for others. On 2 CPU cores, 16 short queries through the full-size text
# tower took 2.8-5.2x less time in one batch than one at a time (float32, a loaded machine); the
# app with the tiny model answered 16 clients at 110 requests/s in batches, 84 without.
MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 10.0
# Requests a replica takes at once. Serve's default (5) would hold back most of a results page,
# which asks for its 24 thumbnails together, and would cap a batch at 5 texts.
MAX_ONGOING_REQUESTS = 64
# Autoscaling adds a replica when the replicas hold more requests than this each, on average: a
# full batch of queries, or a page's thumbnails.
TARGET_ONGOING_REQUESTS = 16
STATS_TIMEOUT_S = 60


class ServeOptions(BaseModel):
    """What the app takes: `serve run pipeline.serve.on_ray:app key=value ...`, a RayService's
    `args`, and `altclip serve DB --ray`'s options all come to this."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(description="The LanceDB database: a folder, or a URI every replica reaches.")
    table: str = DEFAULT_TABLE_NAME
    model: str | None = Field(None, description="The query model; default: the table's own.")
    replicas: str = Field("1,2", description="N replicas, or MIN,MAX to autoscale between.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; default: 1 when "
                                                           "the cluster has GPUs, else 0.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    batch_size: int = Field(MAX_BATCH_SIZE, ge=1, description="Text queries per forward pass.")
    batch_wait_ms: float = Field(BATCH_WAIT_MS, ge=0,
                                 description="How long a text query waits for others to join it.")
    allowed_hosts: str | None = Field(None, description="Host names answered, comma-separated; "
                                                        "default: any.")
    allow_private_urls: bool = False
    show_uris: bool = False
    access_log: bool = True
    storage_options: dict[str, str] = Field(default_factory=dict)

    def replica_range(self) -> tuple[int, int]:
        """(MIN, MAX) replicas; equal for a fixed number."""
        try:
            parts = [int(p) for p in self.replicas.split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1 and parts[0] >= 1:
            return parts[0], parts[0]
        if len(parts) == 2 and 0 <= parts[0] <= parts[1] and parts[1] >= 1:
            return parts[0], parts[1]
        raise ConfigError(f"{named('replicas')} {self.replicas!r}: give N (at least 1), or MIN,MAX with "
                          "0 <= MIN <= MAX and MAX at least 1")

    def host_names(self) -> set[str] | None:
        if self.allowed_hosts is None:
            return None
        return {name.strip().lower() for name in self.allowed_hosts.split(",") if name.strip()}


def parse_options(args: dict) -> ServeOptions:
    """The app's args (strings from `serve run`, typed values from a config file), checked."""
    try:
        options = ServeOptions.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"{problems} (the app takes {', '.join(ServeOptions.model_fields)})") from None
    options.replica_range()
    return options


class TextBatches:
    """A table's QueryTable whose embed_text joins the texts of concurrent requests into one
    forward pass, through Serve's batching on `loop`; every other attribute is the table's own."""

    def __init__(self, query, loop: asyncio.AbstractEventLoop, max_batch_size: int, wait_s: float):
        self.query = query
        self.loop = loop
        self.sizes: collections.Counter = collections.Counter()  # batch size -> batches
        # Made per instance (Serve's queue is per decorated function), on the replica's loop.
        self._embed = serve.batch(max_batch_size=max_batch_size,
                                  batch_wait_timeout_s=wait_s)(self._embed_batch)

    def __getattr__(self, name):
        return getattr(self.query, name)

    def embed_text(self, text: str) -> np.ndarray:
        """Called from a worker thread (the app's routes that embed text are sync functions,
        run in a thread pool), never from `loop`, which this waits on."""
        vector = asyncio.run_coroutine_threadsafe(self._embed(text), self.loop).result()
        if isinstance(vector, Exception):
            raise vector
        return vector

    async def _embed_batch(self, texts: list[str]) -> list:
        self.sizes[len(texts)] += 1
        # The forward pass runs in a thread: the loop goes on taking requests meanwhile, and
        # they form the next batch.
        return await asyncio.to_thread(self._vectors, texts)

    def _vectors(self, texts: list[str]) -> list:
        """A vector per text, or the ConfigError of a text that could not be embedded: one bad
        text fails its own request, not its batch's."""
        try:
            return list(self.query.embed_texts(texts))
        except ConfigError:
            return [self._one(text) for text in texts]

    def _one(self, text: str):
        try:
            return self.query.embed_text(text)
        except ConfigError as exc:
            return exc


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SearchReplica:
    """One replica: the table, its model on the replica's device, and the app over them."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.searcher = Searcher(options.db, options.table, model=options.model,
                                 storage_options=options.storage_options,
                                 allow_private_urls=options.allow_private_urls,
                                 show_uris=options.show_uris)
        self.texts: TextBatches | None = None

    async def __serve_build_asgi_app__(self):
        # Serve calls this after __init__, on the loop the replica's requests run on: the batches
        # are gathered there.
        self.texts = TextBatches(self.searcher.query, asyncio.get_running_loop(),
                                 self.options.batch_size, self.options.batch_wait_ms / 1000)
        self.searcher.query = self.texts
        return make_app(self.searcher, self.options.host_names())

    async def stats(self) -> dict:
        """This replica: its id, model, device, and how many text batches of each size it ran
        (read on the loop that counts them)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "model": self.searcher.model.label, "dtype": self.searcher.dtype,
                "device": str(pick_device()), "batches": dict(self.texts.sizes)}


def app(args: dict):
    """`serve run pipeline.serve.on_ray:app db=DB [table=NAME replicas=1,4 num_gpus=1 ...]`, and
    the import path of a RayService's serveConfigV2 (its `args`)."""
    return build(parse_options(args))


def build(options: ServeOptions):
    """The Serve application: SearchReplica with its resources, replicas and batching."""
    return SearchReplica.options(**deployment_options(options)).bind(options)


def deployment_options(options: ServeOptions) -> dict:
    """Serve's options for the replicas: resources, how many, requests in flight, logging."""
    low, high = options.replica_range()
    scaling = {"num_replicas": low} if low == high else {"autoscaling_config": {
        "min_replicas": low, "max_replicas": high, "target_ongoing_requests": TARGET_ONGOING_REQUESTS}}
    return {"ray_actor_options": {"num_cpus": options.num_cpus,
                                  "num_gpus": replica_gpus(options.num_gpus)},
            "max_ongoing_requests": max(MAX_ONGOING_REQUESTS, 2 * options.batch_size),
            "logging_config": {"enable_access_log": options.access_log},
            **scaling}


def replica_gpus(requested: float | None) -> float:
    """`requested`, or by default a GPU per replica when there are GPUs: the cluster's, or this
    machine's when Ray is not connected yet (`serve run` builds the app before it connects)."""
    if requested is not None:
        return requested
    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def serve_running() -> bool:
    """Whether Serve runs on the connected Ray already (its HTTP options are then kept)."""
    return bool(serve.status().proxies)


def deploy(options: ServeOptions, host: str, port: int) -> dict:
    """Run the app on the connected Ray, with Serve's HTTP proxy on host:port where this starts
    Serve, and wait until its replicas are up. Returns one replica's stats."""
    serve.start(http_options={"host": host, "port": port})
    try:
        handle = serve.run(build(options), name=APP_NAME, route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start: Serve's own message only names it
        raise ConfigError(f"the replicas did not start: {deployment_failure() or exc}") from None
    # Bounded: a replica deleted meanwhile (`serve delete`) would leave the call waiting for good.
    return handle.stats.remote().result(timeout_s=STATS_TIMEOUT_S)


def deployment_failure() -> str | None:
    """The last line of a failed deployment's message: the exception its replicas raised."""
    application = serve.status().applications.get(APP_NAME)
    for deployment in (application.deployments.values() if application else ()):
        lines = [line for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return None


def wait_while_deployed(poll_s: float = 2.0) -> None:
    """Return once the app is gone (`serve delete altclip`, Serve shut down)."""
    while APP_NAME in serve.status().applications:
        time.sleep(poll_s)


def stop(shutdown_serve: bool) -> None:
    """Delete the app; with `shutdown_serve` (Serve was started for it), shut Serve down too
    where no other app is left on it."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    if shutdown_serve and not serve.status().applications:
        serve.shutdown()


# Ray Serve calls this in its proxy as it starts, where the environment names it (see
# PROXY_CALLBACK); `altclip serve --ray` sets that before it starts Ray.
PROXY_CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "pipeline.serve.on_ray:strict_http_parser"


def strict_http_parser() -> list:
    """The proxy's uvicorn parses requests with h11, as `altclip serve` does (serve.server), not
    with httptools, which `ray[serve]` installs and uvicorn's "auto" prefers: two parsers frame
    some requests differently (where a proxy in front and the server disagree on where a request
    ends, the rest is read as another). Adds no middleware."""
    import uvicorn.protocols.http.auto as auto
    from uvicorn.protocols.http.h11_impl import H11Protocol

    auto.AutoHTTPProtocol = H11Protocol
    return []
