# spangate: the gateway as a container. The database lives in the /data volume; mount a
# spangate.yaml (with auth.keys: the server listens on all interfaces) at /app/spangate.yaml.
#
#   docker build -t spangate .
#   docker run -p 8400:8400 -v spangate-data:/data \
#     -v "$PWD/spangate.yaml:/app/spangate.yaml:ro" --stop-timeout 40 spangate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    SPANGATE_DB=/data/spangate.db

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . \
    && useradd --system --create-home --uid 10001 --user-group spangate \
    && mkdir -p /data \
    && chown spangate:spangate /data

USER spangate
VOLUME ["/data"]
EXPOSE 8400

# /health/live needs no key; python is there, curl is not.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8400/health/live', timeout=2)"]

# Exec form, so spangate is PID 1 and gets SIGTERM: it finishes in-flight calls and drains
# the recorder before exiting (allow for it with `docker run --stop-timeout 40`).
ENTRYPOINT ["spangate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8400", "--db", "/data/spangate.db"]
