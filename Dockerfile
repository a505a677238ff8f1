# syntax=docker/dockerfile:1
# Coalesce in a container. The build stage makes wheels of Coalesce (setup.py compiles
# protos/ with grpcio-tools, which stays in that stage) and of its runtime dependencies;
# the runtime stage installs only those, on a slim Python, and runs as a non-root user.
#
#   docker build -t coalesce .
#   docker run --stop-timeout 15 -p 8500:8500 -p 9464:9464 \
#       -v "$PWD/routes.yaml:/etc/coalesce/routes.yaml:ro" coalesce
#
# The image serves the bundled example model until a routing config is mounted over
# /etc/coalesce/routes.yaml (in Kubernetes: a ConfigMap, see config/kubernetes/).
# --stop-timeout should exceed the config's grace_period_s (default 10 s) so the drain
# on SIGTERM is not cut short.
#
# Python backends with `requirements:` get a virtual environment built by Coalesce under
# $COALESCE_CACHE (/var/cache/coalesce here). Build it into a derived image, so a pod
# starts serving at once instead of installing at start:
#
#   FROM coalesce
#   COPY routes.yaml /etc/coalesce/routes.yaml
#   COPY models/ /models/
#   RUN coalesce prepare /etc/coalesce/routes.yaml
#
# (or run `coalesce prepare` in a Kubernetes init container with the cache on a shared
# emptyDir volume mounted at /var/cache/coalesce: see README → Managed Python runtimes).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY adapters/ adapters/
COPY proxy/ proxy/
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    COALESCE_CACHE=/var/cache/coalesce
# The wheels are bind-mounted from the build stage, so none of them stays in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels coalesce \
    && groupadd --system --gid 10001 coalesce \
    && useradd --system --uid 10001 --gid 10001 --no-create-home coalesce \
    && mkdir /etc/coalesce \
    && mkdir -p /var/cache/coalesce && chown 10001:10001 /var/cache/coalesce \
    && python -c "from coalesce.config import DEFAULT_CONFIG as c; print(c, end='')" \
       > /etc/coalesce/routes.yaml
USER 10001:10001
# gRPC front end (KServe v2, TF Serving, grpc.health.v1) and admin HTTP (/healthz, /readyz).
EXPOSE 8500 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["coalesce", "health", "--address", "127.0.0.1:8500", "--timeout", "3"]
ENTRYPOINT ["coalesce", "serve"]
CMD ["--config", "/etc/coalesce/routes.yaml", "--listen", "0.0.0.0:8500", "--admin", "0.0.0.0:9464"]
