"""costtap's certificate authority and the trust bundle that services use.

mitmproxy finds the CA in its confdir under fixed names; costtap creates it there first so
that it carries costtap's name. The private key file is written with mode 0600.
"""

from __future__ import annotations

import os
from pathlib import Path

import certifi
from mitmproxy.certs import CertStore

# mitmproxy's fixed file names in its confdir (mitmproxy.options.CONF_BASENAME).
CONF_BASENAME = "mitmproxy"
KEY_SIZE = 2048


def ca_dir(data_dir: Path) -> Path:
    return data_dir / "ca"


def ca_cert_path(data_dir: Path) -> Path:
    """Return the certificate that clients trust (public, no key)."""
    return ca_dir(data_dir) / f"{CONF_BASENAME}-ca-cert.pem"


def ca_key_path(data_dir: Path) -> Path:
    return ca_dir(data_dir) / f"{CONF_BASENAME}-ca.pem"


def ensure_ca(data_dir: Path) -> Path:
    """Create the CA in `data_dir` unless one exists; return the certificate path."""
    key_path = ca_key_path(data_dir)
    if not key_path.exists():
        CertStore.create_store(
            ca_dir(data_dir), CONF_BASENAME, KEY_SIZE, organization="costtap", cn="costtap CA"
        )
    # The key file contains the private key and the certificate, so only the owner may read it.
    os.chmod(key_path, 0o600)
    return ca_cert_path(data_dir)


def write_bundle(data_dir: Path, bundle_path: Path) -> Path:
    """Write certifi's public roots followed by costtap's CA to `bundle_path`.

    A service whose SSL_CERT_FILE names costtap's CA alone could reach no other TLS host,
    because that variable replaces the trust list instead of adding to it.
    """
    cert = ensure_ca(data_dir).read_text(encoding="utf-8")
    public_roots = Path(certifi.where()).read_text(encoding="utf-8")
    bundle_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = bundle_path.with_name(bundle_path.name + ".tmp")
    temporary.write_text(public_roots.rstrip("\n") + "\n\n# costtap CA\n" + cert, encoding="utf-8")
    temporary.replace(bundle_path)
    return bundle_path
