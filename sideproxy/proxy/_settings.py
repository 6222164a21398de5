"""Process-level settings of the proxy (the routing table carries the per-pool ones)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MIB", "ProxySettings"]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What ``sideproxy serve`` flags set. Timeouts and retries come from the routing table."""

    host: str = "127.0.0.1"
    port: int = 8080
    # Standalone virtual keys (SIDE_PROXY_VIRTUAL_KEYS); added to any the table's Secret holds.
    virtual_keys: tuple[str, ...] = field(default=(), repr=False)
    # Largest request body accepted (413 above). Bodies are read once and replayed on retries.
    max_body_size: int = 16 * MIB
    # Longest request line and longest header line (aiohttp's max_line_size / max_field_size).
    max_header_size: int = 8190
    # Most header lines in one request (aiohttp's max_headers); more is a 400.
    max_headers: int = 128
    # Longest a client may take to send its whole request body (slowloris): 408 after that.
    body_read_timeout: float = 30.0
    # Idle keep-alive connections close after this; it also bounds how long a new connection
    # may take to send its request line and headers (aiohttp starts the timer on connect).
    keepalive_timeout: float = 75.0
    # Upstream responses with a Content-Length up to this are read whole before answering, so a
    # body that breaks off can still be retried on another key. Longer, unsized or SSE responses
    # are streamed chunk by chunk.
    buffer_limit: int = MIB
    # SIGTERM: stop accepting, then give in-flight requests (streams too) this long to finish.
    shutdown_timeout: float = 30.0
    # How long app startup waits for the source's first table before serving anyway (not ready).
    initial_config_timeout: float = 10.0
    access_log: bool = True
    # Refuse to serve a routing table without client auth (cluster mode, or a pool file served
    # beyond loopback, without --no-auth): it is rejected like an invalid table; the last good one
    # stays, or the proxy stays not ready.
    require_client_auth: bool = False
    # Upstream connection pool: 0 = no limit; idle keep-alive seconds; DNS cache seconds.
    connection_limit: int = 0
    upstream_keepalive: float = 30.0
    dns_cache_ttl: int = 60
    # How often the pool is asked which exhausted or revoked keys are due a token-free probe.
    probe_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.max_body_size < 1 or self.max_header_size < 256 or self.buffer_limit < 0:
            raise ValueError("max_body_size >= 1, max_header_size >= 256 and buffer_limit >= 0")
        if self.max_headers < 16:
            raise ValueError("max_headers must be at least 16")
        if not (self.body_read_timeout > 0 and self.keepalive_timeout > 0):
            raise ValueError("body_read_timeout and keepalive_timeout must be > 0")
        if not self.probe_interval > 0:
            raise ValueError("probe_interval must be > 0")
