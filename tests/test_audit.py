"""The audit trail's writer, without Ray: lines reach a local folder or an S3 prefix within the flush interval,
a stop writes the rest, a failing sink is counted and recovers. (Through the service: test_serve.py.)"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from skin_ray import storage
from skin_ray.serve.audit import AuditLog


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("audit-*.jsonl")) for line in path.read_text().splitlines()]


def _wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_lines_are_written_within_the_flush_interval_and_a_stop_writes_the_rest(tmp_path):
    audit = AuditLog(str(tmp_path / "audit"), flush_s=0.1, rotate_bytes=2**20, rotate_s=3600)
    for i in range(5):
        audit.record({"i": i})
    _wait_for(lambda: len(_lines(tmp_path / "audit")) == 5)
    assert [line["i"] for line in _lines(tmp_path / "audit")] == list(range(5))  # without a stop: the flush did it
    slow = AuditLog(str(tmp_path / "slow"), flush_s=3600, rotate_bytes=2**20, rotate_s=3600)
    slow.record({"i": 0})
    slow.close()  # a graceful stop
    assert _lines(tmp_path / "slow") == [{"i": 0}]


def test_files_rotate_by_size(tmp_path):
    audit = AuditLog(str(tmp_path), flush_s=3600, rotate_bytes=100, rotate_s=3600)
    for i in range(6):
        audit.record({"line": i, "padding": "x" * 40})
        audit.flush()
    audit.close()
    files = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(files) == 3 and [line["line"] for line in _lines(tmp_path)] == list(range(6))


def test_a_failing_sink_is_counted_and_the_writer_recovers(tmp_path):
    folder = tmp_path / "audit"
    dropped = []
    audit = AuditLog(str(folder), flush_s=3600, rotate_bytes=2**20, rotate_s=3600, on_dropped=dropped.append)
    audit.record({"i": 0})
    audit.flush()
    shutil.rmtree(folder)
    folder.write_text("not a folder")  # the destination is gone
    audit.record({"i": 1})
    audit.record({"i": 2})
    audit.flush()
    assert (audit.healthy, audit.dropped, dropped) == (False, 2, [2])
    folder.unlink()
    audit.record({"i": 3})
    audit.flush()
    assert audit.healthy and _lines(folder) == [{"i": 3}]


def test_an_s3_prefix_gets_an_object_per_write(s3_endpoint, bucket):
    prefix = f"s3://{bucket}/audit"
    audit = AuditLog(prefix, flush_s=3600, rotate_bytes=2**20, rotate_s=3600)
    for i in range(3):
        audit.record({"i": i})
        audit.flush()
    audit.close()
    objects = storage.list_files(prefix)
    assert len(objects) == 3
    assert [json.loads(storage.read_bytes(uri)) for uri in objects] == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_line_that_is_not_json_is_refused_when_recorded(tmp_path, value):
    audit = AuditLog(str(tmp_path), flush_s=3600, rotate_bytes=2**20, rotate_s=3600)
    with pytest.raises(ValueError):
        audit.record({"value": value})
    audit.close()
