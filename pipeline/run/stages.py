"""The Ray Data plan: read -> decode + tokenize (CPU tasks) -> tower actors -> write."""

from __future__ import annotations

import _thread
import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import ray

from pipeline import storage
from pipeline.config import TOWERS, ConfigError, EmbedConfig, named
from pipeline.decode.fetch import FetchPolicy, job_schemes
from pipeline.decode.images import ImageFetcher, decode_images
from pipeline.decode.text import tokenize_captions
from pipeline.embed.model import ModelSpec
from pipeline.embed.towers import ImageEmbedder, TextEmbedder, TowersEmbedder
from pipeline.read.ids import select_rows
from pipeline.read.manifest import Manifest, read_manifest, to_contract_columns
from pipeline.read.partitions import FileSlices
from schemas.manifest import INLINE_IMAGE

# A tower actor that cannot be placed (a GPU nobody has) fails the job after this long instead
# of waiting for ever, which is what Ray Data would do (see TowerStartWatch).
ACTOR_START_TIMEOUT_S = 600
# CPUs the tasks reading the manifest reserve (writes reserve none). A read task streams a whole
# file and keeps its reservation while Ray Data holds its output back; at a whole CPU the read, a
# decode task and the tower actor asked 2.5 of a 2-CPU machine's 2, so decoding waited for the
# read of the whole file (a 2,000-row manifest in blocks of 2 rows sat 120 s without a row done),
# and a read paused with a full output queue would never let it start. Reading is I/O: a quarter
# leaves a decode task its core.
READ_CPUS = 0.25
# The fetch stage is its own Ray Data stage, apart from decoding: a fetch waits on the network,
# a decode on a core, and a task that did both in turn left its core idle for each batch's
# round trips (0.20x img2dataset's rate on the same URLs and cores). ImageFetcher actors take
# FETCH_CALLS batches at once each, so a batch held by a host that never answers holds one of
# them (with 1% of URLs never answering, half of all 64-row batches wait out a timeout: at 32
# calls they soon held them all). An actor reserves a quarter of a CPU (parsing, TLS), one per
# FETCH_ACTOR_CPUS CPUs of the cluster (at least one), leaving the cores to the decoders.
FETCH_CPUS = 0.25
FETCH_CALLS = 128
FETCH_ACTOR_CPUS = 8


# Seconds a cluster's address has to accept a connection (see _check_cluster_answers).
CLUSTER_CONNECT_TIMEOUT_S = 10


def ensure_ray(address: str | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets it); without
    either, start Ray in-process. `auto` joins a cluster started on this machine by `ray start`.
    Unless `verbose`, the libraries' own notes stay out of the job's output (quiet_libraries)."""
    if not verbose:
        quiet_libraries()
    if ray.is_initialized():
        return
    # "local", not Ray's default: that would try whatever cluster this machine last started,
    # even one long gone.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _check_cluster_answers(address)
    # A Ray started for this one job runs without its dashboard (Ray keeps a minimal process of
    # it for its own APIs): nobody opens it for one job, and its UI's dozen processes took 5% of
    # the CPU of a job on 2 cores. A cluster's own dashboard is the cluster's (`ray start
    # --head`, then --address auto).
    own = {"include_dashboard": False} if address == "local" else {}
    for attempt in (1, 2):
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, **own)
            return
        except Exception as exc:
            if not _start_timed_out(exc):
                raise
            ray.shutdown()  # the half-started processes go before the next try
            if attempt == 1:
                # Ray waits a fixed 30 s for its own processes; on a loaded machine the second
                # start, with the first one's processes gone, usually makes it.
                logging.getLogger(__name__).warning("Ray did not start in time (%s); trying once more", exc)
                continue
            where = "on this machine" if address == "local" else f"at {address}"
            raise ConfigError(
                f"Ray did not start {where}, twice: {exc}. The machine may be overloaded or short "
                "of memory; free some, or start Ray first (ray start --head) and give "
                f"{named('address')} auto") from None


def end_actors(*actors) -> None:
    """A run's own actors (None: not started) end with the run, not with the driver: a driver
    that runs more than one job (a notebook, a scheduler, the tests' session) would gather them."""
    for actor in actors:
        if actor is not None:
            with contextlib.suppress(Exception):  # Ray may be going down with the driver
                ray.kill(actor)


def quiet_libraries() -> None:
    """A run prints its progress, its summary and real problems: Ray's notes about itself (token
    authentication), Ray Data's execution plans and Lance's creation of a new table are not a
    user's business (they stay in Ray's log files; --verbose prints them). Warnings and errors
    of the job's own stages still print."""
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Ray Data's advice on its own operators ("consider setting memory=... in the appropriate
    # function call"): the stages are ours, not the user's to configure.
    logging.getLogger("ray.data._internal.issue_detection").setLevel(logging.ERROR)
    # Read by Lance's Rust logger when lance is first imported, in this process and in the
    # Ray workers it starts ("WARN lance::dataset::write::insert No existing dataset ...").
    os.environ.setdefault("LANCE_LOG", "error")


def _check_cluster_answers(address: str) -> None:
    """A cluster address (HOST:PORT, or ray://HOST:PORT) that nothing answers at fails in
    seconds, saying what to change: ray.init waits minutes there, silent."""
    host, colon, port = address.split("://", 1)[-1].rpartition(":")
    if not colon or not port.isdigit():
        return  # `local`, `auto`, or a form Ray's own parsing has to judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CLUSTER_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"{named('address')} {address}: no Ray cluster answers there ({exc}); give the address "
            "`ray start --head` printed (HOST:6379, or ray://HOST:10001 for Ray Client), or auto "
            "for a cluster started on this machine") from None


