"""`altclip serve DB`: a search page and a JSON API (OpenAPI at /openapi.json) over a table, in
this process, or with `--ray` as a Ray Serve app whose replicas autoscale on a cluster."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from jobs.options import CONTEXT, parse_storage_options, run_job, storage_option, table_name
from pipeline.config import ConfigError
from schemas.table import DEFAULT_TABLE_NAME


def run_serve(db: str, host: str = "127.0.0.1", port: int = 8000,
              table_name: str = DEFAULT_TABLE_NAME, model: str | None = None,
              storage_options: dict | None = None, allow_private_urls: bool = False,
              quiet: bool = False, show_uris: bool = False) -> None:
    """Load the table's model, then serve until interrupted."""
    from pipeline.serve.app import Searcher, make_server
    from pipeline.serve.server import listen

    try:  # listen first: a port in use fails at once, not after the model has loaded
        sock = listen(host, port)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                          f"({exc.strerror or exc})") from None
    try:
        searcher = Searcher(db, table_name, model=model, storage_options=storage_options,
                            allow_private_urls=allow_private_urls, show_uris=show_uris)
    except BaseException:
        sock.close()
        raise
    # Connections made while the model loaded wait in the socket's backlog until now.
    server = make_server(searcher, host, port, quiet=quiet, sock=sock)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    print(f"serving table '{table_name}' ({searcher.model.label}, {searcher.dtype}) on "
          f"http://{shown}:{bound_port}/  (API spec: /openapi.json; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    # SIGTERM (what Kubernetes, systemd and `kill` send) stops it as Ctrl-C does: uvicorn
    # finishes the requests in flight, then raises the signal again for this handler.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_serve_ray(options, host: str = "127.0.0.1", port: int = 8000,
                  address: str | None = None) -> None:
    """Run the app (pipeline.serve.on_ray.ServeOptions) on Ray Serve, joining the cluster at
    `address` (or RAY_ADDRESS) or starting Ray here; then wait until interrupted, or until the
    app is deleted from the cluster."""
    import ray

    from pipeline import storage
    from pipeline.run.stages import ensure_ray
    from pipeline.serve import on_ray as serve_ray
    from pipeline.serve.server import listen
    from pipeline.table.store import open_table

    local = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    if local:  # the proxy will listen here: a port in use fails now, before Ray starts
        try:
            listen(host, port).close()
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                              f"({exc.strerror or exc})") from None
    if local:  # the proxy this Ray starts frames requests as the single-process server does
        os.environ.setdefault(serve_ray.PROXY_CALLBACK_VARIABLE, serve_ray.PROXY_CALLBACK)
    ensure_ray(address)
    # No database, no table: said now, not by each replica as it fails to start. (After Ray
    # starts: LanceDB's runtime in this process would be copied into the processes Ray forks.)
    open_table(options.db, options.table, options.storage_options)
    num_gpus = serve_ray.replica_gpus(options.num_gpus)
    if local and num_gpus and not ray.cluster_resources().get("GPU"):
        # Nothing would ever add a GPU to a Ray started here: the replicas would wait forever.
        raise ConfigError(f"--num-gpus {num_gpus:g}: this machine has no GPU; leave it out to "
                          "run on CPUs")
    starts_serve = not serve_ray.serve_running()
    try:
        stats = serve_ray.deploy(options, host, port)
        shown = f"[{host}]" if ":" in host else host
        where = (f"on http://{shown}:{port}/" if starts_serve else
                 "on the address of the Serve already running there (--host and --port apply "
                 "where this command starts Serve)")
        print(f"serving table '{options.table}' ({storage.redact(stats['model'])}, "
              f"{stats['dtype']}) {where}  (API spec: /openapi.json; Ctrl-C stops)", file=sys.stderr)
        low, high = options.replica_range()
        print(f"Ray Serve app '{serve_ray.APP_NAME}', replicas: "
              f"{low if low == high else f'{low} to {high}'}, {options.num_cpus:g} CPUs and "
              f"{num_gpus:g} GPUs each, on {stats['device']} (`serve status` lists them)",
              file=sys.stderr, flush=True)
        if threading.current_thread() is threading.main_thread():  # where signals are handled
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # stops as Ctrl-C does
        serve_ray.wait_while_deployed()
    except KeyboardInterrupt:
        pass
    finally:  # also after a failed or interrupted start: no app left behind on a cluster
        serve_ray.stop(shutdown_serve=starts_serve)


