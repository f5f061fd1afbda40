"""A developer's machine for onboarding tests: its own system CAs, an intranet TLS server they
sign, and the setup script from ``spendgate onboard USER --script`` run there.

The machine is a directory: a fresh ``HOME``, and a "system" CA bundle the setup script is pointed
at with ``SPENDGATE_SYSTEM_CA`` (the script's own probe would read this host's real store). Its
shells start from ``PATH`` and ``HOME`` only: whatever a tool sees afterwards comes from the files
the script wrote.

    machine = DevMachine(tmp_path)
    with machine.ca.tls_server("hello from the intranet") as intranet:
        machine.setup(gw, "ana@corp", key)
        out = machine.shell("curl -sS https://127.0.0.1:%d/" % intranet.port)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .gateway import GatewayProcess

SHELL_ARGV = {
    "bash": ["bash", "--norc", "--noprofile", "-c"],
    "zsh": ["zsh", "-f", "-c"],
    "fish": ["fish", "-c"],  # with its config: the script's conf.d file is what is under test
}
RC_LOADER = {"bash": '. "$HOME/.bashrc"\n', "zsh": '. "$HOME/.zshrc"\n', "fish": ""}


class ThrowawayCA:
    """A CA made for one test, and server certificates for 127.0.0.1 / localhost it signs."""

    def __init__(self, directory: Path, name: str = "Intranet Root CA (test)") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM).decode()
        self.path = directory / "ca.pem"
        self.path.write_text(self.pem)

    def server_cert(self) -> tuple[Path, Path]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intranet.test")]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = self.directory / "server.pem", self.directory / "server-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    @contextmanager
    def tls_server(self, text: str) -> Iterator[TlsServer]:
        """An HTTPS server on 127.0.0.1 answering ``text`` to every GET, with a certificate this CA signs."""
        cert, key = self.server_cert()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        body = text.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield TlsServer(server.server_address[1])
        finally:
            server.shutdown()
            server.server_close()


@dataclass(frozen=True)
class TlsServer:
    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


class DevMachine:
    """A fresh HOME whose "system" CAs are a throwaway CA's (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.ca = ThrowawayCA(root / "intranet-ca")
        self.system_ca = root / "system-ca-bundle.pem"  # what this machine's OS would trust
        self.system_ca.write_text(self.ca.pem)

    @property
    def spendgate_dir(self) -> Path:
        return self.home / ".spendgate"

    def base_env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def setup(self, gw: GatewayProcess, user: str, key: str | None = None, *, shell: str = "bash",
              env: Mapping[str, str] | None = None, script: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the script ``spendgate onboard USER --script --shell SHELL`` prints, as this machine's user.
        Without ``key`` the script gets it from SPENDGATE_KEY in ``env``."""
        if script is None:
            args = ["onboard", user, "--script", "--shell", shell] + (["--key", key] if key else [])
            script = gw.cli(*args).stdout
        path = self.root / f"spendgate-setup-{shell}.sh"
        path.write_text(script)
        run_env = self.base_env(SPENDGATE_SYSTEM_CA=str(self.system_ca), SPENDGATE_NO_NPM="1", **dict(env or {}))
        cp = subprocess.run(["sh", str(path)], env=run_env, cwd=self.home, capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"setup script failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
        return cp

    def shell(self, commands: str, *, shell: str = "bash", rc: bool = True, timeout: float = 60.0,
              env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``commands`` in a new ``shell`` that has only PATH and HOME, after its rc file (the script's line)."""
        script = (RC_LOADER[shell] if rc else "") + commands
        return subprocess.run([*SHELL_ARGV[shell], script], env=self.base_env(**dict(env or {})), cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def environment(self, *, shell: str = "bash") -> dict[str, str]:
        """The variables a new ``shell`` has after its rc file."""
        cp = self.shell("env -0", shell=shell)
        assert cp.returncode == 0, cp.stderr
        return dict(item.split("=", 1) for item in cp.stdout.split("\0") if "=" in item)
