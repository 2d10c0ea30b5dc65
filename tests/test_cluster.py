"""The embed job on real multi-node Ray clusters on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import altclip, read_output
from tests.corpus import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_towers_run_where_the_gpus_are(tiny_model, ray_session, tmp_path):
    manifest = write_corpus(tmp_path / "corpus")
    altclip("embed", manifest, "--out", tmp_path / "single", "--model", tiny_model, "--dtype", "float32")

    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "tests.multinode_job", manifest, str(tmp_path / "multi"), tiny_model],
        capture_output=True, text=True, timeout=170, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    nodes, placed = report["nodes"], report["summary"]["stage_nodes"]
    # The towers asked for GPUs: they ran on the node that has them (on its CPU, as torch sees
    # no CUDA there), never on the head.
    assert placed["image_tower"] == [nodes["gpu"]] and placed["text_tower"] == [nodes["gpu"]]
    # Decoding is CPU work: it spread over more than one node.
    assert len(placed["decode"]) > 1, placed

    single, multi = read_output(tmp_path / "single"), read_output(tmp_path / "multi")
    assert set(single) == set(multi)
    for row_id, row in single.items():
        for column in ("image_embedding", "text_embedding"):
            np.testing.assert_allclose(multi[row_id][column], row[column], atol=1e-6)
