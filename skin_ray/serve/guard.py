"""What every HTTP request passes before the app: a drain, the body's framing, API keys and their rate limits,
room for the route, and bounds on what an upload may hold and how long it may take."""

import asyncio
import contextlib
import logging
import math
import re
import uuid
from collections.abc import Callable

from skin_ray.api_keys import ApiKeys, RateLimit
from skin_ray.serve.errors import refuse, route_path

logger = logging.getLogger(__name__)

# What answers without an API key: the page, the health check and the API's documentation, which hold no data.
# Health probes (Kubernetes' and the Open Inference Protocol's) and the documentation need no key.
OPEN_ROUTES = frozenset({
    "/", "/healthz", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"
})
OPEN_PREFIXES = ("/static-offline-docs/",)  # the documentation pages' scripts and styles


class RouteCapacity:
    """Room for one route's requests, judged when a request is admitted, before its body is read: none while
    `full()` says so, and at most `most` requests of the route in progress at once (counted from admission, so a
    burst cannot pass while its bodies are still arriving)."""

    def __init__(self, reason: str, most: float = math.inf, full: Callable[[], bool] = lambda: False):
        self.reason, self.most, self.full, self.in_progress = reason, most, full, 0

    def has_room(self) -> bool:
        return not self.full() and self.in_progress < self.most

    @contextlib.contextmanager
    def held(self):
        """A place held for one request while it is answered."""
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1


