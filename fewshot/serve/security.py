"""Request guards of the service, as ASGI middleware that runs before any route: the API key, and
upload size limits enforced while the body streams in (a request over the limit is refused as soon as
it crosses it, without reading the rest)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from pathlib import Path

MIN_KEY_LENGTH = 16
# Paths anyone may read: the page and its files, liveness, readiness, the API description.
PUBLIC_PATHS = ("/", "/healthz", "/readyz", "/openapi.json", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | os.PathLike) -> str:
    """The API key in ``path`` (its first line); ValueError if it is missing or too short to be safe."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {path}: {e}") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the API key in {path} must be at least {MIN_KEY_LENGTH} characters; generate one with "
                         "`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > KEYFILE`")
    return key


async def send_error(send, status: int, message: str) -> None:
    """Answer with ``{"error": message}`` and close the connection (the rest of the body is not read)."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="fewshot"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyGuard:
    """Require ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` on every path but the public ones."""

    def __init__(self, app, *, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _is_public(scope["path"]) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = _presented_key(scope)
        if given is None:
            return await send_error(send, 401, "this service needs an API key: send 'Authorization: Bearer KEY' "
                                               "or 'X-API-Key: KEY'")
        if not hmac.compare_digest(given, self._key):
            return await send_error(send, 403, "wrong API key")
        return await self.app(scope, receive, send)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _presented_key(scope) -> bytes | None:
    headers = dict(scope["headers"])  # header names are lower-case in ASGI
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].strip()
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class UploadLimits:
    """Refuse a request body over ``max_request_bytes`` (413), and bodies that would take the bytes held
    for all requests in progress over ``max_total_bytes`` (503), counting as the body arrives."""

    def __init__(self, app, *, max_request_bytes: int, max_total_bytes: int):
        self.app, self.max_request, self.max_total = app, max_request_bytes, max_total_bytes
        self._held = 0  # body bytes held by requests in progress (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request:
            return await send_error(send, 413, self._too_large())
        chunks, size = [], 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                self._held += len(chunk)
                if size > self.max_request:
                    return await send_error(send, 413, self._too_large())
                if self._held > self.max_total:
                    return await send_error(send, 503, "the server is receiving too many uploads at once; "
                                                       "retry in a moment")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            await self.app(scope, _replay(b"".join(chunks), receive), send)
        finally:
            self._held -= size

    def _too_large(self) -> str:
        return (f"upload too large: at most {self.max_request / 2**20:g} MB per request "
                "(the server's --max-upload-mb); send fewer or smaller images per request")


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the app expects

    return replayed
