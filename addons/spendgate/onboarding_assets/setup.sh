# --- the rest is the same for everyone (spendgate/onboarding_assets/setup.sh) ---
set -eu
umask 077

sg_say() { printf 'spendgate: %s\n' "$*" >&2; }
sg_die() { printf 'spendgate: error: %s\n' "$*" >&2; exit 1; }
sg_sq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }  # sh single quotes
sg_fq() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"; }  # fish single quotes

# Fetch from the gateway itself, never through a proxy (HTTPS_PROXY may already point at it).
sg_fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --noproxy '*' --max-time 30 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q --no-proxy -T 30 -O "$2" "$1"
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import sys, urllib.request as u
o = u.build_opener(u.ProxyHandler({}))
open(sys.argv[2], "wb").write(o.open(sys.argv[1], timeout=30).read())' "$1" "$2"
  else
    sg_die "need curl, wget or python3 to fetch $1"
  fi
}

sg_sha256() {  # of the certificate in file $1 (DER), upper-case hex without colons
  if command -v openssl >/dev/null 2>&1; then
    openssl x509 -in "$1" -noout -fingerprint -sha256 | sed -e 's/^[^=]*=//' -e 's/://g' | tr 'a-f' 'A-F'
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import hashlib, ssl, sys
print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[1]).read().strip() + "\n")).hexdigest().upper())' "$1"
  else
    sg_die "need openssl or python3 to check the gateway CA's fingerprint"
  fi
}

# This machine's own trust: $SPENDGATE_SYSTEM_CA if set, else the macOS keychains or the first
# system bundle found (else python's certifi); plus any CA file a trust variable already names.
SG_FROM=""
sg_system_cas() {
  if [ -n "${SPENDGATE_SYSTEM_CA:-}" ]; then
    [ -f "$SPENDGATE_SYSTEM_CA" ] || sg_die "SPENDGATE_SYSTEM_CA=$SPENDGATE_SYSTEM_CA is not a file"
    cat "$SPENDGATE_SYSTEM_CA"; echo
    SG_FROM=$SPENDGATE_SYSTEM_CA
  elif [ "$(uname -s 2>/dev/null)" = Darwin ] && command -v security >/dev/null 2>&1; then
    security find-certificate -a -p /System/Library/Keychains/SystemRootCertificates.keychain
    security find-certificate -a -p /Library/Keychains/System.keychain 2>/dev/null || true
    SG_FROM="the macOS keychains"
  else
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt \
             /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem /etc/ssl/ca-bundle.pem /etc/ssl/cert.pem; do
      if [ -f "$f" ]; then cat "$f"; echo; SG_FROM=$f; break; fi
    done
    if [ -z "$SG_FROM" ] && python3 -c 'import certifi' >/dev/null 2>&1; then
      cat "$(python3 -c 'import certifi; print(certifi.where())')"; echo
      SG_FROM="python's certifi"
    fi
  fi
  for v in "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" "${CURL_CA_BUNDLE:-}" "${NODE_EXTRA_CA_CERTS:-}" \
           "${GIT_SSL_CAINFO:-}"; do
    case $v in "" | "$SG_HOME/ca-bundle.pem" | "$SG_FROM") continue ;; esac
    case " $SG_EXTRA " in *" $v "*) continue ;; esac
    if [ -f "$v" ]; then cat "$v"; echo; SG_EXTRA="$SG_EXTRA $v"; fi
  done
}

[ -n "${HOME:-}" ] || sg_die "HOME is not set"
SG_HOME=${SPENDGATE_HOME:-$HOME/.spendgate}
SG_EXTRA=""
[ -n "${SPENDGATE_KEY:-}" ] && SG_KEY=$SPENDGATE_KEY
if [ -z "$SG_KEY" ]; then
  [ -t 0 ] || sg_die "no key: run it as SPENDGATE_KEY=sg_... sh $0 (the key your admin gave you)"
  printf 'Your Spendgate key (sg_...): ' >&2
  stty -echo 2>/dev/null || true
  read -r SG_KEY
  stty echo 2>/dev/null || true
  printf '\n' >&2
fi
case $SG_KEY in
  sg_*) ;;
  *) sg_die "a Spendgate key starts with sg_ (not a provider key)" ;;
esac
case $SG_KEY in
  *[!A-Za-z0-9_]*) sg_die "the key has characters a Spendgate key does not have; check the copy" ;;
esac

mkdir -p "$SG_HOME"
tmp=$(mktemp "$SG_HOME/.setup.XXXXXX")
trap 'rm -f "$tmp" "$tmp.ca" "$tmp.node"' EXIT

# 1. The gateway CA, from the gateway, checked against the fingerprint the admin's script carries.
sg_fetch "$SG_GATEWAY/spendgate/ca.pem" "$tmp.ca" || sg_die "cannot fetch $SG_GATEWAY/spendgate/ca.pem (is the gateway reachable from here?)"
grep -q 'BEGIN CERTIFICATE' "$tmp.ca" || sg_die "$SG_GATEWAY/spendgate/ca.pem is not a certificate"
got=$(sg_sha256 "$tmp.ca")
[ "$got" = "$SG_CA_SHA256" ] || sg_die "the gateway CA's SHA-256 is $got, this script expects $SG_CA_SHA256: ask your admin for a new script"
mv "$tmp.ca" "$SG_HOME/gateway-ca.pem"

# 2. The bundle: this machine's CAs plus the gateway CA (the trust variables replace the system store).
sg_system_cas > "$tmp"
[ -n "$SG_FROM" ] || sg_say "warning: found no system CA bundle (set SPENDGATE_SYSTEM_CA=FILE and re-run): only the gateway CA is trusted"
cat "$SG_HOME/gateway-ca.pem" >> "$tmp"
mv "$tmp" "$SG_HOME/ca-bundle.pem"
chmod 644 "$SG_HOME/ca-bundle.pem" "$SG_HOME/gateway-ca.pem"
count=$(grep -c 'BEGIN CERTIFICATE' "$SG_HOME/ca-bundle.pem" || true)

