"""`ray job submit` of the embed job to a `ray start --head` cluster this test owns."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import read_output
from tests.corpus import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def head():
    """A head node with its own temp dir, ports and token; afterwards exactly its processes are
    stopped (`ray stop` would stop every Ray on the machine, the test session's included)."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                # the job's `python` is this environment's, as on a cluster built from the image
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    # A session of its own: every process `ray start` leaves behind stays in its process group.
    starter = subprocess.Popen(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(_free_port()),
         # Every fixed default port too: another Ray on this machine (the test session's) holds
         # them, and a job agent without its port leaves the head with "No available agent".
         "--dashboard-agent-listen-port", str(_free_port()),
         "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--num-cpus", "2", "--num-gpus", "0",
         "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        output, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, output[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        try:
            os.killpg(starter.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _submit(address: str, env: dict, argv: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", REPO,
                                 "--", *argv], capture_output=True, text=True, env=env, timeout=300)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def test_ray_job_submit_runs_the_embed_job(head, tiny_model, tmp_path):
    address, env = head
    manifest = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    started = time.monotonic()
    result = _submit(address, env, ["python", "-m", "jobs.embed", manifest, "--out", str(out),
                                    "--model", tiny_model, "--dtype", "float32"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in (result.stdout + result.stderr)
    assert len(read_output(out)) == 15
    assert time.monotonic() - started < 300
