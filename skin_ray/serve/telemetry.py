"""The service's own Prometheus series (exported by Ray as ray_skin_ray_*), each defined once per process: a
node's metrics agent keeps the first definition of a name it sees, so every replica defines it alike."""

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterable
from functools import cache

import ray
from ray.serve import metrics

from skin_ray.drift import RATES, DriftWindow

logger = logging.getLogger(__name__)

EXACT_BATCH_SIZES = 64  # the batch-size histogram's sum is exact up to this many images per batch
LATENCY_MS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
PROBABILITY_DIFFERENCES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@cache
def batch_sizes() -> metrics.Histogram:
    # A bucket per size, edges between the integers: Ray exports a histogram's sum as count x bucket midpoint,
    # which is then exact (with edges at 1, 2, 4, ... six batches of one summed to 3).
    return metrics.Histogram(
        "skin_ray_batch_size", description="images per forward pass, by version",
        boundaries=[size + 0.5 for size in range(EXACT_BATCH_SIZES + 1)], tag_keys=("version",),
    )


@cache
def predictions() -> metrics.Counter:
    return metrics.Counter(
        "skin_ray_predictions",
        description="answers by version, label (withheld: refused by the input gate) and uncertainty",
        tag_keys=("version", "label", "uncertain"),
    )


@cache
def decode_errors() -> metrics.Counter:
    return metrics.Counter("skin_ray_decode_errors", description="undecodable uploads by reason", tag_keys=("reason",))


@cache
def request_latency() -> metrics.Histogram:
    return metrics.Histogram(
        "skin_ray_request_latency_ms", description="time from a request's admission to its answer, by route and version",
        boundaries=list(LATENCY_MS), tag_keys=("route", "version"),
    )


@cache
def shadow_comparisons() -> metrics.Counter:
    return metrics.Counter(
        "skin_ray_shadow_comparisons",
        description="shadow answers compared with the answer sent: outcome agree / disagree (label), failed (the "
        "shadow raised) or skipped (no room: a shadow never delays or refuses real requests)",
        tag_keys=("version", "outcome"),
    )


@cache
def shadow_probability_difference() -> metrics.Histogram:
    return metrics.Histogram(
        "skin_ray_shadow_probability_difference",
        description="absolute difference of the shadow's and the answer's Cancer probability",
        boundaries=list(PROBABILITY_DIFFERENCES), tag_keys=("version",),
    )


@cache
def audit_dropped() -> metrics.Counter:
    return metrics.Counter("skin_ray_audit_dropped", description="audit lines that could not be written")


@cache
def drift_gauges() -> dict[str, metrics.Gauge]:
    statistic = ("version", "statistic")
    return {
        "distance": metrics.Gauge(
            "skin_ray_drift_distance", tag_keys=statistic, description="how far the last images answered are from the "
            "bundle's validation split: Kolmogorov-Smirnov D for a statistic, the absolute difference for a rate",
        ),
        "threshold": metrics.Gauge(
            "skin_ray_drift_threshold", tag_keys=statistic,
            description="the distance beyond which a statistic or rate has drifted at the bundle's alpha, for this window's size",
        ),
        "rate": metrics.Gauge(
            "skin_ray_drift_rate", tag_keys=statistic,
            description="the window's refused (of all), uncertain and cancer (of those accepted) rates",
        ),
        "window": metrics.Gauge("skin_ray_drift_window_size", tag_keys=("version",), description="images in the drift window"),
    }


def publish_drift(windows: Iterable[tuple[str, DriftWindow]], published: dict[str, int]) -> None:
    """Set the drift gauges of each (version, window) that changed since `published` (images observed at the
    last publication, by version; updated)."""
    gauges = drift_gauges()
    for version, window in windows:
        if published.get(version) == window.observed:
            continue
        published[version] = window.observed
        for statistic, compared in window.compare().items():
            tags = {"version": version, "statistic": statistic}
            gauges["distance"].set(compared["distance"], tags=tags)
            gauges["threshold"].set(compared["threshold"], tags=tags)
            if statistic in RATES:
                gauges["rate"].set(compared["rate"], tags=tags)
        gauges["window"].set(len(window), tags={"version": version})


class Periodic:
    """Calls `action` every `interval_s` seconds on a daemon thread until `stop`; a failure is logged, not fatal."""

    def __init__(self, interval_s: float, action: Callable[[], None], name: str):
        self.interval_s, self.action = interval_s, action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.action()
            except Exception:
                logger.exception("%s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def node_metrics_url() -> str:
    """Where Ray's metrics agent on this node exports Prometheus text (a port Ray picks at start)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(node for node in ray.nodes() if node["NodeID"] == node_id)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def read_node_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
