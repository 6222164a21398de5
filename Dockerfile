# syntax=docker/dockerfile:1
# One image for both components of Side Proxy:
#   docker run IMAGE                         -> sideproxy serve (the proxy; the default CMD)
#   docker run IMAGE operator --namespace X  -> sideproxy operator
# The Helm chart (helm/sideproxy) runs it as ghcr.io/side-proxy/sideproxy:<appVersion>.
#
#   docker build -t ghcr.io/side-proxy/sideproxy:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#
# Runtime dependencies are pinned by constraints.txt (regenerate it when pyproject.toml's
# [project] dependencies change; tests/chart/test_image.py checks that it pins them all).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# The runtime venv has no pip of its own: the builder's pip installs into it (--python).
RUN python -m venv --without-pip /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when constraints.txt changes.
# Every runtime dependency ships a manylinux wheel for CPython 3.11, so no compiler is needed;
# --only-binary makes a missing wheel fail the build instead of compiling from an sdist.
COPY constraints.txt ./
RUN pip --python /opt/venv/bin/python install --no-cache-dir --only-binary=:all: \
        -r constraints.txt

# Then the package itself: build its wheel and install it under the same constraints, offline
# (so a dependency missing from constraints.txt fails the build here, not the pod at run time),
# check the result and compile it once, since the root filesystem is read-only at run time.
COPY pyproject.toml README.md ./
COPY sideproxy ./sideproxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip --python /opt/venv/bin/python install --no-cache-dir --no-index \
        --find-links /wheels -c constraints.txt side-proxy \
    && pip --python /opt/venv/bin/python check \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib

# ---------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="sideproxy" \
      org.opencontainers.image.description="Side Proxy: pools LLM provider API keys behind one OpenAI-compatible virtual key (operator and proxy)." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/side-proxy/sideproxy" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

# A fixed, unprivileged identity that matches the chart's runAsUser/runAsGroup (10001).
RUN groupadd --system --gid 10001 sideproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sideproxy

# Only the venv crosses over: no wheels, no sources, no build tools.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # Nothing is written outside /tmp (an emptyDir in the chart; the rest is read-only).
    HOME=/tmp \
    TMPDIR=/tmp

USER 10001:10001
WORKDIR /tmp

# 8080: the proxy (API, /healthz, /readyz, /metrics). 8081: the operator's liveness endpoint.
EXPOSE 8080 8081

ENTRYPOINT ["sideproxy"]
CMD ["serve"]