def _start_timed_out(exc: Exception) -> bool:
    """Ray's processes did not come up (or answer) in time, as opposed to a wrong setting."""
    return isinstance(exc, (TimeoutError, ConnectionError)) or "timed out" in str(exc)


@dataclass(frozen=True)
class Placement:
    """Resources per tower actor, decided from the options and what the cluster has."""

    num_gpus: float
    num_cpus: float
    concurrency: int | tuple[int, int]  # a fixed pool, or (min, max) to autoscale
    torch_threads: int

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0


CPU_ACTOR_RESERVATION = 0.5


def plan_placement(config: EmbedConfig) -> Placement:
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    towers = len(config.towers)
    if config.num_gpus is not None:
        num_gpus = config.num_gpus
        if num_gpus > 0 and gpus == 0:
            raise ConfigError(
                f"{named('num_gpus')} {num_gpus}: the Ray cluster has no GPUs; "
                f"give {named('num_gpus')} 0 to run on CPUs"
            )
    else:
        # Both towers share each GPU unless told otherwise.
        num_gpus = 1.0 / towers if gpus else 0.0
    if num_gpus:
        concurrency = config.concurrency or max(1, int(gpus / towers / num_gpus))
        return Placement(num_gpus, 1.0, concurrency, torch_threads=0)
    concurrency = config.concurrency or 1
    actors = concurrency[1] if isinstance(concurrency, tuple) else concurrency
    # The actors' torch threads split the cores but one (two on a 2-core machine: the model is
    # the work there, and the decoding tasks take a core only while they have rows). Each actor
    # reserves half a CPU with Ray: the tasks, asking a whole CPU each, always find cores, and
    # the requests differ, which keeps Ray Data from fusing the decoding tasks into the actor
    # (it fuses stages whose requests match), where they would run in turn with the model.
    spare = max(cpus - 1, min(cpus, 2.0))
    return Placement(0.0, CPU_ACTOR_RESERVATION, concurrency, torch_threads=max(1, int(spare // actors)))


def manifest_rows(manifest: Manifest, file_slices: tuple[FileSlices, ...] | None, rows_per_block: int,
                  included: pa.Array | None = None):
    """The rows of the manifest's files in the contract's columns, each file read as its plan
    (from scan_ids; None: whole) says; with `included`, only rows whose id is in it."""
    ds = read_manifest(manifest, READ_CPUS, file_slices).map_batches(
        select_rows, fn_kwargs={"id_col": manifest.id_col, "included": included},
        batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS,
    )
    # Small blocks so decode tasks and tower actors work side by side from the first rows on.
    ds = _reserving(ds.repartition(target_num_rows_per_block=rows_per_block), READ_CPUS)
    return ds.map_batches(to_contract_columns, fn_kwargs={"manifest": manifest},
                          batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS)


def _reserving(ds, num_cpus: float):
    """`ds`, whose last operation (a repartition: Ray Data 2.60's `repartition` takes no
    resources) reserves `num_cpus` per task, so that it fuses with the read before it (same
    reservation) and holds no more than the read does."""
    last = ds._logical_plan.dag
    if hasattr(last, "ray_remote_args"):
        object.__setattr__(last, "ray_remote_args", {**last.ray_remote_args, "num_cpus": num_cpus})
    return ds


def fetch_policy(config: EmbedConfig) -> FetchPolicy:
    """Where the job's image reads may go: local files only for a manifest on this machine (or
    with --allow-local-paths), object stores of the job's own schemes, public URLs."""
    return FetchPolicy(
        storage_options=config.storage_options,
        allow_local_paths=storage.is_local(config.manifest) or config.allow_local_paths,
        allow_private_urls=config.allow_private_urls,
        patience_s=config.storage_patience_s,
        job_schemes=job_schemes(config.manifest, config.out, config.db),
        http_timeout_s=config.fetch_timeout_s,
        **({"user_agent": config.user_agent} if config.user_agent else {}),
        **({"disallowed_directives": frozenset(config.disallowed_header_directives)}
           if config.disallowed_header_directives is not None else {}),
    )


UNREACHABLE_STORE_ERRORS = ("Could not connect to the endpoint URL", "Connect timeout on endpoint URL",
                            "Read timeout on endpoint URL", "Connection was closed before we received")


def configure_ray_data(progress_bars: bool, verbose: bool = False) -> None:
    """Ray Data's settings for the job. Set before the job makes its first dataset: each dataset
    keeps a copy of the settings current when its read was made, so later changes are ignored."""
    ctx = ray.data.DataContext.get_current()
    # The plan does not wait for its tower actors before it starts: manifest reads and the first
    # decodes run while the actors load the model (on 2 cores the first row came 11 s sooner).
    # TowerStartWatch fails the job if they never start.
    ctx.wait_for_min_actors_s = -1
    # Ray Data retries reading a manifest file on errors that match these; add how botocore
    # (under s3fs) words an unreachable endpoint to pyarrow's own wording.
    ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *UNREACHABLE_STORE_ERRORS]))
    # Off: no bars and no status block every 10 s in a log; the job's own progress line stays.
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = verbose  # the plan's operators, a line per dataset
    # Ray Data polls each map task's memory from a thread the task starts; a fetch actor runs
    # FETCH_CALLS tasks at once, so as many threads read /proc about it every second (a tenth
    # of its time). The figure feeds only Ray Data's own statistics.
    ctx.memory_usage_poll_interval_s = None
    # Off on purpose, so Ray Data's warning that bars are off (with how to turn them on, which
    # is not ours to offer) says nothing a user can act on.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def embed_dataset(ds, config: EmbedConfig, model: ModelSpec, dtype: str, placement: Placement,
                  counter=None):
    """Rows in the contract's columns -> the same rows with their vectors (the towers in
    `config.towers` only), errors, hashes and sizes."""
    pool = placement.concurrency
    actor_args = dict(
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]) if isinstance(pool, tuple)
        else ray.data.ActorPoolStrategy(size=pool),
        num_gpus=placement.num_gpus,
        num_cpus=placement.num_cpus,
    )
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # Decoding and tokenizing fuse into one CPU task (same request).
    task_cpus = cpu_task_cpus(cpus, placement, len(config.towers))
    if "image" in config.towers:
        ds = ds.map_batches(
            ImageFetcher, fn_constructor_kwargs={"policy": fetch_policy(config)},
            batch_format="pyarrow", batch_size=config.batch_size, num_cpus=FETCH_CPUS,
            compute=ray.data.ActorPoolStrategy(
                size=fetch_actors(cpus), max_tasks_in_flight_per_actor=FETCH_CALLS,
                max_concurrent_calls_per_actor=FETCH_CALLS, enable_true_multi_threading=True),
        )
        ds = ds.map_batches(
            decode_images,
            fn_kwargs={"preprocessing": model.preprocessing, "mode": config.preprocess,
                       "decode_timeout_s": config.decode_timeout_s},
            batch_format="pyarrow", batch_size=config.batch_size, num_cpus=task_cpus,
        )
    else:
        ds = ds.map_batches(lambda t: t.drop_columns([INLINE_IMAGE]), batch_format="pyarrow",
                            num_cpus=task_cpus)
    if "text" in config.towers:
        ds = ds.map_batches(
            tokenize_captions,
            fn_kwargs={"model": model},
            batch_format="pyarrow", batch_size=config.batch_size, num_cpus=task_cpus,
        )
    actors = tower_actors(config, placement)
    for n, actor in enumerate(actors):
        kwargs = {"model": model, "dtype": dtype, "num_threads": placement.torch_threads,
                  "counter": counter, "reports_rows": n == len(actors) - 1,
                  "vector_dtype": config.vector_dtype}
        if config.compile and actor is not TextEmbedder:
            # The text tower is not compiled: each group of captions has its own length.
            kwargs["compile_batch"] = config.batch_size
        ds = ds.map_batches(actor, fn_constructor_kwargs=kwargs, **actor_args)
    return ds


