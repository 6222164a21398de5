"""The server's limits and timeouts, taken from ``ProxySettings`` once at startup."""

from __future__ import annotations

from dataclasses import dataclass

from sideproxy.proxy._settings import ProxySettings

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int = 16 * 1024 * 1024
    max_line: int = 8190  # request line and each header line (name + value)
    max_headers: int = 128
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    keepalive_timeout: float = 75.0  # idle connection, and connect -> end of headers

    @property
    def max_head(self) -> int:
        """Bytes a request head may take in all: every line at its limit."""
        return (self.max_headers + 2) * (self.max_line + 2)

    @classmethod
    def from_settings(cls, settings: ProxySettings) -> Limits:
        return cls(
            max_body=settings.max_body_size,
            max_line=settings.max_header_size,
            max_headers=settings.max_headers,
            body_timeout=settings.body_read_timeout,
            keepalive_timeout=settings.keepalive_timeout,
        )
