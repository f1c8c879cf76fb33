# costtap as a sidecar image: the proxy with its embedded ledger, or remote mode when
# COST_TRACKER_BASE_URL is set. Data (CA files, ledger, outbox) lives in the /data volume;
# mount an apps file at /data/costtap.yaml or set COSTTAP_APPS.
FROM python:3.12-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY costtap ./costtap
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 costtap \
    && mkdir /data \
    && chown costtap /data

USER costtap
WORKDIR /data
# Inside a container the proxy and admin ports must listen beyond loopback; publish only
# the proxy port to the services that use it.
ENV COSTTAP_LISTEN=0.0.0.0:8080 \
    COSTTAP_ADMIN=0.0.0.0:9090 \
    COSTTAP_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080 9090

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["costtap"]
CMD ["run"]
