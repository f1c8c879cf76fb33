"""The Dockerfile and the compose example agree with what costtap writes and listens on.

No container runs here; the files are read and checked against costtap's own constants.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from costtap.proxy.ca import CONF_BASENAME
from costtap.proxy.master import BUNDLE_FILE

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_ports_and_paths() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert "COSTTAP_LISTEN=0.0.0.0:8080" in dockerfile
    assert "COSTTAP_ADMIN=0.0.0.0:9090" in dockerfile
    assert re.search(r"EXPOSE 8080 9090", dockerfile)
    assert "http://127.0.0.1:9090/healthz" in dockerfile
    assert "COSTTAP_DATA_DIR=/data" in dockerfile
    assert 'ENTRYPOINT ["costtap"]' in dockerfile
    # The image runs as an unprivileged user that owns the data volume.
    assert "USER costtap" in dockerfile
    assert "chown costtap /data" in dockerfile


def test_compose_service_trusts_the_written_bundle() -> None:
    compose = yaml.safe_load((ROOT / "examples" / "docker-compose.yml").read_text())
    service = compose["services"]["service"]
    costtap = compose["services"]["costtap"]

    assert "costtap-data:/data" in costtap["volumes"]
    assert "costtap-data:/costtap:ro" in service["volumes"]
    # costtap writes DATA_DIR/ca/BUNDLE_FILE; the service mounts DATA_DIR at /costtap.
    assert service["environment"]["SSL_CERT_FILE"] == f"/costtap/ca/{BUNDLE_FILE}"
    assert service["environment"]["REQUESTS_CA_BUNDLE"] == f"/costtap/ca/{BUNDLE_FILE}"
    assert (
        service["environment"]["NODE_EXTRA_CA_CERTS"] == f"/costtap/ca/{CONF_BASENAME}-ca-cert.pem"
    )
    assert service["environment"]["HTTPS_PROXY"].endswith("@costtap:8080")
    assert costtap["environment"]["COSTTAP_APPS"] == "/config/costtap.yaml"
