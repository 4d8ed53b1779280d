# spkserve container image.
#   CPU:  docker build -t spkserve .
#   CUDA: docker build -t spkserve:cuda --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg ORT=onnxruntime-gpu .
# The install steps are the project's own scripts (scripts/setup.sh), as in the README.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG ORT=onnxruntime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive

# one Python: the base image's (python:*-slim has it; a CUDA base gets Debian/Ubuntu's)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 ca-certificates \
 && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 spkserve \
 && mkdir /data && chown spkserve:spkserve /data

WORKDIR /app
COPY --chown=spkserve:spkserve . /app
USER spkserve
RUN PYTHON=python3 bash scripts/setup.sh \
 && if [ "$ORT" != "onnxruntime" ]; then \
      .venv/bin/pip uninstall -y onnxruntime && .venv/bin/pip install --no-cache-dir "$ORT"; \
    fi \
 && rm -rf /home/spkserve/.cache

# the metrics port is published by the container runtime; keep it on a private network
ENV SPKSERVE_DATA_DIR=/data SPKSERVE_HOST=0.0.0.0 SPKSERVE_METRICS_HOST=0.0.0.0
VOLUME ["/data"]
EXPOSE 50051 8080 9090
# grpc.health.v1 on the configured port, over TLS when tls_cert is set ($SPKSERVE_CONFIG / SPKSERVE_* variables)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD [".venv/bin/python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT [".venv/bin/spkserve", "serve"]
