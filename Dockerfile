# wyoming-cosyvoice, CPU image: the Wyoming TTS server with the embedded espeak-ng engine (no GPU, no model).
#   docker build -t wyoming-cosyvoice .
#   docker run -d -p 10200:10200 -v wyoming-cosyvoice-data:/data wyoming-cosyvoice
# The GPU image (CosyVoice on NVIDIA CUDA) is Dockerfile.gpu; docker-compose.yml runs either; docs/install.md "Docker".
# BASE_IMAGE is any Debian-like image with python3 (3.10-3.13) and its venv module; a test builds on a local one.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Pip settings for the build only (an index mirror, a CA bundle path): passed with --build-arg, not kept in the
# final image. None is set by default.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
RUN python3 -m venv /opt/venv && /opt/venv/bin/python -m pip install --no-cache-dir --quiet --upgrade pip
COPY pyproject.toml MANIFEST.in README.md LICENSE NOTICE /src/
COPY wyoming_cosyvoice /src/wyoming_cosyvoice
COPY plugins /src/plugins
COPY config/server.yaml config/voices.yaml /src/config/
COPY asset /src/asset
# zeroconf: Home Assistant discovers the server when it runs with --zeroconf on the host network; web: the studio;
# metrics: /metrics.
RUN /opt/venv/bin/python -m pip install --no-cache-dir --quiet "/src[web,zeroconf,metrics]"

FROM ${BASE_IMAGE}
COPY --from=build /opt/venv /opt/venv
COPY LICENSE NOTICE /usr/share/doc/wyoming-cosyvoice/
COPY docker/entrypoint.sh /usr/local/bin/wyoming-cosyvoice-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    WYOMING_COSYVOICE_DATA=/data \
    PYTHONUNBUFFERED=1
VOLUME /data
WORKDIR /data
# 10200: Wyoming; 10201: the voice studio (served only with WYOMING_COSYVOICE_WEB_TOKEN set, or --web).
EXPOSE 10200 10201
# Healthy when the server answers Wyoming's `describe` (what Home Assistant asks) on its port.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["wyoming-cosyvoice", "describe", "--uri", "tcp://127.0.0.1:10200", "--timeout", "10"]
# SIGTERM (docker stop) lets requests in flight finish within limits.shutdown_grace_s (10 s), then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["wyoming-cosyvoice-entrypoint"]