class RequestGuard:
    """What every HTTP request passes before the app: refusal while the replica drains, a count of requests
    in flight (what a drain waits for), and bounds on what an upload may hold.

    In order: a body framed two ways or with a coding other than chunked is refused (400: the framing request
    smuggling relies on); without a valid API key (when the service has keys) a route other than OPEN_ROUTES
    gets 401, and a key past its rate limit 429; a route of `capacity` without room gets 503 before its body
    is read.

    An upload is refused with 413 past `max_bytes` (by Content-Length before anything is read, else by
    counting as chunks arrive, so it is never buffered), and cut with 408 when its body has not arrived
    within `timeout_s`. Beyond `max_uploads` bodies in progress, each new upload cuts the slowest (bytes so
    far plus CREDIT_BYTES, over age) of those older than GRACE_S that wait for their client, so a client
    sending a byte a second loses its place to any client sending at network speed, and slow senders do not
    pile up in the replica's request slots (`max_ongoing_requests`) that normal clients need. The new upload
    is admitted either way: refusing it would hand the slots to whoever holds them.
    """

    # An upload at network speed is over long before this; a younger one cannot be judged by its rate yet.
    GRACE_S = 0.25
    # Uploads are ranked by the rate they would have with one more TCP segment: a body not yet read at all
    # (a loaded event loop, not a slow client) then ranks by its age, behind an older one trickling bytes.
    CREDIT_BYTES = 1460
    # A body up to this size, refused for want of room, is read and dropped first (for at most a second): closing a
    # connection with unread bytes makes the kernel reset it, and the client may then lose the 503 it was sent
    # (seen with 24 concurrent /explain uploads of a few KB). A larger one is refused unread and the connection closed.
    SMALL_BODY = 256 * 1024

    def __init__(
        self, max_bytes: int, timeout_s: float, max_uploads: int, keys: ApiKeys | None = None,
        rate_limit: RateLimit | None = None, capacity: dict[tuple[str, str], RouteCapacity] | None = None,
        on_refusal: Callable[[dict, str, int, str], None] = lambda scope, path, status, detail: None,
    ):
        self.max_bytes, self.timeout_s, self.max_uploads = max_bytes, timeout_s, max_uploads
        self.keys, self.rate_limit, self.capacity = keys, rate_limit, capacity or {}  # capacity by (method, path)
        self.on_refusal = on_refusal  # told of every refusal, with the request's path below the app's prefix
        self.draining = False
        self.in_flight = 0
        self._uploads: set[_Upload] = set()
        self._idle = asyncio.Event()

    def middleware(self, app):
        """The ASGI app Starlette puts in front of `app` (`FastAPI.add_middleware(guard.middleware)`)."""

        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            scope.setdefault("state", {})["request_id"] = _request_id(scope["headers"])
            if self.draining:
                return await self._refuse(scope, send, 503, "the service is shutting down; retry shortly", closing=True)
            self.in_flight += 1
            self._idle.clear()
            try:
                await self._admit(app, scope, receive, send)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self._idle.set()

        return guarded

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to `timeout_s` for those in flight; return how many did not finish."""
        self.draining = True
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.in_flight

    async def _admit(self, app, scope, receive, send):
        headers = scope["headers"]
        lengths = {value.strip() for name, value in headers if name == b"content-length"}
        codings = [c.strip().lower() for name, value in headers if name == b"transfer-encoding" for c in value.split(b",")]
        if problem := _framing_problem(lengths, codings):
            return await self._refuse(scope, send, 400, problem, closing=True)
        path = route_path(scope)
        if self.keys is not None and path not in OPEN_ROUTES and not path.startswith(OPEN_PREFIXES):
            caller = self.keys.name_of(_presented_secret(headers))
            if caller is None:
                return await self._refuse(
                    scope, send, 401, "an API key is needed: send Authorization: Bearer KEY or X-API-Key: KEY",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if self.rate_limit is not None and (wait_s := self.rate_limit.wait_s(caller)):
                return await self._refuse(
                    scope, send, 429, f"key {caller!r} is over its rate limit; retry shortly",
                    headers={"Retry-After": str(math.ceil(wait_s))},
                )
            scope.setdefault("state", {})["caller"] = caller  # its name, for the log; never the secret
            logger.info("%s %s by API key %r", scope["method"], path, caller)
        capacity = self.capacity.get(capacity_key(scope["method"], path))
        if capacity is not None and not capacity.has_room():
            small = lengths and int(next(iter(lengths))) <= self.SMALL_BODY
            read = small and await _discard_body(receive, timeout_s=1.0)
            return await self._refuse(scope, send, 503, capacity.reason, closing=not read)
        with capacity.held() if capacity is not None else contextlib.nullcontext():
            return await self._bounded(app, scope, receive, send, lengths, codings)

    async def _refuse(self, scope, send, status: int, detail: str, closing: bool = False, headers=None) -> None:
        """Answer `status` with `detail` from here, and say so to `on_refusal`."""
        path = route_path(scope)
        self.on_refusal(scope, path, status, detail)
        await refuse(send, status, detail, closing, headers, path)

    async def _bounded(self, app, scope, receive, send, lengths: set[bytes], codings: list[bytes]):
        """Pass the request on with its body bounded by `max_bytes` and `timeout_s`."""
        declared = int(next(iter(lengths))) if lengths else None
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(scope, send, 413, f"request body is larger than {self.max_bytes:,} bytes")
        if not codings and not declared:
            return await app(scope, receive, send)  # HTTP/1.1: a request declaring neither has no body
        if len(self._uploads) >= self.max_uploads:
            self._cut_slowest()
        upload = _Upload(asyncio.get_running_loop().time())
        self._uploads.add(upload)
        refused = False

        async def bounded_receive():
            nonlocal refused
            if refused:
                return {"type": "http.disconnect"}
            message, refusal = await upload.receive(receive, self.timeout_s)
            if refusal is None and upload.received > self.max_bytes:
                refusal = (413, f"request body is larger than {self.max_bytes:,} bytes")
            if refusal is not None:
                refused = True
                self._uploads.discard(upload)
                await self._refuse(scope, send, *refusal, closing=True)
                return {"type": "http.disconnect"}  # the app stops reading; what it still sends is dropped
            if not message.get("more_body"):
                self._uploads.discard(upload)
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await app(scope, bounded_receive, guarded_send)
        finally:
            self._uploads.discard(upload)

    def _cut_slowest(self) -> None:
        """Cut the slowest upload old enough to judge that waits for its client, if any (one whose body the
        app has not asked for yet is not slow, only not read yet: `received` counts what the app read)."""
        now = asyncio.get_running_loop().time()
        judged = [upload for upload in self._uploads if upload.waiting and now - upload.started >= self.GRACE_S]
        if judged:
            slowest = min(judged, key=lambda upload: (upload.received + self.CREDIT_BYTES) / (now - upload.started))
            slowest.cut.set()
            self._uploads.discard(slowest)


class _Upload:
    """One request body in progress: when it started, how much arrived, whether the app is waiting for the
    client's next bytes, and whether it lost its place."""

    def __init__(self, started: float):
        self.started, self.received, self.waiting, self.cut = started, 0, False, asyncio.Event()

    async def receive(self, receive, timeout_s: float) -> tuple[dict | None, tuple[int, str] | None]:
        """The next message, or why the upload ends here: (408, reason) past its deadline or when cut."""
        left = self.started + timeout_s - asyncio.get_running_loop().time()
        message = asyncio.ensure_future(receive())
        cut = asyncio.ensure_future(self.cut.wait())
        self.waiting = True
        done, _ = await asyncio.wait({message, cut}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        self.waiting = False
        cut.cancel()
        if message not in done or self.cut.is_set():
            message.cancel()
            if self.cut.is_set():
                return None, (408, "upload too slow: other uploads were waiting and this one was the slowest")
            return None, (408, f"upload too slow: the body did not arrive within {timeout_s:g} s")
        received = message.result()
        self.received += len(received.get("body", b""))
        return received, None


async def _discard_body(receive, timeout_s: float) -> bool:
    """Read a request's body to its end and drop it; False if it does not end within `timeout_s`."""

    async def to_the_end() -> bool:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            if not message.get("more_body", False):
                return True

    try:
        return await asyncio.wait_for(to_the_end(), timeout_s)
    except TimeoutError:
        return False


def _framing_problem(lengths: set[bytes], codings: list[bytes]) -> str | None:
    """Why a request's body framing is refused (RFC 9112 section 6), or None: a proxy and this server could
    read the body's end differently, which is what request smuggling relies on."""
    if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
        return "malformed request: Content-Length must be one number"
    if lengths and codings:
        return "malformed request: both Content-Length and Transfer-Encoding"
    if codings and codings != [b"chunked"]:
        return "malformed request: the only transfer coding accepted is chunked"
    return None


def _request_id(headers) -> str:
    """The request's id for the audit trail: its X-Request-ID as Serve sets and echoes it (the client's, else one
    Serve or HAProxy made), at most 128 characters of it; a new one where nothing set it (outside Serve)."""
    given = next((value for name, value in headers if name == b"x-request-id"), b"")
    return given.decode("latin-1")[:128] or uuid.uuid4().hex


def capacity_key(method: str, path: str) -> tuple[str, str]:
    """The route whose capacity a request takes: an Open Inference Protocol path naming a version
    (/v2/models/M/versions/V/infer) shares its model's (/v2/models/M/infer)."""
    return method, _PROTOCOL_VERSION.sub(r"\1\2", path)


_PROTOCOL_VERSION = re.compile(r"^(/v2/models/[^/]+)/versions/[^/]+(/infer)$")


def _presented_secret(headers) -> str:
    """The API key a request presents (`Authorization: Bearer KEY` or `X-API-Key: KEY`), or ""."""
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer":
                return secret.strip()
    return ""


