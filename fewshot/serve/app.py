"""The FastAPI application of ``fewshot serve``: JSON endpoints over an open classifier, and the page.

Every endpoint goes through the library (``FewShotClassifier`` and its registry): labels, images and
saves follow the same rules as the Python API and the CLI. No endpoint takes a file path: images
arrive as uploads, labels are only labels.
"""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (DuplicateClassError, FewShotError, RegistryLockedError, RegistrySaveError,
                      UnknownClassError)
from ..embedding.images import NamedBytes
from ..registry.calibration import Calibration
from .security import ApiKeyGuard, UploadLimits
from .service import MAX_TOP_K, Service, TooManyPixels
from .telemetry import CONTENT_TYPE, Telemetry

STATIC = Path(__file__).parent / "static"
MAX_FILES = 256  # images per request
MAX_NAME = 200  # characters of an upload's file name kept for messages


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs. api_key None: no key needed (loopback only; the CLI enforces that)."""

    api_key: str | None = None
    max_upload_mb: float = 20.0
    max_total_upload_mb: float = 200.0
    max_batch: int = 16
    batch_window_ms: float = 5.0
    compile: str | None = "torchscript"  # the encoder's network (see fewshot.embedding.encoders.COMPILE_MODES)
    runtime: str | None = "onnxruntime"  # its engine (RUNTIMES there): torch with `compile` where onnxruntime fails
    cors_origins: list[str] = field(default_factory=list)
    max_image_mp: float = 40.0  # megapixels one image may decode to (JPEGs decode at reduced size)
    max_request_mp: float = 160.0  # megapixels all images of one request may decode to
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # longest pause while a request body arrives
    max_connections: int = 512  # connections open at once; more are closed on arrival


class LabelConvertor(PathConvertor):
    """A class label in a URL path: any text, newlines included (``{label:path}`` stops at a newline)."""

    regex = r"[\s\S]*"


register_url_convertor("fewshot_label", LabelConvertor())


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(service: Service, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The service's ASGI app. Starting it (the lifespan) loads the model; stopping it closes the registry."""
    # No /docs or /redoc: their pages load scripts from a CDN, and the service fetches nothing from the internet.
    app = FastAPI(title="fewshot", version=__version__, lifespan=_lifespan(service), docs_url=None, redoc_url=None,
                  description="Register few-shot image classes and recognise images.")
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Added last = runs first: CORS (if asked for), metrics, the API key, then the upload limits.
    app.add_middleware(UploadLimits, max_request_bytes=int(settings.max_upload_mb * 2**20),
                       max_total_bytes=int(settings.max_total_upload_mb * 2**20))
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.add_middleware(_Timing, telemetry=service.telemetry)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    return app


def _lifespan(service: Service):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    return lifespan


# -- routes -------------------------------------------------------------------------------------
_MULTIPART = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and the registry open")
    async def readyz():
        if not service.ready:
            return JSONResponse({"error": "loading the model"}, status_code=503)
        return {"status": "ready", "classes": service.class_count()}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(service.telemetry.render(classes=service.class_count()), media_type=CONTENT_TYPE)

    @app.get("/v1/info", summary="Encoder, head, metric, threshold and versions")
    async def info():
        return await asyncio.to_thread(_info, service, await service.calibration())

    @app.get("/v1/classes", summary="Every class with its number of examples")
    async def classes():
        return [{"label": label, "count": count} for label, count in (await service.counts()).items()]

    @app.get("/v1/classes/{label:fewshot_label}/thumbnail", summary="The class's thumbnail (JPEG)",
             response_class=Response)
    async def thumbnail(label: str):
        data = await service.thumbnail(label)
        if data is None:
            raise ApiError(404, f"class {label!r} has no thumbnail")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "no-cache"})

    @app.post("/v1/classes/{label:fewshot_label}/images", summary="Add images to a class (created if new)",
              openapi_extra=_MULTIPART)
    async def add_images(label: str, request: Request):
        report = await service.register(label, await _uploaded_images(request))
        return {"label": report.label, "added": report.added, "total": report.total, "errors": report.errors,
                "warnings": report.warnings}

    @app.post("/v1/classes/{label:fewshot_label}/rename", summary="Rename a class: body {\"to\": \"new label\"}")
    async def rename(label: str, request: Request):
        new = await _rename_target(request)
        await service.rename(label, new)
        return {"label": new, "renamed_from": label}

    @app.delete("/v1/classes/{label:fewshot_label}", summary="Remove a class")
    async def remove(label: str):
        await service.remove(label)
        return {"removed": label}

    @app.post("/v1/predict", summary="Predict the class of each image, in order", openapi_extra=_MULTIPART)
    async def predict(request: Request, top_k: int = 5):
        if not 1 <= top_k <= MAX_TOP_K:
            raise ApiError(400, f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        images = await _uploaded_images(request)
        if not service.class_count():
            raise ApiError(409, "no classes registered yet; add one with POST /v1/classes/{label}/images")
        return [p.to_dict() for p in await service.predict(images, top_k)]


async def _uploaded_images(request: Request) -> list[NamedBytes]:
    """The files of the multipart field ``images``, read into memory (the body is bounded already)."""
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except Exception as e:  # malformed multipart, too many parts
        raise ApiError(400, f"could not read the upload as multipart/form-data: {getattr(e, 'detail', e)}") from None
    files = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
    if not files:
        raise ApiError(400, "no images: send one or more files in the multipart/form-data field 'images'")
    images = []
    for i, f in enumerate(files):
        name = (f.filename or f"image {i + 1}")[:MAX_NAME]
        images.append(NamedBytes(await f.read(), name))
        await f.close()
    return images


async def _rename_target(request: Request) -> str:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("to"), str):
        raise ApiError(400, 'send a JSON body {"to": "new label"}')
    return body["to"]