def cpu_task_cpus(cpus: float, placement: Placement, towers: int) -> float:
    """What a decode/tokenize task reserves: a CPU where the towers are on GPUs. Where they are
    on the CPUs, a task per core: the light reservations of the tower actor, the fetch actors and
    the manifest's read (which run on the same cores, in turns with the decoding) are taken from
    the tasks' shares, or on 2 cores their half and quarter CPU left one decode task at a time (a
    core idle while the bench's fetched images waited to be decoded)."""
    if placement.on_gpu:
        return 1.0
    light = (tower_actor_count(placement, towers) * placement.num_cpus + fetch_actors(cpus) * FETCH_CPUS
             + READ_CPUS)
    share = max(0.25, (cpus - light) / max(1, math.floor(cpus)))
    # Not the tower actor's own request: Ray Data fuses a stage into the actor after it when
    # their requests match, and the decoding would run inside the tower actor, in turn with it.
    return share - 0.01 if math.isclose(share, placement.num_cpus) else share


def actors_per_tower(placement: Placement) -> int:
    """A tower's actors in a run: its pool's size, or the most an autoscaling pool grows to."""
    pool = placement.concurrency
    return pool[1] if isinstance(pool, tuple) else pool


def tower_actor_count(placement: Placement, towers: int) -> int:
    """The tower actors a run starts: actors_per_tower for each tower on GPUs; on CPUs one
    actor holds both towers (towers.TowersEmbedder)."""
    return actors_per_tower(placement) * (towers if placement.on_gpu else 1)


