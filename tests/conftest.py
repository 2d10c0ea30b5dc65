"""Shared fixtures: one tiny AltCLIP and one Ray session for the whole test run."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import time
import uuid

import pyarrow.dataset as pads
import pytest
import ray
from click.testing import CliRunner

from jobs.cli import main
from pipeline.decode.images import CRASH_TEST_VARIABLE
from tests.corpus import crash_image, write_corpus

SECRET_ACCESS_KEY = "SECRET-do-not-print-7f3a9c"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; AWS_* set before Ray starts so its workers inherit them."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
                       "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_REGION": "us-east-1"})
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


@pytest.fixture(scope="session")
def ray_session(s3_server, tmp_path_factory):
    # Set before Ray starts, so that workers copy models into the same per-test-run cache, and
    # their decoding processes crash on the one image tests plant for it.
    os.environ["ALTCLIP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ[CRASH_TEST_VARIABLE] = hashlib.sha256(crash_image()).hexdigest()
    # The session's Ray processes carry a mark of their own (see RUN_MARK): the value is the
    # fixture's, for tests that look for what runs in it.
    os.environ[RUN_MARK] = mark = uuid.uuid4().hex
    ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield mark
    ray.shutdown()


def altclip(*args: str, expect_exit: int | None = 0):
    """Run the `altclip` command in-process, as a user would type it."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect_exit is not None:
        assert result.exit_code == expect_exit, (
            f"altclip {' '.join(map(str, args))} exited {result.exit_code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


# A command run in a subprocess carries this variable with a value of its own; every process it
# starts inherits it (Ray's GCS, raylet and workers included), so what is left of the command
# after it exits is found by it, whatever its parent is by then.
RUN_MARK = "ALTCLIP_TEST_RUN_MARK"


def marked_environment(**changes: str) -> tuple[dict, str]:
    """An environment for a command in a subprocess, and the mark of its processes."""
    mark = uuid.uuid4().hex
    return {**os.environ, **changes, RUN_MARK: mark}, mark


def marked_processes(mark: str) -> list[str]:
    """The command lines of live processes carrying `mark` (see RUN_MARK)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{RUN_MARK}={mark}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:  # it ended, or is not ours to read
            continue
    return [c for c in found if c]  # a zombie has no command line: nothing of it is left


def processes_left(mark: str, wait_s: float = 30.0) -> list[str]:
    """What is left of a command that exited: processes carrying its mark once `wait_s` has
    passed (a shutdown takes its processes down within seconds, not at once)."""
    deadline = time.monotonic() + wait_s
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="session")
def standard_run(tiny_model, ray_session, tmp_path_factory):
    """The standard corpus embedded by the tiny model (towers in float32), once for the test run:
    FOLDER/manifest.parquet, FOLDER/images, FOLDER/out, and the table in FOLDER/db. Tests take
    copies of it (embedded_corpus)."""
    folder = tmp_path_factory.mktemp("standard")
    altclip("embed", write_corpus(folder), "--out", folder / "out", "--model", tiny_model, "--db",
            folder / "db", "--dtype", "float32")
    return folder


def embedded_corpus(standard_run, tmp_path_factory, name: str):
    """A new folder holding a copy of the standard run (see standard_run), for a module to change
    as it likes. Its outputs and table name the standard run's images, which stay where they are."""
    folder = tmp_path_factory.mktemp(name)
    shutil.copytree(standard_run, folder, dirs_exist_ok=True, symlinks=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    altclip("make-test-model", folder)
    return str(folder)


def read_output(out) -> dict[str, dict]:
    """Rows of an embed output by id (asserting ids are unique)."""
    shards = sorted(str(p) for p in __import__("pathlib").Path(out).glob("part-*.parquet"))
    rows = pads.dataset(shards, format="parquet").to_table().to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an id appears twice in the output"
    return by_id


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_jobs():
    # A suite a shell started in the background (`pytest &`) has SIGINT ignored, and so would
    # every job it starts: the tests that press Ctrl-C on a job would see it run to the end.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch):
    # Nothing in the tests may reach a model hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield




# Fixtures that only tests of whole jobs, Ray stages, servers or object storage ask for: a test
# that uses one is `slow` (seconds to minutes), and `pytest -m "not slow"` leaves it out.
SLOW_FIXTURES = frozenset({"ray_session", "tiny_model", "s3_server"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
