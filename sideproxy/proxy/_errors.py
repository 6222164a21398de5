"""Errors the proxy itself makes, all in the OpenAI error shape.

Hierarchy::

    ProxyError                      an answer the proxy gives instead of the provider's
    ├── BadRequest (400)            invalid_request_error: invalid_json, invalid_path, ...
    ├── Unauthorized (401)          authentication_error: invalid_virtual_key
    ├── ModelNotAllowed (403)       permission_error: model_not_allowed (a VirtualKey's models)
    ├── NotFound (404)              invalid_request_error: unknown_provider, unknown_route
    ├── RequestTimeout (408)        invalid_request_error: body_read_timeout (slow client)
    ├── BodyTooLarge (413)          invalid_request_error: body_too_large
    ├── NoKeyAvailable (429)        rate_limit_error: no_key_available (+ Retry-After)
    ├── VirtualKeyLimit (429)       rate_limit_error: virtual_key_limit (+ Retry-After)
    ├── UpstreamUnreachable (502)   proxy_error: upstream_unreachable
    ├── UpstreamInvalid (502)       proxy_error: upstream_invalid_response (a 2xx that is not
    │                               the JSON it claims, an oversized error body)
    ├── NotReady (503)              proxy_error: not_ready (no routing table loaded yet)
    └── UpstreamTimeout (504)       proxy_error: upstream_timeout

Every one renders through :func:`error_response`, the only place the body shape is written:
``{"error": {"message": ..., "type": ..., "code": ...}}``. Messages never carry key material.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "ModelNotAllowed",
    "NoKeyAvailable",
    "NotFound",
    "NotReady",
    "ProxyError",
    "RequestTimeout",
    "Unauthorized",
    "UpstreamInvalid",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "VirtualKeyLimit",
    "error_body",
    "error_response",
]

_JSON = "application/json"


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "code": code}}, ensure_ascii=False
    ).encode()


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The one helper that renders every error the proxy itself makes."""
    return web.Response(
        status=status,
        body=error_body(message, type_, code),
        content_type=_JSON,
        headers=headers,
    )


class ProxyError(Exception):
    status = 500
    type_ = "proxy_error"
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers

    def parts(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body): this error for any transport."""
        headers = [(b"Content-Type", b"application/json")]
        for name, value in (self.headers or {}).items():
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        return self.status, headers, error_body(self.message, self.type_, self.code)

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type_, self.code, self.headers)


class BadRequest(ProxyError):
    status = 400
    type_ = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ProxyError):
    status = 401
    type_ = "authentication_error"
    code = "invalid_virtual_key"


class NotFound(ProxyError):
    status = 404
    type_ = "invalid_request_error"
    code = "unknown_route"


class RequestTimeout(ProxyError):
    status = 408
    type_ = "invalid_request_error"
    code = "body_read_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    type_ = "invalid_request_error"
    code = "body_too_large"


class ModelNotAllowed(ProxyError):
    status = 403
    type_ = "permission_error"
    code = "model_not_allowed"


class NoKeyAvailable(ProxyError):
    status = 429
    type_ = "rate_limit_error"
    code = "no_key_available"


class VirtualKeyLimit(ProxyError):
    status = 429
    type_ = "rate_limit_error"
    code = "virtual_key_limit"


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"


class UpstreamInvalid(ProxyError):
    status = 502
    code = "upstream_invalid_response"


class NotReady(ProxyError):
    status = 503
    code = "not_ready"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"
