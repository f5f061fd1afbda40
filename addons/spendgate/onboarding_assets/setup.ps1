# --- the rest is the same for everyone (spendgate/onboarding_assets/setup.ps1) ---
$ErrorActionPreference = 'Stop'

function Say([string]$Message) { [Console]::Error.WriteLine("spendgate: $Message") }
function Die([string]$Message) { [Console]::Error.WriteLine("spendgate: error: $Message"); exit 1 }

# Windows PowerShell 5.1 has no $IsWindows; PowerShell 7 on Linux or macOS has it set to $false.
$OnWindows = ($PSVersionTable.PSVersion.Major -lt 6) -or $IsWindows

# Fetch from the gateway itself, never through a proxy (HTTPS_PROXY may already point at it).
function Fetch([string]$Url) {
  $client = New-Object System.Net.WebClient
  $client.Proxy = $null
  try { return $client.DownloadString($Url) } finally { $client.Dispose() }
}

function Pem([byte[]]$Der) {
  "-----BEGIN CERTIFICATE-----`n" + [Convert]::ToBase64String($Der, 'InsertLineBreaks') + "`n-----END CERTIFICATE-----`n"
}

if ($env:SPENDGATE_KEY) { $SgKey = $env:SPENDGATE_KEY }
if (-not $SgKey) {
  $secure = Read-Host -AsSecureString 'Your Spendgate key (sg_...)'
  $SgKey = [Runtime.InteropServices.Marshal]::PtrToStringBSTR([Runtime.InteropServices.Marshal]::SecureStringToBSTR($secure))
}
if ($SgKey -cnotmatch '^sg_[A-Za-z0-9_]+$') { Die 'a Spendgate key starts with sg_ (not a provider key); check the copy' }

$SgHome = if ($env:SPENDGATE_HOME) { $env:SPENDGATE_HOME } else { Join-Path $HOME '.spendgate' }
New-Item -ItemType Directory -Force -Path $SgHome | Out-Null
$Bundle = Join-Path $SgHome 'ca-bundle.pem'
$Utf8 = New-Object System.Text.UTF8Encoding($false)

# 1. The gateway CA, from the gateway, checked against the fingerprint the admin's script carries.
try { $caText = Fetch "$SgGateway/spendgate/ca.pem" } catch { Die "cannot fetch $SgGateway/spendgate/ca.pem (is the gateway reachable from here?): $_" }
$match = [regex]::Match($caText, '-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----', 'Singleline')
if (-not $match.Success) { Die "$SgGateway/spendgate/ca.pem is not a certificate" }
$der = [Convert]::FromBase64String(($match.Groups[1].Value -replace '\s', ''))
$sha = [Security.Cryptography.SHA256]::Create()
$got = -join ($sha.ComputeHash($der) | ForEach-Object { $_.ToString('X2') })
if ($got -ne $SgCaSha256) { Die "the gateway CA's SHA-256 is $got, this script expects ${SgCaSha256}: ask your admin for a new script" }
$caPem = Pem $der
[IO.File]::WriteAllText((Join-Path $SgHome 'gateway-ca.pem'), $caPem, $Utf8)

# 2. The bundle: this machine's CAs plus the gateway CA (the trust variables replace the system store).
$parts = New-Object System.Collections.Generic.List[string]
$from = ''
if ($env:SPENDGATE_SYSTEM_CA) {
  if (-not (Test-Path -PathType Leaf $env:SPENDGATE_SYSTEM_CA)) { Die "SPENDGATE_SYSTEM_CA=$($env:SPENDGATE_SYSTEM_CA) is not a file" }
  $parts.Add([IO.File]::ReadAllText($env:SPENDGATE_SYSTEM_CA)); $from = $env:SPENDGATE_SYSTEM_CA
} elseif ($OnWindows) {
  foreach ($store in 'Cert:\LocalMachine\Root', 'Cert:\LocalMachine\AuthRoot', 'Cert:\CurrentUser\Root') {
    if (Test-Path $store) { foreach ($c in Get-ChildItem $store) { $parts.Add((Pem $c.RawData)) } }
  }
  $from = "Windows' root certificate stores"
} else {
  foreach ($f in '/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt',
                 '/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem', '/etc/ssl/ca-bundle.pem', '/etc/ssl/cert.pem') {
    if (Test-Path -PathType Leaf $f) { $parts.Add([IO.File]::ReadAllText($f)); $from = $f; break }
  }
}
$extra = @()
foreach ($v in $env:SSL_CERT_FILE, $env:REQUESTS_CA_BUNDLE, $env:CURL_CA_BUNDLE, $env:NODE_EXTRA_CA_CERTS, $env:GIT_SSL_CAINFO) {
  if ($v -and ($v -ne $Bundle) -and ($v -ne $from) -and ($extra -notcontains $v) -and (Test-Path -PathType Leaf $v)) {
    $parts.Add([IO.File]::ReadAllText($v)); $extra += $v
  }
}
if (-not $from) { Say 'warning: found no system CAs (set SPENDGATE_SYSTEM_CA=FILE and re-run): only the gateway CA is trusted' }
$parts.Add($caPem)
[IO.File]::WriteAllText($Bundle, (($parts | ForEach-Object { $_.TrimEnd() + "`n" }) -join ''), $Utf8)
$count = ([regex]::Matches([IO.File]::ReadAllText($Bundle), 'BEGIN CERTIFICATE')).Count

