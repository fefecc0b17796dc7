"""How the service says no: every refusal is JSON `{"detail": ...}` with a 4xx, or a 503 that says when to retry;
nothing the caller does is answered 500."""

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells clients to wait: overload and restarts clear within seconds


class Refusal(Exception):
    """A request the service will not answer with a prediction: `status` and the reason, said to the caller."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def error(status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"detail": ...}` with `status`; a 503 says when to retry, `closing` ends the connection after it."""
    headers = {**({"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}), **(headers or {})}
    if closing:
        headers["Connection"] = "close"
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


async def refuse(send, status: int, detail: str, closing: bool = False, headers: dict[str, str] | None = None) -> None:
    """Answer an ASGI request with `error` straight from a middleware."""
    await error(status, detail, closing, headers)({"type": "http"}, None, send)


async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
    return error(exc.status, exc.detail)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A failure nobody foresaw is still the service's fault, not the caller's: JSON 503, retry."""
    logger.exception("unexpected failure answering %s", request.url.path)
    return error(503, f"internal failure ({type(exc).__name__}); retry shortly")


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (a malformed multipart body, an unknown route) in the service's shape."""
    detail = f"malformed request body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)
    return error(exc.status_code, detail)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ", ".join(sorted({repr(".".join(map(str, problem["loc"][1:]))) for problem in exc.errors()}))
    return error(422, f"no file: send the image(s) as file parts (with a filename) of multipart field {fields}")


# For FastAPI(exception_handlers=...): the most specific class that matches an exception answers it.
HANDLERS = {
    Refusal: _refusal,
    Exception: _unexpected,
    StarletteHTTPException: _http,
    RequestValidationError: _validation,
}
