"""Connecting to Ray and sizing TensorFlow's thread pools, the same way for every job."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)

# Enough logical CPUs on a small machine that training workers, Ray Data tasks and Serve replicas can all be
# scheduled at once; they share the physical cores, and TensorFlow's pools are capped to match.
MIN_LOCAL_CPUS = 8

# Ray Serve's fast path (Ray 2.55+): HAProxy forwards requests straight to the ingress replicas' own HTTP
# servers instead of through a Python proxy actor (measured here: the proxy spent ~4 ms of CPU per request,
# HAProxy 0.15 ms), and replicas talk gRPC. Ray's processes read these at start, so they are set before a
# local Ray starts; a cluster sets them in its pods (cluster/rayservice.yaml).
SERVE_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # An ingress replica that stops stays up this long so load balancers can drop it (30 s by default);
    # the only balancer of a local Ray is its HAProxy, which learns at once.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_serve_fast_path() -> None:
    """Put SERVE_ENVIRONMENT in this process's environment (what is set already wins), for a Ray it starts."""
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the running cluster (RAY_ADDRESS, `ray start`, `ray job submit`) or start a local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_serve_fast_path()
    try:
        ray.init(address="auto", log_to_driver=True)
        logger.info("connected to the running Ray cluster")
    except ConnectionError:
        ray.init(num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1))


class InsufficientResourcesError(RuntimeError):
    pass


def wait_for_resources(bundles: list[dict], strategy: str, timeout_s: float, purpose: str, remedy: str) -> None:
    """Reserve `bundles` once (a placement group) and release them, or raise InsufficientResourcesError.

    Ray waits for resources forever by design (an autoscaler may add nodes); a job that cannot start should
    instead say so, naming what it needs and what is free.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    probe = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([probe.ready()], timeout=timeout_s)
    remove_placement_group(probe)
    if not ready:
        raise InsufficientResourcesError(
            f"{purpose}, but after {timeout_s:.0f}s only {ray.available_resources().get('CPU', 0):g} of "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs are free. {remedy}"
        )


def limit_tensorflow_threads(intra_op: int | None = None) -> None:
    """Cap TensorFlow's pools before it starts: several TF processes share this node's cores.

    Must run before the first TensorFlow op in the process; later calls are ignored.
    """
    import tensorflow as tf

    intra_op = intra_op or int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)) or (os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        # Two inter-op threads: collective ops of MultiWorkerMirroredStrategy wait on one while the other computes.
        tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("TF_NUM_INTEROP_THREADS", 0)) or 2)
    except RuntimeError:
        logger.debug("TensorFlow already initialised; thread pools unchanged")