# 3. Node 20/22: the preload that makes fetch() honour HTTPS_PROXY, and the undici package it needs.
$preload = Join-Path $SgHome 'node-proxy.cjs'
try { [IO.File]::WriteAllText($preload, (Fetch "$SgGateway/spendgate/node-proxy.cjs"), $Utf8) }
catch { Say "warning: could not fetch the Node preload: on Node 20/22 fetch() would not use the gateway" }
$node = Get-Command node -ErrorAction SilentlyContinue
if ($node -and (Test-Path $preload) -and -not $env:SPENDGATE_UNDICI -and -not (Test-Path (Join-Path $SgHome 'node_modules/undici'))) {
  $version = [version](& node -p 'process.versions.node')
  if ($version.Major -lt 24) {
    $undici = if ($version -lt [version]'20.18.0') { '6' } else { '7' }
    if ($env:SPENDGATE_NO_NPM -or -not (Get-Command npm -ErrorAction SilentlyContinue)) {
      Say "Node $version needs the npm package undici for fetch() to use the gateway: npm install --prefix `"$SgHome`" undici@$undici"
    } else {
      & npm install --prefix $SgHome --no-audit --no-fund --silent "undici@$undici" | Out-Null
      if ($LASTEXITCODE -ne 0) { Say "warning: npm install undici@$undici failed; run it yourself: npm install --prefix `"$SgHome`" undici@$undici" }
    }
  }
}

# 4. The environment file, and one marked block in the PowerShell profile that dot-sources it.
$envFile = Join-Path $SgHome 'env.ps1'
$lines = @(
  "# Spendgate for $SgUser through $SgGateway, written by its setup script on $((Get-Date).ToUniversalTime().ToString('yyyy-MM-dd HH:mm')) UTC.",
  "# Re-run the script to update it; delete this file and the spendgate lines in your profile to undo.",
  "`$env:SPENDGATE_HOME = '$($SgHome -replace "'", "''")'",
  "`$SPENDGATE_KEY = '$SgKey'"
)
if ($env:SPENDGATE_UNDICI) { $lines += "`$env:SPENDGATE_UNDICI = '$($env:SPENDGATE_UNDICI -replace "'", "''")'" }
$lines += (SgEnvBody)
[IO.File]::WriteAllText($envFile, (($lines -join "`n") + "`n"), $Utf8)

$profilePath = $PROFILE.CurrentUserAllHosts
if ($env:SPENDGATE_NO_RC) {
  Say "SPENDGATE_NO_RC is set: $profilePath left alone"
} else {
  New-Item -ItemType Directory -Force -Path (Split-Path $profilePath) | Out-Null
  $kept = @()
  if (Test-Path $profilePath) {
    $skip = $false
    foreach ($l in Get-Content $profilePath) {
      if ($l -eq '# >>> spendgate >>>') { $skip = $true; continue }
      if ($l -eq '# <<< spendgate <<<') { $skip = $false; continue }
      if (-not $skip) { $kept += $l }
    }
  }
  $quoted = "'" + ($envFile -replace "'", "''") + "'"
  $kept += '# >>> spendgate >>>', "if (Test-Path $quoted) { . $quoted }", '# <<< spendgate <<<'
  [IO.File]::WriteAllText($profilePath, (($kept -join "`n") + "`n"), $Utf8)
}

# GUI tools (Cursor, VS Code with Continue) read the user environment, not a shell profile.
if ($OnWindows -and $env:SPENDGATE_PERSIST) {
  . $envFile
  foreach ($name in $SgVarNames + 'NODE_OPTIONS') {
    [Environment]::SetEnvironmentVariable($name, [Environment]::GetEnvironmentVariable($name, 'Process'), 'User')
  }
  Say 'SPENDGATE_PERSIST: the variables are also set for your Windows user (new programs see them)'
}

Say "gateway CA $(Join-Path $SgHome 'gateway-ca.pem') (SHA-256 $SgCaSha256)"
Say "trust bundle ${Bundle}: $count certificates, from $(if ($from) { $from } else { 'nothing' })$(if ($extra) { ' and ' + ($extra -join ' ') }) plus the gateway CA"
Say "environment $envFile$(if (-not $env:SPENDGATE_NO_RC) { ", dot-sourced from $profilePath" })"
Say "done: open a new PowerShell, or run: . '$envFile'"
