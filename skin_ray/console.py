"""What a command prints, the same way for every job: its own lines, warnings and errors, and Ray Data's progress
as one line every 10 s (with rate and time left) when stderr is not a terminal; a line when Ray restarts one of
its actors; TensorFlow's native notices silenced while it is imported."""

from __future__ import annotations

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
