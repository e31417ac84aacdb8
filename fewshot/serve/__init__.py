"""``fewshot serve``: an HTTP service and a web page over an open classifier (the ``serve`` extra).

``run(classifier, settings, host=..., port=...)`` serves until interrupted; ``create_app(Service(...))``
gives the ASGI app to run under any ASGI server.
"""

from __future__ import annotations

import socket

from ..classifier import FewShotClassifier
from .app import ServeSettings, create_app
from .batching import Batcher
from .connections import ensure_descriptors, guarded_protocol, listen
from .security import is_loopback, read_api_key
from .service import Service

__all__ = ["Batcher", "ServeSettings", "Service", "create_app", "is_loopback", "listen", "read_api_key", "run"]


def run(classifier: FewShotClassifier, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
        sock: socket.socket | None = None) -> None:
    """Serve ``classifier`` (opened with ``FewShotClassifier.open``) until Ctrl-C / SIGTERM, then close it.

    ``sock``: a socket from ``listen(host, port)`` (so that a busy port fails before anything else).
    Another address than loopback needs ``settings.api_key``: the service lets its users change the registry."""
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"serving on {host} (not loopback) needs an API key: pass --api-key-file FILE")
    ensure_descriptors(settings.max_connections)
    protocol = guarded_protocol(header_timeout=settings.header_timeout_s, body_timeout=settings.body_timeout_s,
                                max_connections=settings.max_connections)
    sock = sock or listen(host, port)
    service = Service(classifier, max_batch=settings.max_batch, batch_window_ms=settings.batch_window_ms,
                      compile=settings.compile, runtime=settings.runtime, max_image_mp=settings.max_image_mp,
                      max_request_mp=settings.max_request_mp)
    app = create_app(service, settings)
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])
