"""The gateway CA and the lines a developer pastes to use the gateway."""

from __future__ import annotations

import ssl
from pathlib import Path

from mitmproxy import certs

from spendgate.settings import Settings

CA_NAME = "mitmproxy"  # mitmproxy's confdir layout: mitmproxy-ca-cert.pem etc.
BUNDLE_NAME = "spendgate-ca-bundle.pem"


def ca_cert_path(settings: Settings) -> Path:
    return settings.proxy.confdir / f"{CA_NAME}-ca-cert.pem"


def ensure_ca(settings: Settings) -> Path:
    """Create the CA the same way mitmproxy would at start-up, if it is not there yet."""
    settings.proxy.confdir.mkdir(parents=True, exist_ok=True)
    path = ca_cert_path(settings)
    if not path.exists():
        certs.CertStore.from_store(str(settings.proxy.confdir), CA_NAME, 2048)
    return path


def _system_ca_file() -> Path | None:
    paths = ssl.get_default_verify_paths()
    for cand in (paths.cafile, paths.openssl_cafile,
                 "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if cand and Path(cand).is_file():
            return Path(cand)
    try:
        import certifi

        return Path(certifi.where())
    except ImportError:
        return None


def ensure_bundle(settings: Settings) -> Path:
    """System CAs plus the gateway CA: the trust variables replace the system store, so both are needed."""
    ca = ensure_ca(settings)
    bundle = settings.proxy.confdir / BUNDLE_NAME
    system = _system_ca_file()
    parts = [system.read_text()] if system else []
    parts.append(ca.read_text())
    text = "\n".join(p.rstrip("\n") + "\n" for p in parts)
    if not bundle.exists() or bundle.read_text() != text:
        bundle.write_text(text)
    return bundle


def onboard_lines(settings: Settings, user: str, key: str | None = None) -> list[str]:
    bundle = ensure_bundle(settings)
    listen = settings.proxy.listen
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "::", "") else listen.host
    secret = key or "<your sg_ key>"
    proxy = f"http://{user}:{secret}@{host}:{listen.port}"
    return [
        f'export HTTPS_PROXY="{proxy}"',
        f'export HTTP_PROXY="{proxy}"',
        'export NO_PROXY="localhost,127.0.0.1,::1"',
        f'export SSL_CERT_FILE="{bundle}"',
        f'export REQUESTS_CA_BUNDLE="{bundle}"',
        f'export CURL_CA_BUNDLE="{bundle}"',
        f'export NODE_EXTRA_CA_CERTS="{bundle}"',
        f'export GIT_SSL_CAINFO="{bundle}"',
    ]
