"""Shared fixtures: one tiny AltCLIP and one Ray session for the whole test run."""

from __future__ import annotations

import os

import pyarrow.dataset as pads
import pytest
import ray
from click.testing import CliRunner

from jobs.cli import main


@pytest.fixture(scope="session")
def ray_session():
    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
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


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch):
    # Nothing in the tests may reach a model hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


__all__ = ["altclip", "read_output", "os"]
