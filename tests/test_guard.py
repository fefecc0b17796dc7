"""The request guard and the API keys, without Ray: every framing of a body is bounded, keys and rate limits
hold, a replica without room answers before reading a body. (Over real HTTP: test_serve.py.)"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from skin_ray.api_keys import ApiKeys, KeyFileError, RateLimit, read_key_file
from skin_ray.serve.guard import RequestGuard, RouteCapacity

SECRET, OTHER = "s3cret-for-the-clinic-0001", "another-secret-of-the-lab-02"


class Exchange:
    """One request through the guard to an app that reads the whole body: what was answered, what the app read."""

    def __init__(self, guard: RequestGuard, path="/predict", method="POST", headers=(), chunks=(b"",), arrivals=None):
        self.guard, self.path, self.method, self.headers, self.chunks = guard, path, method, list(headers), list(chunks)
        self.arrivals = arrivals  # an asyncio.Queue of body messages the test puts in as the client sends them
        self.read, self.app_called, self.sent = 0, False, []

    async def app(self, scope, receive, send):
        self.app_called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            self.read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(self) -> tuple[int, dict, dict]:
        chunks = list(self.chunks)

        async def receive():
            if self.arrivals is not None:
                return await self.arrivals.get()
            if not chunks:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(message):
            self.sent.append(message)

        scope = {"type": "http", "method": self.method, "path": self.path, "headers": self.headers}
        await self.guard.middleware(self.app)(scope, receive, send)
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
        return start["status"], headers, json.loads(body) if body != b"ok" else {}


def _guard(**options) -> RequestGuard:
    return RequestGuard(max_bytes=1000, timeout_s=5, max_uploads=16, **options)


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_a_chunked_body_over_the_limit_is_cut_whatever_the_spelling(coding):
    """`Transfer-Encoding: Chunked` skipped the limit (a case-sensitive check): 40 MB were read for a 10 MB limit."""
    exchange = Exchange(_guard(), headers=[(b"transfer-encoding", coding)], chunks=[b"x" * 400] * 10)
    status, _, answer = asyncio.run(exchange.run())
    assert status == 413 and "larger than 1,000 bytes" in answer["detail"]
    assert exchange.read <= 1000  # what the app got before the cut


@pytest.mark.parametrize(
    "headers, reason",
    [
        ([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], "both Content-Length and Transfer-Encoding"),
        ([(b"transfer-encoding", b"gzip, chunked")], "only transfer coding accepted is chunked"),
        ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"identity")], "only transfer coding"),
        ([(b"content-length", b"10"), (b"content-length", b"20")], "Content-Length must be one number"),
        ([(b"content-length", b"-5")], "Content-Length must be one number"),
    ],
)
def test_a_body_framed_two_ways_is_refused_before_it_is_read(headers, reason):
    exchange = Exchange(_guard(), headers=headers, chunks=[b"x" * 10])
    status, answer_headers, answer = asyncio.run(exchange.run())
    assert status == 400 and reason in answer["detail"] and answer_headers["connection"] == "close"
    assert not exchange.app_called


def test_a_declared_length_over_the_limit_is_refused_unread():
    exchange = Exchange(_guard(), headers=[(b"content-length", b"5000")], chunks=[b"x" * 5000])
    status, _, _ = asyncio.run(exchange.run())
    assert status == 413 and not exchange.app_called


def test_a_replica_without_room_answers_503_without_the_app():
    """A small body is read and dropped first, so the connection stays open (closing it with unread bytes resets
    it, and the client can lose the answer); a large one is refused unread and the connection closed."""
    capacity = {("POST", "/predict"): RouteCapacity("the model is overloaded; retry shortly", full=lambda: True)}
    exchange = Exchange(_guard(capacity=capacity), headers=[(b"content-length", b"500")], chunks=[b"x" * 250] * 2)
    status, headers, answer = asyncio.run(exchange.run())
    assert status == 503 and headers["retry-after"] and "overloaded" in answer["detail"]
    assert not exchange.app_called and "connection" not in headers
    large = str(RequestGuard.SMALL_BODY + 1).encode()
    exchange = Exchange(RequestGuard(max_bytes=10**7, timeout_s=5, max_uploads=16, capacity=capacity),
                        headers=[(b"content-length", large)], chunks=[b"x" * 10])
    status, headers, _ = asyncio.run(exchange.run())
    assert status == 503 and headers["connection"] == "close" and not exchange.app_called
    other = Exchange(_guard(capacity=capacity), path="/model", method="GET")
    assert asyncio.run(other.run())[0] == 200


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"# who may call\n\nclinic-a:{SECRET}\n  lab.b : {OTHER}  \n")
    return path


@pytest.mark.parametrize(
    "headers, status",
    [
        ([], 401),
        ([(b"authorization", b"Bearer wrong-secret-wrong-secret")], 401),
        ([(b"authorization", b"Basic " + SECRET.encode())], 401),
        ([(b"authorization", b"Bearer " + SECRET.encode())], 200),
        ([(b"authorization", b"bearer  " + OTHER.encode())], 200),
        ([(b"x-api-key", SECRET.encode())], 200),
    ],
)
def test_keys_are_needed_on_every_route_but_the_open_ones(key_file, headers, status):
    guard = _guard(keys=ApiKeys(str(key_file)))
    answer_status, answer_headers, answer = asyncio.run(Exchange(guard, path="/model", method="GET", headers=headers).run())
    assert answer_status == status
    if status == 401:
        assert answer_headers["www-authenticate"] == "Bearer" and "API key" in answer["detail"]
        assert SECRET not in json.dumps(answer)
    for path in ("/", "/healthz", "/docs", "/openapi.json", "/static-offline-docs/swagger-ui.css"):
        assert asyncio.run(Exchange(guard, path=path, method="GET").run())[0] == 200, path


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(key_file):
    guard = _guard(keys=ApiKeys(str(key_file)), rate_limit=RateLimit(2))
    bearer = [(b"authorization", b"Bearer " + SECRET.encode())]
    statuses = [asyncio.run(Exchange(guard, method="GET", path="/model", headers=bearer).run()) for _ in range(3)]
    assert [status for status, _, _ in statuses] == [200, 200, 429]
    assert statuses[2][1]["retry-after"] == "1" and "'clinic-a' is over its rate limit" in statuses[2][2]["detail"]
    other = [(b"x-api-key", OTHER.encode())]  # each key has its own bucket
    assert asyncio.run(Exchange(guard, method="GET", path="/model", headers=other).run())[0] == 200


def test_a_rate_limit_refills_at_its_rate():
    limit = RateLimit(50)
    assert [limit.wait_s("a") for _ in range(50)] == [0.0] * 50
    assert 0 < limit.wait_s("a") <= 1 / 50
    time.sleep(0.05)
    assert limit.wait_s("a") == 0.0
    assert RateLimit(0.5).wait_s("slow") == 0.0  # a limit under one a second still lets one through


def test_a_replaced_key_file_takes_effect_and_a_broken_one_keeps_the_keys(key_file, monkeypatch):
    import skin_ray.api_keys

    monkeypatch.setattr(skin_ray.api_keys, "RELOAD_CHECK_S", 0.0)
    keys = ApiKeys(str(key_file))
    assert keys.name_of(SECRET) == "clinic-a" and keys.name_of(OTHER) == "lab.b" and keys.name_of("") is None
    key_file.write_text(f"lab.b:{OTHER}\n")  # clinic-a revoked
    assert keys.name_of(SECRET) is None and keys.name_of(OTHER) == "lab.b"
    key_file.write_text("lab.b:short\n")
    assert keys.name_of(OTHER) == "lab.b"  # the broken file is refused in the log; the keys in force stay


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        (f"no-colon {SECRET}\n", "line 1: expected NAME:SECRET"),
        (f"bad name:{SECRET}\n", "line 1: expected NAME:SECRET"),
        ("a:too-short\n", "shorter than 16"),
        (f"a:{SECRET}\na:{OTHER}\n", "line 2: 'a' repeats"),
        (f"a:{SECRET}\nb:{SECRET}\n", "line 2: 'b' repeats"),
    ],
)
def test_a_key_file_that_cannot_be_used_is_refused_naming_its_line_not_its_secrets(tmp_path, text, reason):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=reason) as refused:
        read_key_file(str(path))
    assert SECRET not in str(refused.value) and "too-short" not in str(refused.value)


def test_a_limited_route_counts_its_requests_at_admission():
    """Requests to a route with a most at once are counted when admitted, before the app reads their bodies, so a
    burst cannot all pass before the first one is counted; one that finishes frees its place."""
    guard = _guard(capacity={("POST", "/explain"): RouteCapacity("1 explanations are already being made", most=1)})
    first = Exchange(guard, path="/explain", headers=[(b"content-length", b"3")], chunks=[b"abc"])
    released = asyncio.Event()
    app = first.app

    async def slow_app(scope, receive, send):
        await released.wait()
        await app(scope, receive, send)

    first.app = slow_app

    async def burst():
        running = asyncio.ensure_future(first.run())
        await asyncio.sleep(0)
        second = await Exchange(guard, path="/explain", headers=[(b"content-length", b"3")], chunks=[b"abc"]).run()
        released.set()
        return await running, second

    (first_status, _, _), (second_status, _, second_answer) = asyncio.run(burst())
    assert (first_status, second_status) == (200, 503) and "already being made" in second_answer["detail"]
    assert asyncio.run(Exchange(guard, path="/explain", headers=[(b"content-length", b"3")], chunks=[b"abc"]).run())[0] == 200


@pytest.mark.parametrize("given", [b"req-42.a:b_c", b"", b"x" * 200])
def test_every_refusal_is_told_with_the_request_s_id(given):
    """The id Serve set (the client's X-Request-ID, else its own), at most 128 characters; a new one without."""
    refusals = []
    guard = _guard(on_refusal=lambda scope, path, status, detail: refusals.append((scope["state"]["request_id"], status)))
    headers = [(b"x-request-id", given)] if given else []
    asyncio.run(Exchange(guard, headers=[*headers, (b"content-length", b"5000")], chunks=[b"x" * 5000]).run())
    [(request_id, status)] = refusals
    assert status == 413 and (request_id == given.decode()[:128] if given else len(request_id) == 32)


def test_an_upload_not_read_yet_keeps_its_place_before_an_older_one_trickling_bytes():
    """Past `max_uploads`, the upload cut is the old one sending a few bytes, not the young one whose body the
    loaded replica has not read yet (both wait for their client; the young one has received nothing)."""
    guard = RequestGuard(max_bytes=1000, timeout_s=10, max_uploads=2)
    headers = [(b"content-length", b"100")]

    async def status(arrivals: asyncio.Queue) -> int:
        return (await Exchange(guard, headers=headers, arrivals=arrivals).run())[0]

    async def scenario():
        trickling, not_read, arriving = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
        trickling.put_nowait({"type": "http.request", "body": b"x" * 5, "more_body": True})
        first = asyncio.create_task(status(trickling))
        await asyncio.sleep(1.0)
        second = asyncio.create_task(status(not_read))
        await asyncio.sleep(0.3)
        arriving.put_nowait({"type": "http.request", "body": b"x" * 100, "more_body": False})
        third = await status(arriving)
        not_read.put_nowait({"type": "http.request", "body": b"x" * 100, "more_body": False})
        return await first, await second, third

    assert asyncio.run(scenario()) == (408, 200, 200)
