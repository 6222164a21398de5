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
    # Upstream responses with a Content-Length up to this are read whole before answering, so a
    # body that breaks off can still be retried on another key. Longer, unsized or SSE responses
    # are streamed chunk by chunk.
    buffer_limit: int = MIB
    # SIGTERM: stop accepting, then give in-flight requests (streams too) this long to finish.
    shutdown_timeout: float = 30.0
    # How long app startup waits for the source's first table before serving anyway (not ready).
    initial_config_timeout: float = 10.0
    access_log: bool = True
    # Upstream connection pool: 0 = no limit; idle keep-alive seconds; DNS cache seconds.
    connection_limit: int = 0
    upstream_keepalive: float = 30.0
    dns_cache_ttl: int = 60

    def __post_init__(self) -> None:
        if self.max_body_size < 1 or self.max_header_size < 256 or self.buffer_limit < 0:
            raise ValueError("max_body_size >= 1, max_header_size >= 256 and buffer_limit >= 0")