def _threshold(classifier, calibration: Calibration) -> dict:
    """How "unknown" is decided: off, one fixed similarity, or the thresholds fitted to the registry."""
    if not classifier.unknown:
        return {"source": "off"}
    if classifier.unknown_threshold is not None:
        return {"source": "fixed", "value": classifier.unknown_threshold}
    return {"source": "fitted", "pooled": calibration.threshold, "one_shot": calibration.one_shot_threshold,
            "per_class": len(calibration.per_class), "method": calibration.method,
            "target_tpr": calibration.target_tpr}


def _info(service: Service, calibration: Calibration) -> dict:
    import faiss
    import timm
    import torch

    classifier = service.classifier
    fingerprint = classifier.fingerprint_
    return {
        "encoder": {k: v for k, v in fingerprint.items() if k != "head"},
        "head": fingerprint.get("head"),
        "metric": classifier.registry_.metric,
        "threshold": _threshold(classifier, calibration),
        "temperature": classifier.temperature_,
        "classes": service.class_count(),
        "index": classifier.registry_.index_in_use,
        "batching": {"max_batch": service.batcher.max_batch, "window_ms": service.batcher.window_s * 1000},
        "compile": classifier.encoder_.compile,
        "runtime": classifier.encoder_.runtime,
        "versions": {"fewshot": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "timm": timm.__version__, "faiss": faiss.__version__},
    }


# -- errors: always {"error": "..."} ------------------------------------------------------------
def _status_of(exc: Exception) -> int:
    if isinstance(exc, UnknownClassError):
        return 404
    if isinstance(exc, (DuplicateClassError, RegistryLockedError)):
        return 409
    if isinstance(exc, RegistrySaveError):
        return 507
    if isinstance(exc, TooManyPixels):
        return 413
    return 400


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(FewShotError)
    async def fewshot_error(request, exc: FewShotError):
        message = str(exc)
        if isinstance(exc, UnknownClassError):  # the library's hint names its Python API, not the endpoint
            message = message.split("; known classes")[0] + "; GET /v1/classes lists the classes"
        return JSONResponse({"error": message}, status_code=_status_of(exc))

    @app.exception_handler(ValueError)
    async def value_error(request, exc: ValueError):  # bad arguments, e.g. an invalid label
        return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = exc.detail
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see /openapi.json"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /openapi.json"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc}); the registry is unchanged "
                                      "unless the response said otherwise"}, status_code=500)


class _Timing:
    """Counts every response by endpoint, method and status, with its latency, for /metrics."""

    def __init__(self, app, *, telemetry: Telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("endpoint"), "__name__", None)
            if endpoint is None:
                endpoint = "static" if scope["path"].startswith("/static/") else "unmatched"
            self.telemetry.record_request(endpoint, scope["method"], status, time.perf_counter() - start)
