"""`altclip serve DB`: a search page and a JSON API (OpenAPI at /openapi.json) over a table."""

from __future__ import annotations

import signal
import sys

import click

from jobs.options import CONTEXT, parse_storage_options, storage_option, table_name
from pipeline.config import ConfigError
from schemas.table import DEFAULT_TABLE_NAME


def run_serve(db: str, host: str = "127.0.0.1", port: int = 8000,
              table_name: str = DEFAULT_TABLE_NAME, model: str | None = None,
              storage_options: dict | None = None, allow_private_urls: bool = False,
              quiet: bool = False) -> None:
    """Load the table's model, then serve until interrupted."""
    from pipeline.serve_app import Searcher, make_server
    from pipeline.serve_http import listen

    try:  # listen first: a port in use fails at once, not after the model has loaded
        sock = listen(host, port)
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there "
                          f"({exc.strerror or exc})") from None
    try:
        searcher = Searcher(db, table_name, model=model, storage_options=storage_options,
                            allow_private_urls=allow_private_urls)
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
@click.option("--quiet", is_flag=True, help="Do not log each request.")
@storage_option
def serve_command(db, host, port, table_name, model, allow_private_urls, quiet, storage_options):
    """Serve a search page and a JSON API over a table in DB.

    Text queries in any language, image uploads, metadata filters, thumbnails."""
    try:
        run_serve(db, host, port, table_name, model, parse_storage_options(storage_options),
                  allow_private_urls, quiet)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    sys.exit(serve_command())
