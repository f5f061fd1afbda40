"""`spendgate onboard`: the lines a developer pastes, or the setup script they run; and the gateway CA."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer
from mitmproxy import certs

from spendgate import onboarding
from spendgate.cli.common import ConfigOpt, err, open_db, settings_from
from spendgate.keys import parse_key
from spendgate.onboarding import PublicAddress, ca_fingerprint, public_address
from spendgate.onboarding.script import setup_script
from spendgate.onboarding.shells import Shell, pasted_lines
from spendgate.settings import Settings
from spendgate.store.keys import KeyStore

CA_NAME = onboarding.CA_NAME


def ca_cert_path(settings: Settings) -> Path:
    return onboarding.ca_cert_path(settings.proxy.confdir)


def ensure_ca(settings: Settings) -> Path:
    """Create the CA the same way mitmproxy would at start-up, if it is not there yet."""
    settings.proxy.confdir.mkdir(parents=True, exist_ok=True)
    path = ca_cert_path(settings)
    if not path.exists():
        certs.CertStore.from_store(str(settings.proxy.confdir), CA_NAME, 2048)
    return path


def gateway_address(settings: Settings) -> PublicAddress:
    """Where developers reach the proxy; says on stderr when that is a guess."""
    address = public_address(settings.proxy, socket.gethostname())
    if address.note:
        err.print(f"[yellow]note:[/yellow] {address.note}")
    return address


def onboard_lines(settings: Settings, user: str, key: str | None = None, shell: Shell = Shell.bash) -> list[str]:
    """The lines `onboard`, `keys create` and `keys rotate` print."""
    ca = ensure_ca(settings)
    return pasted_lines(gateway_address(settings), user, key, shell, ca_fingerprint(ca.read_text()))


def onboard(
    user: str,
    script: Annotated[bool, typer.Option(
        "--script", help="Print a setup script the developer runs on their own machine instead.")] = False,
    shell: Annotated[Shell, typer.Option("--shell", help="The developer's shell.")] = Shell.bash,
    key: Annotated[Optional[str], typer.Option(
        "--key", help="Write this sg_ key in (else the developer adds theirs; the script asks).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the environment lines a developer pastes (proxy, CA trust, API-key variables, Node), or with
    --script a setup script that builds the trust bundle on their machine and writes the lines."""
    settings = settings_from(config)
    _check_user(settings, user, key)
    if not script:
        for line in onboard_lines(settings, user, key, shell):
            print(line)
        return
    ca = ensure_ca(settings)
    print(setup_script(gateway_address(settings), user, key, shell, ca.read_text()), end="")


def _check_user(settings: Settings, user: str, key: str | None) -> None:
    """Onboarding someone who has no working key would hand out lines that cannot work."""
    keys = [k for k in KeyStore(open_db(settings)).list_keys() if k.user == user]
    if not keys:
        err.print(f"[red]no user {user!r}:[/red] mint a key first: spendgate keys create {user}")
        raise typer.Exit(1)
    active = {k.key_id for k in keys if k.state == "active"}
    if not active:
        err.print(f"[red]{user!r} has no active key[/red] ({', '.join(sorted({k.state for k in keys}))}): "
                  f"mint one with `spendgate keys create {user}`")
        raise typer.Exit(1)
    if key is not None:
        parsed = parse_key(key)
        if parsed is None:
            raise typer.BadParameter("not a Spendgate key (sg_<id>_<secret>)", param_hint="--key")
        if parsed.key_id not in active:
            raise typer.BadParameter(f"key {parsed.key_id} is not an active key of {user}; see `spendgate keys list`",
                                     param_hint="--key")
