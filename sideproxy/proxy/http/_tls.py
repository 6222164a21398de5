"""TLS to providers: the system CA bundle (OpenSSL's default paths, which honour
``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), or a configured CA file instead."""

from __future__ import annotations

import ssl

__all__ = ["client_context"]


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Certificate and host name verification on, TLS 1.2 at least, HTTP/1.1 by ALPN."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context
