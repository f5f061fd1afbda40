"""The environment in each shell's syntax: bash/zsh (POSIX sh), fish and PowerShell.

A value's `Ref`s are written per use: in lines pasted by hand the home directory is
`$HOME/.spendgate` and the key is written out; in the file the setup script writes they are
`$SPENDGATE_HOME` and `$SPENDGATE_KEY`, which that file sets first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

from spendgate.onboarding import (
    BUNDLE_FILE,
    GATEWAY_CA_FILE,
    HOME,
    HOME_DIR,
    KEY,
    KEY_PLACEHOLDER,
    LOWER_CASE_TOO,
    NODE_PRELOAD_FILE,
    Part,
    PublicAddress,
    Ref,
    Variable,
    environment,
    node_preload_option,
)


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"
    powershell = "powershell"


Refs = Mapping[Ref, str]  # each Ref as shell text, already escaped for inside double quotes


def pasted_refs(shell: Shell, key: str | None) -> Refs:
    """Lines pasted by hand: the home directory expanded by the shell, the key written out."""
    return {HOME: f"$HOME/{HOME_DIR}", KEY: _escape(key or KEY_PLACEHOLDER, shell)}


def file_refs(shell: Shell) -> Refs:
    """The file the setup script writes, which sets SPENDGATE_HOME and SPENDGATE_KEY first."""
    if shell is Shell.powershell:
        return {HOME: "$env:SPENDGATE_HOME", KEY: "${SPENDGATE_KEY}"}
    return {HOME: "$SPENDGATE_HOME", KEY: "$SPENDGATE_KEY" if shell is Shell.fish else "${SPENDGATE_KEY}"}


def _escape(text: str, shell: Shell) -> str:
    """For inside double quotes."""
    if shell is Shell.powershell:
        return text.replace("`", "``").replace('"', '`"').replace("$", "`$")
    specials = "\\\"$" if shell is Shell.fish else "\\\"$`"
    return "".join("\\" + c if c in specials else c for c in text)


def quoted(parts: Sequence[Part], shell: Shell, refs: Refs) -> str:
    return '"' + "".join(refs[p] if isinstance(p, Ref) else _escape(p, shell) for p in parts) + '"'


def single_quoted(text: str, shell: Shell) -> str:
    """A literal nothing expands in."""
    if shell is Shell.powershell:
        return "'" + text.replace("'", "''") + "'"
    if shell is Shell.fish:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "'" + text.replace("'", "'\\''") + "'"


def assignment(name: str, value: str, shell: Shell, export: bool = True) -> str:
    """`value` already quoted for `shell`."""
    if shell is Shell.powershell:
        return f"$env:{name} = {value}" if export else f"${name} = {value}"
    if shell is Shell.fish:
        return f"set -g{'x' if export else ''} {name} {value}"
    return f"export {name}={value}" if export else f"{name}={value}"


def variable_lines(variables: Sequence[Variable], shell: Shell, refs: Refs) -> list[str]:
    out = []
    for v in variables:
        out.append(assignment(v.name, quoted(v.value, shell, refs), shell))
        if v.name in LOWER_CASE_TOO:  # (on Windows the same variable again: names ignore case there)
            out.append(assignment(v.name.lower(), quoted(v.value, shell, refs), shell))
    return out


def node_options_line(shell: Shell, refs: Refs) -> str:
    """Prepend the preload to NODE_OPTIONS once, if the file is there (a missing `--require` breaks node)."""
    opt = quoted(node_preload_option(), shell, refs)
    preload = quoted((HOME, "/" + NODE_PRELOAD_FILE), shell, refs)
    if shell is Shell.powershell:
        return (f'if ((Test-Path {preload}) -and ("$env:NODE_OPTIONS" -notlike "*{NODE_PRELOAD_FILE}*")) '
                f'{{ $env:NODE_OPTIONS = ({opt} + " " + "$env:NODE_OPTIONS").Trim() }}')
    if shell is Shell.fish:
        return (f"if test -f {preload}; and not string match -q '*{NODE_PRELOAD_FILE}*' -- \"$NODE_OPTIONS\"; "
                f'set -gx NODE_OPTIONS (string trim -- {opt[:-1]} $NODE_OPTIONS"); end')
    return (f'if [ -f {preload} ]; then case " ${{NODE_OPTIONS-}} " in *{NODE_PRELOAD_FILE}*) ;; '
            f'*) export NODE_OPTIONS={opt[:-1]}${{NODE_OPTIONS:+ $NODE_OPTIONS}}" ;; esac; fi')


def env_lines(address: PublicAddress, user: str, shell: Shell, refs: Refs) -> list[str]:
    return [*variable_lines(environment(address, user), shell, refs), node_options_line(shell, refs)]


def pasted_lines(address: PublicAddress, user: str, key: str | None, shell: Shell, ca_sha256: str) -> list[str]:
    """What `onboard USER` prints: build the bundle once, then the variables (for the rc file too)."""
    refs = pasted_refs(shell, key)
    home = refs[HOME]
    lines = [f"# Spendgate for {user} through {address.url} (gateway CA SHA-256 {ca_sha256})."]
    if key is None:
        lines.append(f"# Put your key (sg_...) where it says {KEY_PLACEHOLDER}.")
    if shell is not Shell.powershell:
        lines.append(f"# Once on this machine: {home}/{BUNDLE_FILE} = this machine's CAs + the gateway CA "
                     f"({address.ca_url}), and the Node preload:")
    lines += bundle_command(address, shell)
    lines.append("# Then in every shell (or in your shell's rc file):")
    lines += env_lines(address, user, shell, refs)
    lines.append(f"# Node 20/22 also need the npm package undici next to the preload: "
                 f"npm install --prefix {home} undici@7")
    return lines


SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL, CentOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL's extracted store
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, FreeBSD, Alpine
)


def bundle_command(address: PublicAddress, shell: Shell) -> list[str]:
    """One line that fetches the CA and the Node preload from the gateway and builds the bundle from this
    machine's CAs. A shortcut for the setup script (which also checks the CA's fingerprint and probes
    more places, e.g. the macOS keychains); PowerShell users run the script."""
    home = f"$HOME/{HOME_DIR}"
    sg = f'"{home}"'
    ca, preload, bundle = f'"{home}/{GATEWAY_CA_FILE}"', f'"{home}/{NODE_PRELOAD_FILE}"', f'"{home}/{BUNDLE_FILE}"'
    fetch = f"curl -fsS --noproxy '*' -o {ca} {address.ca_url}; and curl -fsS --noproxy '*' -o {preload} " \
            f"{address.node_preload_url}"
    files = " ".join(SYSTEM_CA_FILES)
    if shell is Shell.powershell:
        return ["# Once on this machine: run the setup script (`spendgate onboard USER --script --shell powershell`); "
                f"it fetches {address.ca_url} and builds {home}/{BUNDLE_FILE} from Windows' root store."]
    if shell is Shell.fish:
        return [f"mkdir -p {sg}; and {fetch}; and begin; for f in $SPENDGATE_SYSTEM_CA {files}; "
                f"if test -f $f; cat $f; break; end; end; cat {ca}; end > {bundle}"]
    return [f"mkdir -p {sg} && {fetch.replace('; and', ' &&')} && {{ for f in ${{SPENDGATE_SYSTEM_CA:-}} {files}; "
            f'do [ -f "$f" ] && cat "$f" && break; done; cat {ca}; }} > {bundle}']
