# openrouter-proxy container image (docs/deploy.md).
#
#   docker build -t openrouter-proxy .
#   docker run -p 8080:8080 -e OPENROUTER_API_KEY \
#     -v "$PWD/config.yaml:/etc/openrouter-proxy/config.yaml:ro" \
#     -v "$PWD/policies:/etc/openrouter-proxy/policies:ro" openrouter-proxy
#
# The builder installs the project into /opt/venv; the runtime image copies only that venv
# (same base image, so the venv's interpreter path is the same), runs as a non-root user and
# reads its config from $PROXY_CONFIG. Secrets come from the environment only.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install /tmp/wheels/*.whl \
    && /opt/venv/bin/openrouter-proxy --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROXY_CONFIG=/etc/openrouter-proxy/config.yaml
# Relative paths in the config resolve against its folder: var/ (the usage log) points at
# the writable /var/lib/openrouter-proxy, so mount config.yaml and policies/ read-only.
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin proxy \
    && mkdir -p /etc/openrouter-proxy/policies /var/lib/openrouter-proxy \
    && ln -s /var/lib/openrouter-proxy /etc/openrouter-proxy/var \
    && chown proxy:proxy /var/lib/openrouter-proxy
COPY --from=builder /opt/venv /opt/venv
COPY config.yaml /etc/openrouter-proxy/config.yaml
COPY policies/ /etc/openrouter-proxy/policies/
USER 10001:10001
WORKDIR /var/lib/openrouter-proxy
VOLUME ["/var/lib/openrouter-proxy"]
EXPOSE 8080
# SIGTERM: stop accepting, drain in-flight streams for server.drain_timeout_s, flush, exit.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["openrouter-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
# Extra serve arguments, e.g. `docker run ... openrouter-proxy --workers 2`.
CMD []
