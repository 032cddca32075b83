# syntax=docker/dockerfile:1
# Multi-stage: build a virtualenv with the project, then copy it into a slim runtime image.
# tests/test_container.py runs these steps outside Docker: the COPY'd paths alone build the
# project (sample and policies inside), and the HEALTHCHECK and CMD work with this ENV.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY rules ./rules
# Not editable: the package, its sample data and default policy are copied into the venv.
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim AS runtime
# OpenBLAS threads: one per worker; several workers on few cores must not oversubscribe.
ENV PATH=/opt/venv/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UPSELL_HOST=0.0.0.0 \
    UPSELL_PORT=8000 \
    UPSELL_STATE_DIR=/var/lib/upsell/state \
    UPSELL_ARTIFACTS_DIR=/var/lib/upsell/artifacts \
    UPSELL_DATA_DIR=/var/lib/upsell/data \
    NUMBA_CACHE_DIR=/var/lib/upsell/numba-cache
# A system user owning only its data directories (the code in /opt/venv stays root's, read-only
# to it). The directories exist in the image so that a named volume mounted on one starts out
# owned by that user.
RUN useradd --system --uid 10001 --home-dir /var/lib/upsell --create-home upsell \
 && mkdir -p /var/lib/upsell/state /var/lib/upsell/artifacts /var/lib/upsell/data \
 && chown -R upsell:upsell /var/lib/upsell
COPY --from=build /opt/venv /opt/venv
USER upsell
# The compiled rule loops (numba), built into the image in a cache the runtime user owns
# (numba uses only a cache directory it can write): workers load them instead of compiling
# at start-up; on a CPU unlike the build machine's, numba compiles again into the same place.
RUN python -c "import rules.constraints, rules.ranking, models.calibration; \
from rules.compiled import warm_up; warm_up()"
WORKDIR /var/lib/upsell
EXPOSE 8000
# Liveness on the port the service binds (UPSELL_PORT, read by Python: exec form expands no
# variables); exit status 1 when it does not answer 200 within a second.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('UPSELL_PORT', '8000'), timeout=1).status != 200)"]
# Artifacts and snapshots come from a volume and Redis (docker-compose.yml); `upsell demo`
# builds them from the bundled sample for a try-out: docker run -p 8000:8000 IMAGE upsell demo
CMD ["upsell", "serve"]
