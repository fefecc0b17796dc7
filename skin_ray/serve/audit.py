"""The audit trail: one JSON line per image answered or refused, written off the request path.

Requests append lines to a buffer; a thread writes the buffer every `flush_s` seconds, so a crash loses at most
the lines of the last `flush_s`, and a graceful stop (`close`) writes what is left. A local destination gets
files rotated by size or age; an S3 prefix one object per flush (S3 has no append). File names hold the replica,
the time and a sequence number, so replicas and restarts never write the same file.
"""

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from skin_ray import storage
from skin_ray.record import RECORD_FIELDS
from skin_ray.serve import telemetry
from skin_ray.serve.errors import Refusal

logger = logging.getLogger(__name__)


class AuditLog:
    """Where the service's audit lines go; `healthy` is false from a failed write until the next one succeeds,
    and `dropped` counts the lines lost to failed writes."""

    def __init__(
        self, destination: str, flush_s: float, rotate_bytes: int, rotate_s: float, on_dropped=lambda count: None
    ):
        self.destination, self.flush_s, self.rotate_bytes, self.rotate_s = destination, flush_s, rotate_bytes, rotate_s
        self.on_dropped = on_dropped
        self.healthy, self.dropped = True, 0
        self._writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this process, unique among replicas and restarts
        self._sequence = 0
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._file: Path | None = None
        self._file_opened = 0.0
        self._writer_thread = telemetry.Periodic(flush_s, self.flush, "skin-ray-audit")

    def record(self, line: dict) -> None:
        """Queue one audit line (written within `flush_s`)."""
        text = json.dumps(line, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._lines.append(text)

    def close(self) -> None:
        """Stop the writer and write what is still queued."""
        self._writer_thread.stop()
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self._write("".join(line + "\n" for line in lines))
        except Exception as exc:  # the service goes on answering; what was lost is counted
            self.healthy, self._file = False, None  # the next write starts a new file
            self.dropped += len(lines)
            self.on_dropped(len(lines))
            logger.error("audit trail: %d lines could not be written to %s: %r", len(lines), self.destination, exc)
        else:
            self.healthy = True

    def _write(self, text: str) -> None:
        if storage.is_s3(self.destination):
            storage.write_bytes(storage.join(self.destination, self._next_name()), text.encode())
            return
        now = time.monotonic()
        if (self._file is None or now - self._file_opened >= self.rotate_s
                or self._file.stat().st_size >= self.rotate_bytes):
            Path(self.destination).mkdir(parents=True, exist_ok=True)
            self._file, self._file_opened = Path(self.destination) / self._next_name(), now
        with self._file.open("a") as file:
            file.write(text)

    def _next_name(self) -> str:
        self._sequence += 1
        return f"audit-{datetime.now(UTC):%Y%m%dT%H%M%S}-{self._writer}-{self._sequence:06d}.jsonl"


class ImageExchange:
    """One image's way through a route: what is known of it (`served`, its version; `data`, its bytes) as it
    becomes known, then its answer (`answered`: counted, audited, added to its version's drift window) or its
    refusal (audited). A Refusal, or any failure, raised inside `with` is audited with what was known, and goes
    on to its handler."""

    def __init__(self, audit: AuditLog | None, scope: dict, route: str):
        self.audit, self.scope, self.route = audit, scope, route
        self.started = time.monotonic()
        self.served, self.data = None, None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is not None:
            self.refused(exc if isinstance(exc, Refusal) else Refusal(503, f"internal failure ({type(exc).__name__})"))
        return False

    def refused(self, refusal: Refusal) -> None:
        self._audit(refusal.status, None, None, refusal.detail)

    def answered(self, record: dict, image: dict[str, float]) -> None:
        """`record` was the answer for an image of `image_statistics` `image`."""
        name = self.served.name
        telemetry.predictions().inc(tags={
            "version": name, "label": record["label"] or "withheld", "uncertain": str(bool(record["uncertain"])).lower(),
        })
        telemetry.request_latency().observe(self._elapsed_ms(), tags={"route": self.route, "version": name})
        if self.served.drift is not None:
            self.served.drift.observe(record, image)
        self._audit(200, record, image, None)

    def _elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000

    def _audit(self, status: int, record: dict | None, image: dict | None, reason: str | None) -> None:
        if self.audit is None:
            return
        state = self.scope.get("state", {})
        self.audit.record({
            "time": audit_time(), "request_id": state.get("request_id"), "caller": state.get("caller"),
            "route": self.route,
            "input_sha256": None if self.data is None else hashlib.sha256(self.data).hexdigest(),
            "input_bytes": None if self.data is None else len(self.data),
            "version": None if self.served is None else self.served.name,
            **{field: (record or {}).get(field) for field in RECORD_FIELDS}, "image": image or None,
            "status": status, "reason": reason, "latency_ms": round(self._elapsed_ms(), 1),
        })


def audit_time() -> str:
    """Now, as the audit line's `time`: UTC, ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
