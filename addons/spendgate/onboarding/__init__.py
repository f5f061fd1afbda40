"""What a developer's workstation needs to use the gateway: the address it reaches the proxy at,
the files the gateway serves to anyone (its public CA certificate, the Node preload), and the
environment it sets. Shell syntax lives in `shells`, the setup scripts in `script`. Pure: no I/O.

The CA variables replace a tool's trust store, so they point at a bundle *on the workstation*:
that machine's own system CAs plus the gateway CA, at `~/.spendgate/ca-bundle.pem`. The bundle
is built there (by the setup script, or the one-liner `onboard` prints), never on the gateway.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from spendgate.settings import ProxySettings

CA_NAME = "mitmproxy"  # mitmproxy's confdir layout: mitmproxy-ca-cert.pem (public), mitmproxy-ca.pem (with key)
ASSETS = Path(__file__).resolve().parent.parent / "onboarding_assets"
NODE_PRELOAD = ASSETS / "node-proxy.cjs"

# Served by the proxy port itself to plain-HTTP requests addressed to the gateway, without credentials.
CA_URL_PATH = "/spendgate/ca.pem"
NODE_PRELOAD_URL_PATH = "/spendgate/node-proxy.cjs"

# On the workstation, under the home directory.
HOME_DIR = ".spendgate"
BUNDLE_FILE = "ca-bundle.pem"
GATEWAY_CA_FILE = "gateway-ca.pem"
NODE_PRELOAD_FILE = "node-proxy.cjs"

CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")
API_KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
# What tools that insist on an API key get. The gateway identifies the developer by the proxy
# credentials, removes this and sets the team's key. Not the gateway key: a tool that bypassed
# the proxy would hand that to the provider. Not `sk-…`: that is refused as a provider key.
API_KEY_PLACEHOLDER = "spendgate"
KEY_PLACEHOLDER = "<your sg_ key>"  # in lines printed without a key: the developer puts theirs in
NO_PROXY = "localhost,127.0.0.1,::1"
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def ca_cert_path(confdir: Path) -> Path:
    """The CA certificate only (no private key): the one file that may be handed out."""
    return confdir / f"{CA_NAME}-ca-cert.pem"


def ca_fingerprint(pem: str) -> str:
    """SHA-256 of the certificate (DER), upper-case hex: what the setup script checks the download against."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")).hexdigest().upper()


@dataclass(frozen=True)
class PublicAddress:
    """Where developers reach the proxy. `note` says why it is a guess, when it is one."""

    host: str
    port: int
    note: str | None = None

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    @property
    def ca_url(self) -> str:
        return self.url + CA_URL_PATH

    @property
    def node_preload_url(self) -> str:
        return self.url + NODE_PRELOAD_URL_PATH


def public_address(proxy: ProxySettings, hostname: str) -> PublicAddress:
    """`[proxy] public_url`, else the listen address; a wildcard listen becomes `hostname` (with a note)."""
    if proxy.public_url:
        rest = proxy.public_url.removeprefix("http://")
        host, _, port = rest.rpartition(":")
        return PublicAddress(host.strip("[]"), int(port))
    listen = proxy.listen
    if listen.host in WILDCARD_HOSTS:
        return PublicAddress(hostname.lower(), listen.port,
                             f"[proxy] public_url is not set and the proxy listens on {listen}: the lines use this "
                             f"machine's hostname {hostname!r}. Set [proxy] public_url to the address developers "
                             "reach, e.g. \"http://gateway.internal:8080\".")
    if listen.host in ("127.0.0.1", "::1", "localhost"):
        return PublicAddress(listen.host, listen.port,
                             f"the proxy listens on {listen}, which only this machine reaches: developers on other "
                             "machines need listen = \"0.0.0.0:PORT\" and [proxy] public_url.")
    return PublicAddress(listen.host, listen.port)


def proxy_url(address: PublicAddress, user: str, key: str) -> str:
    """`http://USER:KEY@host:port`, both URL-encoded: `ana@corp` must still give a URL curl accepts."""
    return f"http://{quote(user, safe='')}:{quote(key, safe='')}@{address.url.removeprefix('http://')}"


@dataclass(frozen=True)
class Ref:
    """A place in a value each shell writes its own way: the developer's `~/.spendgate`, or their key."""

    name: str


HOME = Ref("home")
KEY = Ref("key")
Part = str | Ref


@dataclass(frozen=True)
class Variable:
    name: str
    value: tuple[Part, ...]


def environment(address: PublicAddress, user: str) -> list[Variable]:
    """The variables, in the order they are printed. NODE_OPTIONS is separate (`node_preload_option`):
    it is prepended to whatever the developer already has."""
    proxy = (f"http://{quote(user, safe='')}:", KEY, f"@{address.url.removeprefix('http://')}")
    out = [Variable("HTTPS_PROXY", proxy), Variable("HTTP_PROXY", proxy), Variable("NO_PROXY", (NO_PROXY,))]
    out += [Variable(name, (HOME, "/" + BUNDLE_FILE)) for name in CA_VARS]
    out += [Variable(name, (API_KEY_PLACEHOLDER,)) for name in API_KEY_VARS]
    out.append(Variable("NODE_USE_ENV_PROXY", ("1",)))  # Node >= 24: fetch honours HTTPS_PROXY itself
    return out


LOWER_CASE_TOO = frozenset({"HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"})  # curl reads only http_proxy for http://


def node_preload_option() -> tuple[Part, ...]:
    """Node 20/22: `--require` the preload that makes fetch() honour HTTPS_PROXY (see node-proxy.cjs)."""
    return ('--require "', HOME, "/" + NODE_PRELOAD_FILE + '"')
