# syntax=docker/dockerfile:1
# Multi-stage: build a virtualenv with the project, then copy it into a slim runtime image.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY rules ./rules
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim AS runtime
# OpenBLAS threads: one per worker; several workers on few cores must not oversubscribe.
ENV PATH=/opt/venv/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    UPSELL_HOST=0.0.0.0 \
    UPSELL_PORT=8000 \
    UPSELL_STATE_DIR=/var/lib/upsell/state \
    UPSELL_ARTIFACTS_DIR=/var/lib/upsell/artifacts \
    UPSELL_DATA_DIR=/var/lib/upsell/data
RUN useradd --system --uid 10001 --home-dir /var/lib/upsell --create-home upsell
COPY --from=build /opt/venv /opt/venv
USER upsell
WORKDIR /var/lib/upsell
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=1).status != 200)"]
# Artifacts and snapshots come from a volume or Redis; `upsell demo` builds them from the
# bundled sample for a try-out: docker run -p 8000:8000 IMAGE upsell demo
CMD ["upsell", "serve"]
