"""``fewshot serve``: an HTTP service and a web page over an open classifier (the ``serve`` extra).

``run(classifier, settings, host=..., port=...)`` serves until interrupted; ``create_app(Service(...))``
gives the ASGI app to run under any ASGI server.
"""

from __future__ import annotations

from ..classifier import FewShotClassifier
from .app import ServeSettings, create_app
from .batching import Batcher
from .security import is_loopback, read_api_key
from .service import Service

__all__ = ["Batcher", "ServeSettings", "Service", "create_app", "is_loopback", "read_api_key", "run"]


def run(classifier: FewShotClassifier, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``classifier`` (opened with ``FewShotClassifier.open``) until Ctrl-C / SIGTERM, then close it.

    Another address than loopback needs ``settings.api_key``: the service lets its users change the registry."""
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"serving on {host} (not loopback) needs an API key: pass --api-key-file FILE")
    service = Service(classifier, max_batch=settings.max_batch, batch_window_ms=settings.batch_window_ms,
                      compile=settings.compile)
    app = create_app(service, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
