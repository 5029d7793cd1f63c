"""Run a tiny grid study on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster) and print JSON.

Used by tests/test_tune.py in a subprocess, so that this cluster never meets the test session's Ray.
Head: 1 CPU, no GPU. Two workers: 2 CPUs and one (declared) GPU each. Trials ask 0.5 GPU, so at most
four run at once, two per worker.
    python tests/cluster_study.py STORAGE CACHE_DIR
"""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from studies import grid_study, run  # tests/ is the script's folder, so Python finds it


def main(storage: str, cache: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        values = grid_study(storage, cache, name="cluster", epochs=2)
        values["search"]["params"]["noise_rate"] = {"grid": [0.5]}  # 2 variants x 2 seeds = 4 trials
        values["resources"] = {"cpu": 1, "gpu": 0.5}
        values["max_concurrent"] = 0
        results, path, stats = run(values, address=cluster.address)
        out = {
            "worker_nodes": sorted(w.node_id[:12] for w in workers),
            "trial_nodes": sorted({r.metrics["node_id"] for r in results}),
            "trials": len(results), "errors": sum(r.error is not None for r in results),
            "computed": sum(s.get("computed", 0) for s in stats.values()),
            "hits": sum(s.get("hits", 0) for s in stats.values()),
            "banks": len(stats),
        }
        print("RESULT " + json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