def fetch_actors(cpus: float) -> int:
    """ImageFetcher actors for a cluster of `cpus` CPUs (see FETCH_CPUS)."""
    return max(1, int(cpus // FETCH_ACTOR_CPUS))


def tower_actors(config: EmbedConfig, placement: Placement) -> list[type]:
    """The plan's tower actor classes, in order: on CPUs one actor holds both towers (see
    TowersEmbedder); on GPUs each tower is an actor."""
    if not placement.on_gpu and len(config.towers) == 2:
        return [TowersEmbedder]
    return [{"image": ImageEmbedder, "text": TextEmbedder}[t] for t in TOWERS if t in config.towers]


WATCH_SIGNAL = signal.SIGUSR1


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # what stops Ray Data's execution and unwinds the run cleanly


class TowerStartWatch:
    """Around the run of a plan from embed_dataset (in the main thread): fails it with a
    ConfigError when some stage of its tower actors has none started ACTOR_START_TIMEOUT_S after
    the run began.

    Ray Data starts the actors without holding the plan back (see configure_ray_data), and
    would wait for ever for an actor no node can place. The actors tell the job's RowCounter
    when their model is loaded; this thread asks it every few seconds and, past the timeout,
    interrupts the main thread, which the watch turns into the error.

    The interruption comes through a handler of its own (WATCH_SIGNAL, simulated in-process,
    never sent), not SIGINT's: a job started in the background by a shell (`altclip embed ...
    &`) has SIGINT ignored, and Python then drops a simulated SIGINT, which left such a job
    waiting for ever.
    """

    def __init__(self, counter, config: EmbedConfig, placement: Placement):
        self.counter, self.placement = counter, placement
        self.stages = [actor.stage for actor in tower_actors(config, placement)]
        self.timeout_s = ACTOR_START_TIMEOUT_S
        self.expired = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        # Actors started for an earlier plan of the same job (reembed runs one per tower) do
        # not count.
        self.before = ray.get(self.counter.towers_started.remote())
        self.watching = threading.current_thread() is threading.main_thread()
        if self.watching:
            # None: a handler not set from Python; the default is what is left after.
            self.previous_handler = signal.signal(WATCH_SIGNAL, _interrupt) or signal.SIG_DFL
            self.thread.start()
        return self

    def _run(self):
        deadline = time.monotonic() + self.timeout_s
        while not self.done.wait(min(5.0, self.timeout_s / 4)):
            started = ray.get(self.counter.towers_started.remote())
            if all(started.get(s, 0) > self.before.get(s, 0) for s in self.stages):
                return
            if time.monotonic() > deadline:
                self.expired = True
                _thread.interrupt_main(WATCH_SIGNAL)
                return

    def __exit__(self, exc_type, exc, tb):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.watching:
            signal.signal(WATCH_SIGNAL, self.previous_handler)
        if self.expired and exc_type is KeyboardInterrupt:
            raise ConfigError(
                f"no tower actor started in {self.timeout_s:g} s (each asks {self.placement.num_gpus:g} "
                f"GPUs and {self.placement.num_cpus:g} CPUs, {self.placement.concurrency} at once): "
                f"check {named('num_gpus')}, {named('concurrency')} and the cluster's free resources"
            ) from None
        return False