# 3. Node 20/22: the preload that makes fetch() honour HTTPS_PROXY, and the undici package it needs.
if sg_fetch "$SG_GATEWAY/spendgate/node-proxy.cjs" "$tmp.node"; then
  mv "$tmp.node" "$SG_HOME/node-proxy.cjs"
  chmod 644 "$SG_HOME/node-proxy.cjs"
else
  sg_say "warning: could not fetch the Node preload: on Node 20/22 fetch() would not use the gateway"
fi
if command -v node >/dev/null 2>&1 && [ -f "$SG_HOME/node-proxy.cjs" ] && [ -z "${SPENDGATE_UNDICI:-}" ]; then
  ver=$(node -p 'process.versions.node' 2>/dev/null || echo 0.0)
  major=${ver%%.*}
  minor=${ver#*.}; minor=${minor%%.*}
  if [ "$major" -lt 24 ] && [ ! -d "$SG_HOME/node_modules/undici" ]; then
    undici=7
    { [ "$major" -lt 20 ] || { [ "$major" -eq 20 ] && [ "$minor" -lt 18 ]; }; } && undici=6
    if [ -n "${SPENDGATE_NO_NPM:-}" ] || ! command -v npm >/dev/null 2>&1; then
      sg_say "Node $ver needs the npm package undici for fetch() to use the gateway: npm install --prefix $SG_HOME undici@$undici"
    elif ! npm install --prefix "$SG_HOME" --no-audit --no-fund --silent "undici@$undici" >/dev/null 2>&1; then
      sg_say "warning: npm install undici@$undici failed; run it yourself: npm install --prefix $SG_HOME undici@$undici"
    fi
  fi
fi

# 4. The environment file, and one marked line in the shell's rc file that sources it.
case $SG_SHELL in
  fish)
    env_file=$SG_HOME/env.fish
    rc=${XDG_CONFIG_HOME:-$HOME/.config}/fish/conf.d/spendgate.fish
    source_line="if test -f $(sg_fq "$env_file"); source $(sg_fq "$env_file"); end"
    ;;
  zsh)
    env_file=$SG_HOME/env.sh
    rc=${ZDOTDIR:-$HOME}/.zshrc
    source_line="if [ -f $(sg_sq "$env_file") ]; then . $(sg_sq "$env_file"); fi"
    ;;
  *)
    env_file=$SG_HOME/env.sh
    rc=$HOME/.bashrc
    source_line="if [ -f $(sg_sq "$env_file") ]; then . $(sg_sq "$env_file"); fi"
    ;;
esac
{
  echo "# Spendgate for $SG_USER through $SG_GATEWAY, written by its setup script on $(date -u '+%Y-%m-%d %H:%M UTC')."
  echo "# Re-run the script to update it; delete this file and the spendgate lines in $rc to undo."
  if [ "$SG_SHELL" = fish ]; then
    echo "set -gx SPENDGATE_HOME $(sg_fq "$SG_HOME")"
    echo "set -g SPENDGATE_KEY $(sg_fq "$SG_KEY")"
    [ -n "${SPENDGATE_UNDICI:-}" ] && echo "set -gx SPENDGATE_UNDICI $(sg_fq "$SPENDGATE_UNDICI")"
  else
    echo "SPENDGATE_HOME=$(sg_sq "$SG_HOME"); export SPENDGATE_HOME"
    echo "SPENDGATE_KEY=$(sg_sq "$SG_KEY")"
    [ -n "${SPENDGATE_UNDICI:-}" ] && echo "SPENDGATE_UNDICI=$(sg_sq "$SPENDGATE_UNDICI"); export SPENDGATE_UNDICI"
  fi
  sg_env_body
} > "$tmp"
chmod 600 "$tmp"
mv "$tmp" "$env_file"

sg_hook() {  # drop an earlier block from rc file $1 (its path may have changed), then append this one
  mkdir -p "$(dirname "$1")"
  touch "$1"
  awk '/^# >>> spendgate >>>$/ {skip=1; next} /^# <<< spendgate <<<$/ {skip=0; next} !skip' "$1" > "$1.spendgate-tmp"
  printf '# >>> spendgate >>>\n%s\n# <<< spendgate <<<\n' "$source_line" >> "$1.spendgate-tmp"
  cat "$1.spendgate-tmp" > "$1"
  rm -f "$1.spendgate-tmp"
}
if [ -n "${SPENDGATE_NO_RC:-}" ]; then
  sg_say "SPENDGATE_NO_RC is set: $rc left alone"
else
  sg_hook "$rc"
  if [ "$SG_SHELL" = bash ] && [ "$(uname -s 2>/dev/null)" = Darwin ]; then
    sg_hook "$HOME/.bash_profile"  # macOS terminals start login shells, which read this, not ~/.bashrc
    rc="$rc and ~/.bash_profile"
  fi
fi

sg_say "gateway CA $SG_HOME/gateway-ca.pem (SHA-256 $SG_CA_SHA256)"
sg_say "trust bundle $SG_HOME/ca-bundle.pem: $count certificates, from ${SG_FROM:-nothing}${SG_EXTRA:+ and$SG_EXTRA} plus the gateway CA"
sg_say "environment $env_file$([ -n "${SPENDGATE_NO_RC:-}" ] || echo ", sourced from $rc")"
if [ "$SG_SHELL" = fish ]; then
  sg_say "done: open a new shell, or run: source $env_file"
else
  sg_say "done: open a new shell, or run: . $env_file"
fi
