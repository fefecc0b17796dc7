"""Driver for tests/test_cluster.py: the three jobs on a real 2-node Ray started with ray.cluster_utils.Cluster.

Runs as its own process (the test session already holds a Ray connection); all remote code comes from the
installed skin_ray package. Prints one JSON line: which nodes the training workers, classifier actors and
Serve replicas ran on, and the answers the service gave.

    python tests/multinode_driver.py DATA_TREE BUNDLE SCRATCH
"""

from __future__ import annotations

import asyncio
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

from skin_ray.testing import free_port, steady_load


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
    from skin_ray.serve import app_builder
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
        batch_size=16, placement_strategy="SPREAD", input_size=96,  # small inputs: the test is about placement
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
    # The cluster layout (decoding and the model apart), each deployment following the load between 1 and 2 replicas.
    settings = ServeSettings(
        bundle=bundle, layout="split", min_replicas=1, max_replicas=2, target_ongoing_requests=2,
        upscale_delay_s=1, downscale_delay_s=3, autoscaling_window_s=5,
    )
    serve.run(app_builder(settings), name="skin-ray")
    image = next(Path(data).rglob("*.jpg")).read_bytes()
    answers: list = []
    loaded = threading.Event()
    load = threading.Thread(target=lambda: asyncio.run(
        steady_load(f"http://127.0.0.1:{port}", image, 12, loaded.is_set, answers)
    ))
    load.start()
    replicas = {"Ingress": [], "SkinModel": []}  # (seconds since the load began, running replicas)
    started = time.monotonic()

    def count_replicas() -> dict[str, int]:
        deployments = serve.status().applications["skin-ray"].deployments
        running = {name: deployments[name].replica_states.get("RUNNING", 0) for name in replicas}
        for name, count in running.items():
            replicas[name].append((round(time.monotonic() - started, 1), count))
        return running

    while min(count_replicas().values()) < 2 and time.monotonic() < started + 120:  # grow under the load
        time.sleep(1)
    report["model_replica_nodes"] = sorted(nodes_of("SkinModel", address))
    report["ingress_replica_nodes"] = sorted(nodes_of("Ingress", address))
    time.sleep(3)  # both replicas answering
    loaded.set()
    load.join()
    while max(count_replicas().values()) > 1 and time.monotonic() < started + 300:  # shrink back after it
        httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=60)
        answers.append((time.monotonic(), 200, None))
        time.sleep(1)
    report["replicas"] = replicas
    report["serve_status_codes"] = sorted({str(status) for _, status, _ in answers})
    report["serve_requests"] = len(answers)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