RAY_ONLY = ("address", "replicas", "num_gpus", "num_cpus", "batch_size", "batch_wait_ms")


@click.command("serve", context_settings=CONTEXT)
@click.argument("db")
@click.option("--host", default="127.0.0.1",
              help="Address to listen on (0.0.0.0: every interface; the API has no authentication).")
@click.option("--port", default=8000, type=int, help="Port to listen on.")
@table_name
@click.option("--model", default=None, show_default="the one the table was built with",
              help="Query model.")
@click.option("--allow-private-urls", is_flag=True,
              help="Let thumbnails of http(s) image URLs reach loopback and private addresses.")
@click.option("--show-uris", is_flag=True,
              help="Show where images and the model are stored (URIs, local paths; credentials "
                   "redacted) in the API and the page; without it a hit's image is its path on "
                   "this server and the model is named by its folder's name.")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
@storage_option
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve with Ray Serve: replicas on a Ray cluster, autoscaling, text queries "
                   "batched across requests (the options below apply with it).")
@click.option("--address", default=None, show_default="RAY_ADDRESS, else a Ray started here",
              help="Ray cluster address.")
@click.option("--replicas", default="1,2", metavar="N|MIN,MAX",
              help="Replicas, or the range they autoscale in with the load.")
@click.option("--num-gpus", default=None, type=click.FloatRange(min=0),
              show_default="1 when the cluster has GPUs, else 0", help="GPUs per replica.")
@click.option("--num-cpus", default=1.0, type=click.FloatRange(min=0, min_open=True),
              help="CPUs per replica.")
# The defaults are pipeline.serve.on_ray's MAX_BATCH_SIZE and BATCH_WAIT_MS, written out: that module
# imports Ray Serve, which no other command needs at start-up.
@click.option("--batch-size", default=None, type=click.IntRange(min=1), show_default="16",
              help="Text queries embedded together, one forward pass for concurrent requests.")
@click.option("--batch-wait-ms", default=None, type=click.FloatRange(min=0), show_default="10",
              help="How long a text query waits for others to join its batch.")
@click.pass_context
def serve_command(ctx, db, host, port, table_name, model, allow_private_urls, show_uris, quiet,
                  storage_options, use_ray, address, replicas, num_gpus, num_cpus, batch_size,
                  batch_wait_ms):
    """Serve a search page and a JSON API over a table in DB.

    Text queries in any language, image uploads, metadata filters, thumbnails. With --ray, the
    same app on a Ray cluster (Ray Serve): replicas autoscale, each on a GPU when there are GPUs."""
    given = [name for name in RAY_ONLY
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given and not use_ray:
        raise click.UsageError(f"--{given[0].replace('_', '-')} applies with --ray only")

    def start() -> None:
        if use_ray:
            from pipeline.serve.on_ray import parse_options
            from pipeline.serve.server import LOOPBACK_NAMES, is_loopback

            # As the single-process server: served on loopback, only requests sent to loopback.
            allowed = ",".join(sorted(LOOPBACK_NAMES | {host})) if is_loopback(host) else None
            args = {"db": db, "table": table_name, "model": model, "replicas": replicas,
                    "num_gpus": num_gpus, "num_cpus": num_cpus, "batch_size": batch_size,
                    "batch_wait_ms": batch_wait_ms, "allowed_hosts": allowed,
                    "allow_private_urls": allow_private_urls, "show_uris": show_uris,
                    "access_log": not quiet,
                    "storage_options": parse_storage_options(storage_options)}
            run_serve_ray(parse_options({k: v for k, v in args.items() if v is not None}),
                          host, port, address)
        else:
            run_serve(db, host, port, table_name, model, parse_storage_options(storage_options),
                      allow_private_urls, quiet, show_uris)

    # Bad configuration exits 1 with its message, an unreachable store 75 (as every job).
    run_job(start)


if __name__ == "__main__":
    sys.exit(serve_command())
