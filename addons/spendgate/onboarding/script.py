"""`spendgate onboard USER --script`: a setup script a developer runs on their own workstation.

The script is a header made here (who, which gateway, the CA's fingerprint, the environment lines in
the developer's shell) and a body that is the same for everyone (`onboarding_assets/setup.sh`, or
`setup.ps1` for PowerShell). Run, it fetches the gateway CA from the gateway, refuses one whose
fingerprint differs, builds `~/.spendgate/ca-bundle.pem` from that machine's own CAs plus the
gateway CA, fetches the Node preload, writes `~/.spendgate/env.sh` (or `env.fish`, `env.ps1`) and
sources it from the shell's rc file between markers. bash, zsh and fish get a POSIX sh script
(fish users run it with `sh`); PowerShell gets a PowerShell script.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial

from spendgate.onboarding import (
    ASSETS,
    PublicAddress,
    ca_fingerprint,
    environment,
)
from spendgate.onboarding.shells import Shell, env_lines, file_refs, single_quoted

ENV_END = "SPENDGATE_ENV"  # the here-document's end marker; no environment line is this


def _comment(text: str) -> str:
    return " ".join(text.split())  # a user name never breaks out of its comment line


def setup_script(address: PublicAddress, user: str, key: str | None, shell: Shell, ca_pem: str,
                 now: datetime | None = None) -> str:
    """The whole script. Without `key` it takes the key from $SPENDGATE_KEY or asks for it."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    if shell is Shell.powershell:
        return _powershell(address, user, key, ca_pem, when)
    return _posix(address, user, key, shell, ca_pem, when)


_KNOBS = ("SPENDGATE_KEY (your key, when this script has none), SPENDGATE_SYSTEM_CA=FILE (the CAs to trust "
          "instead of this machine's), SPENDGATE_HOME (instead of ~/.spendgate), SPENDGATE_NO_RC=1 (leave the "
          "rc file alone), SPENDGATE_UNDICI=DIR (the npm undici package to use), SPENDGATE_NO_NPM=1 (do not "
          "npm install undici)")


def _posix(address: PublicAddress, user: str, key: str | None, shell: Shell, ca_pem: str, when: str) -> str:
    rc = {Shell.fish: "~/.config/fish/conf.d/spendgate.fish", Shell.zsh: "~/.zshrc"}.get(shell, "~/.bashrc")
    env_name = "env.fish" if shell is Shell.fish else "env.sh"
    sq = partial(single_quoted, shell=Shell.bash)  # the script's own variables are sh, whatever it writes
    body = env_lines(address, user, shell, file_refs(shell))
    if ENV_END in body:  # would end the here-document early (not an assert: `serve` runs under -O)
        raise ValueError("onboarding: a value contains the here-document's end marker")
    header = [
        "#!/bin/sh",
        f"# Spendgate setup for {_comment(user)} through {address.url}, for {shell.value}; made {when}.",
        "# Run it on your own machine, as yourself:    sh spendgate-setup.sh",
        f"# It fetches the gateway CA from {address.ca_url} and checks its SHA-256,",
        "# builds ~/.spendgate/ca-bundle.pem from this machine's own CAs plus that CA, fetches the Node",
        f"# preload, writes ~/.spendgate/{env_name} and sources it from {rc} (between spendgate markers).",
        "# It keeps your key in that file: treat it like ~/.ssh.",
        f"# Settings from the environment: {_KNOBS}.",
        "",
        f"SG_USER={sq(_comment(user))}",
        f"SG_GATEWAY={sq(address.url)}",
        f"SG_CA_SHA256={sq(ca_fingerprint(ca_pem))}",
        f"SG_SHELL={sq(shell.value)}",
        f"SG_KEY={sq(key or '')}",
        "",
        f"sg_env_body() {{\ncat <<'{ENV_END}'",
        *body,
        ENV_END,
        "}",
        "",
    ]
    return "\n".join(header) + "\n" + (ASSETS / "setup.sh").read_text()


def _powershell(address: PublicAddress, user: str, key: str | None, ca_pem: str, when: str) -> str:
    ps = partial(single_quoted, shell=Shell.powershell)
    body = env_lines(address, user, Shell.powershell, file_refs(Shell.powershell))
    if any(line.startswith("'@") for line in body):  # would end the here-string early
        raise ValueError("onboarding: a value would end the PowerShell here-string")
    names = [v.name for v in environment(address, user)]
    header = [
        f"# Spendgate setup for {_comment(user)} through {address.url}, for PowerShell; made {when}.",
        "# Run it on your own machine, as yourself:",
        "#     powershell -ExecutionPolicy Bypass -File spendgate-setup.ps1     (or: pwsh -File ...)",
        f"# It fetches the gateway CA from {address.ca_url} and checks its SHA-256, builds",
        "# ~/.spendgate/ca-bundle.pem from this machine's CAs (Windows: the root certificate stores) plus that",
        "# CA, fetches the Node preload, writes ~/.spendgate/env.ps1 and dot-sources it from your profile.",
        "# It keeps your key in that file. SPENDGATE_PERSIST=1 also sets the variables for your Windows user",
        "# (GUI tools such as Cursor read those).",
        f"# Settings from the environment: {_KNOBS}.",
        "",
        f"$SgUser = {ps(_comment(user))}",
        f"$SgGateway = {ps(address.url)}",
        f"$SgCaSha256 = {ps(ca_fingerprint(ca_pem))}",
        f"$SgKey = {ps(key or '')}",
        "$SgVarNames = @(" + ", ".join(ps(n) for n in names) + ")",
        "",
        "function SgEnvBody {",
        "@'",
        *body,
        "'@ -split \"`n\"",
        "}",
        "",
    ]
    return "\n".join(header) + "\n" + (ASSETS / "setup.ps1").read_text()
