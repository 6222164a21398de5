"""The ``sideproxy`` command: serve, demo, diag, operator.

Every ``serve`` setting has a flag and an environment variable (``sideproxy serve --help`` lists
both). Secrets (pool keys, virtual keys) are better given by environment than by flag: flags show
up in ``ps``. Help output never prints a secret's value.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

log = logging.getLogger("sideproxy.cli")

_MIB = 1024 * 1024
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": _MIB, "mb": _MIB,
               "mib": _MIB, "g": 1024 * _MIB, "gb": 1024 * _MIB, "gib": 1024 * _MIB}  # fmt: skip
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _size(text: str) -> int:
    """``16777216``, ``16MiB``, ``512k``."""
    value = text.strip().lower()
    digits = value.rstrip("abgikmo")
    unit = value[len(digits) :]
    if unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 16MiB or 1048576")
    try:
        number = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 16MiB or 1048576") from None
    return int(number * _SIZE_UNITS[unit])


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _env_flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SystemExit(f"sideproxy: {name}={raw!r} is not a boolean (use 1/0, true/false)")


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: could resolve to anything


# --------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the proxy",
        description=(
            "Run the proxy. Keys come from SIDE_POOL_KEYS (standalone), a pool file (--file) or "
            "the cluster (--pool). Listening beyond loopback needs virtual keys or --no-auth."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_key_sources(p.add_argument_group("where the keys come from (pick one)"))
    _add_listening(p.add_argument_group("listening and client auth"))
    _add_limits(p.add_argument_group("limits"))
    _add_logging(p.add_argument_group("logging"))
    p.set_defaults(run=_serve)


# One argument group each: ``sideproxy serve --help`` shows them in this order.
_Group = argparse._ArgumentGroup


def _add_key_sources(keys: _Group) -> None:
    keys.add_argument(
        "--keys",
        default=_env("SIDE_POOL_KEYS"),
        metavar="K1,K2",
        help="comma-separated provider keys, named key-1..N (env SIDE_POOL_KEYS)",
    )
    keys.add_argument(
        "--provider",
        default=_env("SIDE_POOL_PROVIDER", "groq"),
        help="provider of --keys (env SIDE_POOL_PROVIDER; default groq)",
    )
    keys.add_argument(
        "--base-url",
        default=_env("SIDE_POOL_BASE_URL"),
        help="upstream base URL incl. /v1 for --keys; default: the provider's "
        "public one (env SIDE_POOL_BASE_URL)",
    )
    keys.add_argument(
        "--file",
        default=_env("SIDE_POOL_FILE"),
        metavar="POOL.YAML",
        help="YAML with CreditPool, PoolKey and Secret manifests, reloaded on "
        "change (env SIDE_POOL_FILE)",
    )
    keys.add_argument(
        "--reload-interval",
        type=float,
        default=_env("SIDE_POOL_FILE_POLL_SECONDS", "1.0"),
        help="seconds between checks of --file (env SIDE_POOL_FILE_POLL_SECONDS; default 1)",
    )
    keys.add_argument(
        "--pool",
        default=_env("SIDE_POOL_NAME"),
        metavar="NAME",
        help="cluster mode: serve this CreditPool from the Kubernetes API; with "
        "--file: which CreditPool of the file (env SIDE_POOL_NAME)",
    )
    keys.add_argument(
        "--namespace",
        default=_env("SIDE_POOL_NAMESPACE"),
        help="cluster mode: the pool's namespace; default: the pod's own (env SIDE_POOL_NAMESPACE)",
    )
    keys.add_argument(
        "--kubeconfig",
        default=_env("KUBECONFIG"),
        help="cluster mode: kubeconfig file; default: in-cluster credentials (env KUBECONFIG)",
    )


def _add_listening(net: _Group) -> None:
    net.add_argument(
        "--host",
        default=_env("SIDE_PROXY_HOST", "127.0.0.1"),
        help="listen address (env SIDE_PROXY_HOST; default 127.0.0.1)",
    )
    net.add_argument(
        "--port",
        type=int,
        default=_env("SIDE_PROXY_PORT", "8080"),
        help="listen port (env SIDE_PROXY_PORT; default 8080)",
    )
    net.add_argument(
        "--virtual-keys",
        default=_env("SIDE_PROXY_VIRTUAL_KEYS"),
        metavar="VK1,VK2",
        help="comma-separated keys clients must present as 'Authorization: Bearer' "
        "or 'x-api-key' (env SIDE_PROXY_VIRTUAL_KEYS)",
    )
    net.add_argument(
        "--no-auth",
        action="store_true",
        default=_env_flag("SIDE_PROXY_NO_AUTH"),
        help="allow serving without client auth: listening beyond loopback without virtual "
        "keys, or (cluster mode) a CreditPool with clientAuth.disabled, which is refused "
        "otherwise; anyone who can reach the port spends your keys (env SIDE_PROXY_NO_AUTH=1)",
    )


def _add_limits(limits: _Group) -> None:
    limits.add_argument(
        "--max-body-size",
        type=_size,
        default=_env("SIDE_PROXY_MAX_BODY_BYTES", "16MiB"),
        help="largest request body, 413 above (env SIDE_PROXY_MAX_BODY_BYTES; default 16MiB)",
    )
    limits.add_argument(
        "--max-header-size",
        type=_size,
        default=_env("SIDE_PROXY_MAX_HEADER_BYTES", "8190"),
        help="longest request line / header line (env SIDE_PROXY_MAX_HEADER_BYTES; default 8190)",
    )
    limits.add_argument(
        "--max-headers",
        type=int,
        default=_env("SIDE_PROXY_MAX_HEADERS", "128"),
        help="most header lines per request, 400 above (env SIDE_PROXY_MAX_HEADERS; default 128)",
    )
    limits.add_argument(
        "--body-read-timeout",
        type=float,
        default=_env("SIDE_PROXY_BODY_READ_TIMEOUT", "30"),
        help="seconds a client may take to send its request body, 408 after that "
        "(slow clients, slowloris) (env SIDE_PROXY_BODY_READ_TIMEOUT; default 30)",
    )
    limits.add_argument(
        "--keepalive-timeout",
        type=float,
        default=_env("SIDE_PROXY_KEEPALIVE_TIMEOUT", "75"),
        help="idle client connections close after this many seconds; also the longest a new "
        "connection may take to send its headers (env SIDE_PROXY_KEEPALIVE_TIMEOUT; default 75)",
    )
    limits.add_argument(
        "--buffer-limit",
        type=_size,
        default=_env("SIDE_PROXY_BUFFER_BYTES", "1MiB"),
        help="sized responses up to this are read whole (still retryable if "
        "they break off); larger ones stream (env SIDE_PROXY_BUFFER_BYTES; "
        "default 1MiB)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_env("SIDE_PROXY_SHUTDOWN_TIMEOUT", "30"),
        help="on SIGTERM, seconds in-flight requests and streams get to finish "
        "(env SIDE_PROXY_SHUTDOWN_TIMEOUT; default 30)",
    )
    limits.add_argument(
        "--workers",
        type=int,
        default=_env("SIDE_PROXY_WORKERS", "1"),
        help="processes sharing the port (SO_REUSEPORT); each has its own pool "
        "state (env SIDE_PROXY_WORKERS; default 1)",
    )
    limits.add_argument(
        "--connection-limit",
        type=int,
        default=_env("SIDE_PROXY_UPSTREAM_CONNECTIONS", "0"),
        help="most upstream connections, 0 for no limit (env "
        "SIDE_PROXY_UPSTREAM_CONNECTIONS; default 0)",
    )


def _add_logging(logs: _Group) -> None:
    logs.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("SIDE_PROXY_LOG_FORMAT", "text"),
        help="text or json lines (env SIDE_PROXY_LOG_FORMAT; default text)",
    )
    logs.add_argument(
        "--log-level",
        default=_env("SIDE_PROXY_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="(env SIDE_PROXY_LOG_LEVEL; default INFO)",
    )
    logs.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=_env_flag("SIDE_PROXY_ACCESS_LOG", True),
        help="one line per request at INFO (env SIDE_PROXY_ACCESS_LOG; default on)",
    )


def _fail(message: str) -> int:
    print(f"sideproxy serve: {message}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    from sideproxy import translate  # noqa: PLC0415
    from sideproxy.proxy import (  # noqa: PLC0415
        ConfigSource,
        EnvSource,
        FileSource,
        ProxySettings,
        configure_logging,
        load_file,
        serve,
    )

    configure_logging(args.log_format, args.log_level)
    pool_keys = _split(args.keys)
    virtual_keys = tuple(_split(args.virtual_keys))
    cluster = bool(args.pool) and not args.file
    modes = [name for name, on in (("SIDE_POOL_KEYS", pool_keys), ("--file", args.file),
                                   ("--pool (cluster)", cluster)) if on]  # fmt: skip
    if len(modes) > 1:
        return _fail(f"choose one source of keys, not {' and '.join(modes)}")
    if not modes:
        return _fail(
            "no keys: set SIDE_POOL_KEYS=k1,k2 (standalone), --file pool.yaml, or --pool NAME "
            "(cluster mode)"
        )
    if args.workers < 1:
        return _fail("--workers must be at least 1")

    source: ConfigSource
    table_auth = False
    if pool_keys:
        env_source = EnvSource(pool_keys, args.provider, args.base_url)
        try:
            env_source.load()
        except ValueError as exc:
            return _fail(str(exc))
        source = env_source
    elif args.file:
        try:
            first = load_file(args.file, args.pool)
        except OSError as exc:
            return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
        except (translate.ManifestError, ValueError) as exc:
            return _fail(str(exc))
        table_auth = first.table.settings.client_auth_required
        source = FileSource(args.file, pool=args.pool, interval=args.reload_interval)
    else:
        # Cluster mode only: the Kubernetes client is not loaded for the other modes.
        from sideproxy.proxy.kube import KubeSource  # noqa: PLC0415

        source = KubeSource(args.pool, args.namespace, args.kubeconfig)

    # Cluster mode: the CreditPool's clientAuth decides who may call, but a pool that turns it
    # off is served beyond loopback only with an explicit --no-auth too (two owners must agree
    # to run open). A pool file served beyond loopback keeps its client auth across reloads.
    # Loopback stays exempt, as in standalone mode: only the pod's (or host's) own processes
    # can reach it.
    beyond_loopback = not _is_loopback(args.host)
    require_auth = (
        beyond_loopback and not args.no_auth and not virtual_keys and (cluster or table_auth)
    )
    if cluster and beyond_loopback and not virtual_keys:
        if args.no_auth:
            log.warning(
                "--no-auth: a CreditPool with clientAuth.disabled is served to anyone who can "
                "reach %s:%d",
                args.host,
                args.port,
            )
        else:
            log.info(
                "cluster mode: a CreditPool with clientAuth.disabled will be refused (not "
                "ready) unless --no-auth / SIDE_PROXY_NO_AUTH=1 is given"
            )
    if not (virtual_keys or table_auth or cluster):
        if _is_loopback(args.host):
            log.warning(
                "no virtual keys: any local process can use the pool through %s:%d",
                args.host,
                args.port,
            )
        elif args.no_auth:
            log.warning("--no-auth: serving %s:%d to anyone who can reach it", args.host, args.port)
        else:
            return _fail(
                f"refusing to listen on {args.host} without client auth: anyone who reaches "
                "the port would spend your keys. Set SIDE_PROXY_VIRTUAL_KEYS (or "
                "--virtual-keys), enable clientAuth in the pool file, or pass --no-auth if "
                "the network is trusted"
            )
    try:
        settings = ProxySettings(
            host=args.host,
            port=args.port,
            virtual_keys=virtual_keys,
            max_body_size=args.max_body_size,
            max_header_size=args.max_header_size,
            max_headers=args.max_headers,
            body_read_timeout=args.body_read_timeout,
            keepalive_timeout=args.keepalive_timeout,
            require_client_auth=require_auth,
            buffer_limit=args.buffer_limit,
            shutdown_timeout=args.shutdown_timeout,
            access_log=args.access_log,
            connection_limit=args.connection_limit,
        )
    except ValueError as exc:
        return _fail(str(exc))
    report = getattr(source, "report", None)
    return serve(settings, source, on_transitions=report, workers=args.workers)


# --------------------------------------------------------------------------- demo, diag, operator


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="watch keys rotate and cool down against a built-in fake provider (no network)",
        description="Starts a rate-limited fake provider and the proxy on loopback, sends "
        "traffic through the openai SDK, and shows the pool live. Exit 0 iff no client error.",
    )
    p.add_argument("--seconds", type=float, default=15.0, help="how long to run (default 15)")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second (default 10)")
    p.add_argument("--plain", action="store_true", help="plain lines instead of a live table")
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from sideproxy.demo import run_demo  # noqa: PLC0415
    from sideproxy.proxy import new_event_loop  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    loop = new_event_loop()
    try:
        return loop.run_until_complete(
            run_demo(args.seconds, args.rate, live=False if args.plain else None)
        )
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def _add_diag(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sideproxy import diag  # noqa: PLC0415

    p = sub.add_parser(
        "diag",
        help="N concurrent chat completions against a proxy: statuses, latency, key spread",
        description=diag.__doc__,
    )
    diag.add_arguments(p)
    p.set_defaults(run=diag.run)


def _add_operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        default=_split(_env("SIDE_OPERATOR_NAMESPACES")),
        help="namespace to watch; repeatable; none = all (env "
        "SIDE_OPERATOR_NAMESPACES, comma-separated)",
    )
    p.add_argument(
        "--liveness",
        default=_env("SIDE_OPERATOR_LIVENESS"),
        help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz (env SIDE_OPERATOR_LIVENESS)",
    )
    p.add_argument(
        "--kubeconfig",
        default=_env("KUBECONFIG"),
        help="kubeconfig file; default: in-cluster credentials (env KUBECONFIG)",
    )
    p.set_defaults(run=_operator)  # fmt: skip


def _operator(args: argparse.Namespace) -> int:
    try:
        from sideproxy.operator import run  # noqa: PLC0415 - kopf only for this command
    except ImportError as exc:
        print(f"sideproxy operator: not available ({exc})", file=sys.stderr)
        return 2
    return int(run(namespaces=list(args.namespaces), liveness=args.liveness,
                   kubeconfig=args.kubeconfig))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from sideproxy import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="sideproxy",
        description="Pool N LLM API keys behind one OpenAI-compatible virtual key.",
    )
    parser.add_argument("--version", action="version", version=f"sideproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_demo(sub)
    _add_diag(sub)
    _add_operator(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
