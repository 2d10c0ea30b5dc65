"""Run the embed job on a three-node Ray cluster on this machine (a head without GPUs, a node
that advertises a GPU, a CPU node); print the summary and the node ids as JSON.

Run by tests/test_cluster.py in a process of its own: a cluster cannot share a process with
the test session's Ray.
"""

import json
import sys
import time

import ray
from ray.cluster_utils import Cluster

from jobs.embed import run_embed
from pipeline.config import EmbedConfig


def main(manifest: str, out: str, model: str) -> None:
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    cpu_node = cluster.add_node(num_cpus=2, num_gpus=0)
    cluster.wait_for_nodes()
    startup_s = time.monotonic() - started
    nodes = {"head": cluster.head_node.node_id, "gpu": gpu_node.node_id, "cpu": cpu_node.node_id}
    try:
        # Batches of 4: four decode tasks for the corpus's 15 rows, so that spreading them over
        # the nodes does not hang on where two tasks happened to land.
        summary = run_embed(EmbedConfig(manifest=manifest, out=out, model=model, dtype="float32",
                                        batch_size=4, address=cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({
        "summary": summary,
        "nodes": nodes,
        "startup_s": round(startup_s, 2),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
