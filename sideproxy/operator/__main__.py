"""``python -m sideproxy.operator [-n NAMESPACE ...] [--liveness URL] [--kubeconfig PATH]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sideproxy.operator import run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sideproxy.operator",
        description="Run the Side Proxy operator (CreditPool/PoolKey -> routing table).",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="namespace to watch (repeatable); none: the whole cluster",
    )
    parser.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--kubeconfig",
        default=None,
        metavar="PATH",
        help="kubeconfig file; default: in-cluster service account, else $KUBECONFIG",
    )
    args = parser.parse_args(argv)
    return run(args.namespaces, args.liveness, args.kubeconfig)


if __name__ == "__main__":
    raise SystemExit(main())
