"""Driver for tests/test_cluster.py: the three jobs on a real 2-node Ray started with ray.cluster_utils.Cluster.

Runs as its own process (the test session already holds a Ray connection); all remote code comes from the
installed skin_ray package. Prints one JSON line: which nodes the training workers, classifier actors and
Serve replicas ran on, and the answers the service gave.

    python tests/multinode_driver.py DATA_TREE BUNDLE SCRATCH
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from skin_ray.testing import free_port


def nodes_of(class_fragment: str, address: str) -> set[str]:
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in alive if class_fragment in a.class_name}


def watch(job, class_fragment: str, address: str) -> set[str]:
    """Run `job` in a thread; collect the nodes of its actors while it runs."""
    seen: set[str] = set()
    errors: list[BaseException] = []

    def run():
        try:
            job()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        seen |= nodes_of(class_fragment, address)
        time.sleep(0.5)
    if errors:
        raise errors[0]
    return seen


def main(data: str, bundle: str, scratch: str) -> None:
    from skin_ray.classify import classify
    from skin_ray.config import ClassifySettings, ServeSettings, TrainSettings
    from skin_ray.serve import Ingress, SkinModel
    from skin_ray.train import train

    cluster = Cluster(
        initialize_head=True,
        # Free ports: the test session's own Ray already holds the default dashboard and agent ports.
        head_node_args={
            "num_cpus": 4, "include_dashboard": True, "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    address = ray.get_runtime_context().gcs_address
    report: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}

    config = TrainSettings(
        data=data, output=f"{scratch}/bundle", storage_path=f"{scratch}/runs", workers=2, epochs=1,
        batch_size=16, placement_strategy="SPREAD",
    )
    report["train_nodes"] = sorted(watch(lambda: train(config), "RayTrainWorker", address))

    classify_config = ClassifySettings(source=data, output=f"{scratch}/classified", bundle=bundle, workers=2, batch_size=8)
    outcome: dict = {}
    report["classify_nodes"] = sorted(
        watch(lambda: outcome.update(classify(classify_config)), "Classifier", address)
    )
    report["classify_rows"], report["classify_files"] = outcome["rows"], outcome["files"]

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(bundle=bundle, layout="split")  # the cluster layout: decoding and the model apart
    model = SkinModel.options(num_replicas=2).bind(settings.bundle)
    serve.run(Ingress.options(num_replicas=2).bind(settings, model), name="skin-ray")
    image = next(Path(data).rglob("*.jpg")).read_bytes()
    report["serve_status_codes"] = [
        httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=60).status_code
        for _ in range(8)
    ]
    report["model_replica_nodes"] = sorted(nodes_of("SkinModel", address))
    report["ingress_replica_nodes"] = sorted(nodes_of("Ingress", address))
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
