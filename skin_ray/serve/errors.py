"""How the service says no: every refusal is JSON `{"detail": ...}` (`{"error": ...}` under the Open Inference
Protocol's /v2, as it specifies) with a 4xx, or a 503 that says when to retry; nothing the caller does is answered
500."""

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells clients to wait: overload and restarts clear within seconds
PROTOCOL_PREFIX = "/v2"  # the Open Inference Protocol's routes, whose errors say `error`, not `detail`


class Refusal(Exception):
    """A request the service will not answer with a prediction: `status` and the reason, said to the caller."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def error(
    status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    """`{"detail": ...}` (`{"error": ...}` for a protocol `path`) with `status`; a 503 says when to retry, `closing`
    ends the connection after it."""
    headers = {**({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}), **(headers or {})}
    if closing:
        headers["Connection"] = "close"
    key = "error" if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/") else "detail"
    return JSONResponse(status_code=status, content={key: detail}, headers=headers)


async def refuse(
    send, status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None, path: str = ""
) -> None:
    """Answer an ASGI request with `error` straight from a middleware."""
    await error(status, detail, closing, headers, path)({"type": "http"}, None, send)


def route_path(scope) -> str:
    """The request's path below the app's route prefix (Serve mounts an app under `route_prefix`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
    return error(exc.status, exc.detail, path=route_path(request.scope))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A failure nobody foresaw is still the service's fault, not the caller's: JSON 503, retry."""
    logger.exception("unexpected failure answering %s", request.url.path)
    return error(503, f"internal failure ({type(exc).__name__}); retry shortly", path=route_path(request.scope))


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (a malformed multipart body, an unknown route) in the service's shape."""
    detail = f"malformed request body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
    return error(exc.status_code, detail, path=route_path(request.scope))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(sorted({repr(".".join(map(str, problem["loc"][1:]))) for problem in exc.errors()}))
    return error(422, f"no file: send the image(s) as file parts (with a filename) of multipart field {fields}",
                 path=route_path(request.scope))


# For FastAPI(exception_handlers=...): the most specific class that matches an exception answers it.
HANDLERS = {
    Refusal: _refusal,
    Exception: _unexpected,
    StarletteHTTPException: _http,
    RequestValidationError: _validation,
}
