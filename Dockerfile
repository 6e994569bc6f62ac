# Bulwark images, one file, two targets:
#   docker build --target api    -t bulwark-api .     # FastAPI + migrations; no torch
#   docker build --target worker -t bulwark-worker .  # Celery GPU worker on a CUDA base
# Both run the same source tree from /app as the unprivileged user "bulwark"; the shared
# artifact store is the volume at /data.

# ---- API: a slim Python image without torch ----------------------------------------------
FROM python:3.11.11-slim-bookworm AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/app \
    BULWARK_DATA_DIR=/data
WORKDIR /app
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install --no-cache-dir -r /tmp/requirements-api.txt \
    && useradd --create-home --uid 10001 bulwark \
    && mkdir -p /data && chown bulwark /data
COPY alembic.ini ./
COPY migrations ./migrations
COPY pyproject.toml README.md ./
COPY bulwark ./bulwark
COPY catalog ./catalog
COPY common ./common
COPY core ./core
COPY api ./api
# The package's metadata (its version, served by the API); the dependencies are installed above.
RUN pip install --no-cache-dir --no-deps .
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "bulwark.cli", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

# ---- worker: PyTorch on CUDA 12.4 ------------------------------------------------------------
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/app \
    BULWARK_DATA_DIR=/data
WORKDIR /app
COPY docker/requirements-api.txt docker/requirements-worker.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements-worker.txt \
    && useradd --create-home --uid 10001 bulwark \
    && mkdir -p /data && chown bulwark /data
COPY alembic.ini ./
COPY migrations ./migrations
COPY pyproject.toml README.md ./
COPY bulwark ./bulwark
COPY catalog ./catalog
COPY common ./common
COPY core ./core
COPY api ./api
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps .
# This image converts ONNX uploads (onnx2torch with the base image's torchvision); an API
# paired with these workers sets the same flag (docker-compose.yml).
ENV BULWARK_ONNX_ENABLED=true
USER 10001
CMD ["python", "-m", "bulwark.cli", "worker", "--concurrency", "1"]
