"""The HTTP face of `SearchService`: a FastAPI app with JSON errors and the search page.

Routes (errors in brackets):

- ``GET /``: the search page (``static/``);
- ``POST /v1/search``: a multipart form with the file in ``image`` (``k`` and ``qe`` as
  fields or in the query string), or the raw image as the body with ``?k=&qe=``; returns
  ids, scores, image URLs and the time per stage [400 bad image, k or qe; 413; 503 model];
- ``POST /v1/images``: a multipart form with ``id`` and ``image``; embeds, stores the file
  under ``--image-root`` (if given), logs and adds; 201 [401; 400; 409 duplicate id; 413;
  503; 507 disk full];
- ``DELETE /v1/images/{id}``: logs and applies a deletion [401; 404 unknown id];
- ``GET /v1/images/{id}``: the indexed image's file, from ``--image-root`` only [403 outside
  it; 404];
- ``GET /healthz``: the process answers; ``GET /readyz``: 200 once the model answered its
  warm-up and the index is loaded, else 503 with the reason; ``GET /metrics``: Prometheus.

Every error is ``{"error": short name, "detail": one line naming the problem}`` with a 4xx or
5xx status; an unexpected exception is logged with its traceback and answered 500 without
it. Bodies over ``max_body_bytes`` are refused (413) from their ``Content-Length`` before
being read, or as soon as a streamed body passes the limit.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from remap_tf.contract import NOT_AN_IMAGE, PIXEL_LIMIT, check_tag
from remap_tf.errors import (
    ImageRejectedError,
    InvalidInputError,
    RemapError,
    ServingError,
    UnknownIdError,
)
from remap_tf.serving.service.metrics import CONTENT_TYPE
from remap_tf.serving.service.state import SearchService, ServiceError

logger = logging.getLogger("remap_tf.serving.service")

STATIC_PACKAGE = ("remap_tf.serving.service", "static")
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)


class BodyTooLarge(Exception):
    """A request body passed ``max_body_bytes`` while it was being read."""


def _route(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


def _json_error(status: int, error: str, detail: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class _Guard:
    """Outermost ASGI layer: body limit, request metrics, and a 500 for unexpected errors."""

    def __init__(self, app, service: SearchService, max_body_bytes: int):
        self.app = app
        self.service = service
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, state = time.perf_counter(), {"status": 500, "sent": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        try:
            if self._declared_too_large(scope):
                await self._refuse(scope, send_tracked)
            else:
                await self.app(scope, self._limited(receive), send_tracked)
        except Exception as error:  # a bug: log it, answer without the traceback
            logger.exception("unexpected error in %s %s", scope["method"], scope["path"])
            if not state["sent"]:
                response = _json_error(
                    500,
                    "internal error",
                    f"unexpected {type(error).__name__}; the service log has the details",
                )
                self.service.metrics.errors.labels(_route(scope), "internal error").inc()
                await response(scope, receive, send_tracked)
        finally:
            route, metrics = _route(scope), self.service.metrics
            metrics.requests.labels(route, scope["method"], str(state["status"])).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - started)

    def _declared_too_large(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value) > self.limit
                except ValueError:
                    return False
        return False

    async def _refuse(self, scope, send):
        self.service.metrics.errors.labels(_route(scope), "body too large").inc()
        response = _json_error(413, "body too large", self._too_large_detail())
        response.headers["Connection"] = "close"
        await response(scope, None, send)

    def _too_large_detail(self) -> str:
        return f"the request body is over the limit of {self.limit} bytes (--max-body-mb)"

    def _limited(self, receive):
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self._too_large_detail())
            return message

        return receive_limited


def _parse_int(name: str, value, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ServiceError(
            400, f"bad {name}", f"{name} must be an integer from {low} to {high}, got {value!r}"
        )
    return number


def _image_error(error: ImageRejectedError) -> tuple[str, str]:
    reason = error.reason or str(error)
    if check_tag(reason) == NOT_AN_IMAGE:
        return "not an image", reason
    if check_tag(reason) == PIXEL_LIMIT:
        return "too many pixels", reason
    return "bad image", f"the image could not be decoded: {reason}"


def _add_error_handlers(app: FastAPI, service: SearchService) -> None:
    def answer(request: Request, status: int, error: str, detail: str, headers=None):
        service.metrics.errors.labels(_route(request.scope), error).inc()
        return _json_error(status, error, " ".join(str(detail).split()), headers)

    @app.exception_handler(ServiceError)
    async def service_error(request, error: ServiceError):
        return answer(request, error.status, error.error, error.detail, error.headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, error: BodyTooLarge):
        return answer(request, 413, "body too large", str(error), {"Connection": "close"})

    @app.exception_handler(RemapError)
    async def remap_error(request, error: RemapError):
        if isinstance(error, ImageRejectedError):
            return answer(request, 400, *_image_error(error))
        if isinstance(error, UnknownIdError):
            return answer(request, 404, "unknown id", str(error))
        if isinstance(error, InvalidInputError):
            return answer(request, 400, "bad request", str(error))
        if isinstance(error, ServingError):  # TF Serving down, no such model: try later
            return answer(request, 503, "model unavailable", str(error), {"Retry-After": "5"})
        return answer(request, 400, "bad request", str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        names = {404: "not found", 405: "method not allowed"}
        return answer(
            request, error.status_code, names.get(error.status_code, "error"), error.detail
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return answer(request, 400, "bad request", problems)


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ServiceError(
            401,
            "unauthorized",
            "this endpoint needs the header 'Authorization: Bearer <api key>' with the "
            "service's key" + (" (the one sent does not match)" if header else ""),
            {"WWW-Authenticate": "Bearer"},
        )


async def _form_image(form, field: str = "image") -> bytes:
    upload = form.get(field)
    if upload is None or isinstance(upload, str):
        raise ServiceError(400, "no image", f"the form has no file in the field {field!r}")
    return await upload.read()


def _add_api_routes(app: FastAPI, service: SearchService) -> None:
    settings = service.settings

    @app.post("/v1/search")
    async def search(request: Request):
        params = request.query_params
        async with service.receiving():
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                async with request.form(max_files=1, max_fields=8) as form:
                    image = await _form_image(form)
                    k_text = form.get("k", params.get("k"))
                    qe_text = form.get("qe", params.get("qe"))
            else:
                image = await request.body()
                k_text, qe_text = params.get("k"), params.get("qe")
        k = _parse_int("k", k_text, 10, 1, settings.max_k)
        qe = _parse_int("qe", qe_text, 0, 0, min(settings.max_qe, k))
        return await service.search(image, k=k, qe=qe)

    @app.post("/v1/images", status_code=201)
    async def add_image(request: Request):
        _check_key(request, settings.api_key)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServiceError(
                400, "not a form", "send a multipart form with fields 'id' and 'image'"
            )
        async with service.receiving(), request.form(max_files=1, max_fields=8) as form:
            item = form.get("id")
            if not isinstance(item, str):
                raise ServiceError(400, "no id", "the form has no text field 'id'")
            image = await _form_image(form)
        return await service.add_image(item, image)

    @app.delete("/v1/images/{image_id:path}")
    async def delete_image(request: Request, image_id: str):
        _check_key(request, settings.api_key)
        return await service.delete_image(image_id)

    @app.get("/v1/images/{image_id:path}")
    async def get_image(image_id: str):
        path = service.image_file(image_id)
        media = mimetypes.guess_type(path.name)[0] or ""
        if not media.startswith("image/") or media == "image/svg+xml":  # never active content
            media = "application/octet-stream"
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=media, headers=headers)


def _add_ops_routes(app: FastAPI, service: SearchService) -> None:
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready, details = service.readiness()
        return JSONResponse(details, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        service.refresh_gauges()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        static = StaticFiles(packages=[STATIC_PACKAGE])
        path, _ = static.lookup_path("index.html")
        headers = {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"}
        return FileResponse(path, media_type="text/html", headers=headers)


def create_app(service: SearchService) -> FastAPI:
    """The ASGI application serving ``service`` (routes in the module docstring)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="remap search",
        summary="Visual search over a ScaNN index of REMAP descriptors",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    _add_error_handlers(app, service)
    _add_api_routes(app, service)
    _add_ops_routes(app, service)
    app.mount("/static", StaticFiles(packages=[STATIC_PACKAGE]), name="static")
    if service.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(service.settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_Guard, service=service, max_body_bytes=service.settings.max_body_bytes)
    return app
