"""Drive a real ``spendgate serve`` process, and build clients that go through it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[2]
SPENDGATE_BIN = Path(sys.executable).parent / "spendgate"

# Fake, short, distinctive upstream keys put in the gateway's environment. The mock records
# what it received, so tests can assert the gateway swapped the client's key for these.
UPSTREAM_KEYS: dict[str, str] = {
    "openai": "upstream-openai-test-key-1",
    "anthropic": "upstream-anthropic-test-key-1",
    "gemini": "upstream-gemini-test-key-1",
    "azure": "upstream-azure-test-key-1",
    "mistral": "upstream-mistral-test-key-1",
    "groq": "upstream-groq-test-key-1",
    "deepseek": "upstream-deepseek-test-key-1",
    "openrouter": "upstream-openrouter-test-key-1",
    "xai": "upstream-xai-test-key-1",
    "together": "upstream-together-test-key-1",
}
KEY_ENV: dict[str, str] = {p: f"{p.upper()}_API_KEY" for p in UPSTREAM_KEYS} | {"azure": "AZURE_OPENAI_API_KEY"}

PROVIDER_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}

# The commands that open the database (and refuse one whose schema is missing or behind).
SCHEMA_COMMANDS = frozenset({"keys", "budgets", "alerts", "audit", "usage", "purge"})

_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
_CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiktoken_cache_dir() -> str | None:
    """``$TIKTOKEN_CACHE_DIR``, else ``shared/tiktoken-cache`` next to the repository clone."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    for cand in (REPO_ROOT.parent / "shared" / "tiktoken-cache", REPO_ROOT / "shared" / "tiktoken-cache"):
        if cand.is_dir():
            return str(cand)
    return None


def _without_proxy_env(env: Mapping[str, str]) -> dict[str, str]:
    drop = {v.lower() for v in _PROXY_VARS}
    return {k: v for k, v in env.items() if k.lower() not in drop}


# --------------------------------------------------------------------------- tiny TOML writer


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return _toml_value(str(v))


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def render_toml(doc: Mapping[str, Any], _prefix: str = "") -> str:
    """Nested dicts become ``[tables]``; a dict value marked inline stays inline
    (keys of ``[prices.overrides]`` style tables hold inline tables)."""
    scalars = {k: v for k, v in doc.items() if not (isinstance(v, Mapping) and not getattr(v, "inline", False))}
    tables = {k: v for k, v in doc.items() if k not in scalars}
    out = []
    if _prefix and (scalars or not tables):
        out.append(f"[{_prefix}]")
    for k, v in scalars.items():
        out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    if out:
        out.append("")
    for k, v in tables.items():
        out.append(render_toml(v, f"{_prefix}.{_toml_key(k)}" if _prefix else _toml_key(k)))
    return "\n".join(out)


class Inline(dict):  # type: ignore[type-arg]
    """A dict rendered as a TOML inline table, e.g. ``{"openai:gpt-4o": Inline(input=2.5)}``."""

    inline = True


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and not getattr(v, "inline", False) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v
    return base


# --------------------------------------------------------------------------- process


class GatewayError(RuntimeError):
    pass


class CLIError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


class GatewayProcess:
    """One ``spendgate serve`` process with its own config, confdir and (by default) SQLite file.

    Args:
        workdir: directory for the config, confdir, database and log (created).
        upstream: URL every provider's traffic is sent to (normally ``mock.url``).
        db_url: database URL; default ``sqlite:///<workdir>/spendgate.db``.
        overrides: nested dict deep-merged into the generated config before it is written,
            e.g. ``{"proxy": {"max_request_bytes": 1024}, "budgets": {"fail_closed": False}}``.
        extra_config: raw TOML text appended to the file (new tables only).
        env: extra environment for the gateway process (and its CLI calls).
        confdir: share a CA directory between instances (default ``<workdir>/confdir``).
        name: label used in logs and errors.
        upgrade_new_database: before the first command that opens the database, run
            ``spendgate db upgrade`` if the database is new (no schema yet), as an admin does; the
            CLI itself never migrates. A database with an older schema is left alone. ``serve``
            initialises a new database by itself, so this only matters for commands run before
            any gateway has started on it.
    """

    def __init__(
        self,
        workdir: Path | str,
        upstream: str,
        *,
        db_url: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        extra_config: str = "",
        env: Mapping[str, str] | None = None,
        confdir: Path | str | None = None,
        name: str = "gateway",
        proxy_port: int | None = None,
        metrics_port: int | None = None,
        upgrade_new_database: bool = True,
    ) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.confdir = Path(confdir) if confdir else self.workdir / "confdir"
        self.db_path = self.workdir / "spendgate.db"
        self.db_url = db_url or f"sqlite:///{self.db_path}"
        self.port = proxy_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self._ports_chosen_here = proxy_port is None and metrics_port is None
        self.config_path = self.workdir / "spendgate.toml"
        self.log_path = self.workdir / "gateway.log"
        self.upstream_keys = dict(UPSTREAM_KEYS)
        self.extra_env = dict(env or {})
        self.config: dict[str, Any] = self._base_config()
        if overrides:
            deep_merge(self.config, overrides)
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.upgrade_new_database = upgrade_new_database
        self._schema_checked = False
        self._schema_lock = threading.Lock()  # tests run commands side by side
        self.write_config()

    # ---- config

    def _base_config(self) -> dict[str, Any]:
        providers = {
            p: {"api_key": f"env:{KEY_ENV[p]}", "upstream": self.upstream, "verify_upstream_tls": False}
            for p in UPSTREAM_KEYS
        }
        return {
            "proxy": {"listen": f"127.0.0.1:{self.port}", "confdir": str(self.confdir)},
            "database": {"url": self.db_url},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "providers": providers,
        }

    def write_config(self) -> Path:
        text = render_toml(self.config)
        if self.extra_config:
            text += "\n" + self.extra_config.strip() + "\n"
        self.config_path.write_text(text)
        return self.config_path

    def env(self) -> dict[str, str]:
        """The environment of the gateway process and of its CLI calls."""
        env = _without_proxy_env(os.environ)
        for k in ("SPENDGATE_CONFIG", *(KEY_ENV.values()), "SLACK_WEBHOOK_URL"):
            env.pop(k, None)
        env.update({KEY_ENV[p]: k for p, k in self.upstream_keys.items()})
        cache = tiktoken_cache_dir()
        if cache:
            env["TIKTOKEN_CACHE_DIR"] = cache
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    # ---- lifecycle

    @property
    def ca_path(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        if self.running:
            return self
        self.write_config()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== {self.name}: spendgate serve starting {time.strftime('%X')} =====\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [str(SPENDGATE_BIN), "serve", "--config", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C in pytest must not reach it before teardown does
        )
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._close_log()
                if self._take_new_ports():
                    return self.start(timeout)
                raise GatewayError(f"{self.name}: spendgate serve exited with {rc} during start-up\n{self.log_tail()}")
            if self.ca_path.exists() and _port_open(self.port):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise GatewayError(
                    f"{self.name}: not ready after {timeout}s (proxy port {self.port} open: "
                    f"{_port_open(self.port)}, CA {self.ca_path} exists: {self.ca_path.exists()})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _take_new_ports(self) -> bool:
        """A port `free_port` picked was taken before serve bound it (the kernel hands the same
        ephemeral range to outgoing connections): pick again, once per start-up that hit it."""
        if not self._ports_chosen_here or "Address already in use" not in self.log_tail(1):
            return False
        listen = self.config.get("proxy", {}).get("listen"), self.config.get("metrics", {}).get("listen")
        if listen != (f"127.0.0.1:{self.port}", f"127.0.0.1:{self.metrics_port}"):
            return False  # the test chose its own addresses
        self._ports_chosen_here = False
        self.port, self.metrics_port = free_port(), free_port()
        self.config["proxy"]["listen"], self.config["metrics"]["listen"] = (
            f"127.0.0.1:{self.port}", f"127.0.0.1:{self.metrics_port}")
        return True

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit within ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        self._close_log()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_log()

    def restart(self, timeout: float = 30.0) -> GatewayProcess:
        self.stop()
        _wait_port_closed(self.port, 5.0)
        return self.start(timeout)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not in {self.name} log after {timeout}s\n{self.log_tail()}")

    # ---- CLI

    def database_is_new(self) -> bool:
        """True when the configured database has no Spendgate schema yet (a SQLite file that does not
        exist counts). False when it has one, at any revision, or when it cannot be read (the CLI
        will say why)."""
        from spendgate.settings import load_settings
        from spendgate.store import Database

        try:
            url = load_settings(self.config_path, environ=self.env()).database.url
        except Exception:  # noqa: BLE001 - a broken config is for the command to report
            return False
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            return True
        db = Database(url)
        try:
            return db.current_revision() is None
        except Exception:  # noqa: BLE001 - an unreachable database is for the command to report
            return False
        finally:
            db.close()

    def prepare_database(self) -> None:
        """``spendgate db upgrade``, once, if the database is new (see ``upgrade_new_database``)."""
        if self._schema_checked or not self.upgrade_new_database:
            return
        with self._schema_lock:
            if not self._schema_checked:
                if self.database_is_new():
                    self.cli("db", "upgrade")
                self._schema_checked = True

    def cli(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``spendgate <args> --config PATH`` with the gateway's environment; text output.

        A command that opens the database first gets the schema created on a new database
        (``prepare_database``)."""
        if args and str(args[0]) in SCHEMA_COMMANDS:
            self.prepare_database()
        cmd = [str(SPENDGATE_BIN), *map(str, args), "--config", str(self.config_path)]
        proc_env = self.env() | dict(env or {})
        cp = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, env=proc_env,
                            cwd=self.workdir)
        if check and cp.returncode != 0:
            raise CLIError(cp.returncode, cmd, cp.stdout, cp.stderr)
        return cp

    def cli_json(self, *args: str, **kw: Any) -> Any:
        """Run a command with ``--format json`` appended and parse its output."""
        cp = self.cli(*args, "--format", "json", **kw)
        return parse_json_output(cp.stdout)

    def create_key(self, user: str, *, team: str | None = None, models: Sequence[str] = (),
                   expires: str | None = None, byok: bool = False, cap: Any = None, period: str = "day",
                   rpm: int | None = None, capture_content: bool = False, reason: str | None = None,
                   extra_args: Sequence[str] = ()) -> dict[str, Any]:
        """``keys create`` → ``{"key": "sg_…", "key_id": …, "user": …, "team": …}``."""
        args = ["keys", "create", user]
        if team:
            args += ["--team", team]
        for m in models:
            args += ["--models", m]
        if expires:
            args += ["--expires", expires]
        if byok:
            args.append("--byok")
        if cap is not None:
            args += ["--cap", str(cap), "--period", period]
        if rpm is not None:
            args += ["--rpm", str(rpm)]
        if capture_content:
            args.append("--capture-content")
        if reason:
            args += ["--reason", reason]
        args += list(extra_args)
        out = self.cli_json(*args)
        if not isinstance(out, dict) or "key" not in out:
            raise GatewayError(f"unexpected `keys create` output: {out!r}")
        return out

    def revoke_key(self, key_id_or_user: str) -> subprocess.CompletedProcess[str]:
        return self.cli("keys", "revoke", key_id_or_user)

    def rotate_key(self, key_id: str, grace: str | None = "5s") -> dict[str, Any]:
        args = ["keys", "rotate", key_id] + (["--grace", grace] if grace else [])
        out = self.cli_json(*args)
        assert isinstance(out, dict) and "key" in out, out
        return out

    # ---- clients

    @property
    def proxy_host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def proxy_url(self, key: str | None = None, user: str = "dev") -> str:
        if key is None:
            return f"http://{self.proxy_host}"
        return f"http://{quote(user, safe='')}:{quote(key, safe='')}@{self.proxy_host}"

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the gateway CA only (like SSL_CERT_FILE=ca would)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def client_env(self, key: str | None = None, user: str = "dev",
                   base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for a client subprocess going through this gateway."""
        env = _without_proxy_env(os.environ if base is None else base)
        env.pop("SSL_CERT_DIR", None)
        url = self.proxy_url(key, user)
        env.update({"HTTPS_PROXY": url, "HTTP_PROXY": url, "https_proxy": url, "http_proxy": url})
        env.update({v: str(self.ca_path) for v in _CA_VARS})
        return env

    def _sdk_http(self, sdk: Any, key: str | None, via: str, user: str, timeout: float) -> tuple[Any, str]:
        if via not in ("proxy", "apikey"):
            raise ValueError("via must be 'proxy' or 'apikey'")
        proxy_key = key if via == "proxy" else None
        http = sdk.DefaultHttpxClient(proxy=self.proxy_url(proxy_key, user), verify=self.ssl_context(),
                                      trust_env=False, timeout=timeout)
        return http, (key if via == "apikey" and key else "unused")

    def openai_client(self, key: str | None, via: str = "proxy", *, user: str = "dev", max_retries: int = 0,
                      timeout: float = 30.0, base_url: str = PROVIDER_BASE_URLS["openai"], **kw: Any) -> Any:
        """``openai.OpenAI`` going through the gateway to https://api.openai.com.

        ``via="proxy"``: the key is the proxy password, the SDK key is "unused";
        ``via="apikey"``: the key is the SDK ``api_key``, the proxy URL has no credentials.
        Retries are off by default so a test sees exactly one request per call.
        """
        import openai

        http, api_key = self._sdk_http(openai, key, via, user, timeout)
        return openai.OpenAI(api_key=api_key, base_url=base_url, http_client=http, max_retries=max_retries,
                             timeout=timeout, **kw)

    def anthropic_client(self, key: str | None, via: str = "proxy", *, user: str = "dev", max_retries: int = 0,
                         timeout: float = 30.0, base_url: str = PROVIDER_BASE_URLS["anthropic"], **kw: Any) -> Any:
        """``anthropic.Anthropic`` going through the gateway to https://api.anthropic.com (see openai_client)."""
        import anthropic

        http, api_key = self._sdk_http(anthropic, key, via, user, timeout)
        return anthropic.Anthropic(api_key=api_key, base_url=base_url, http_client=http, max_retries=max_retries,
                                   timeout=timeout, **kw)

    def httpx_client(self, key: str | None = None, *, user: str = "dev", timeout: float = 30.0, **kw: Any) -> Any:
        """A plain ``httpx.Client`` using the gateway as proxy and trusting its CA."""
        import httpx

        return httpx.Client(proxy=self.proxy_url(key, user), verify=self.ssl_context(), trust_env=False,
                            timeout=timeout, **kw)

    def curl(self, args: Sequence[str], key: str | None = None, *, user: str = "dev", timeout: float = 60.0,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        """Real ``curl -sS -x PROXY --cacert CA <args>``."""
        cmd = ["curl", "-sS", "-x", self.proxy_url(key, user), "--cacert", str(self.ca_path), *args]
        env = _without_proxy_env(os.environ)
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and cp.returncode != 0:
            raise CLIError(cp.returncode, cmd, cp.stdout, cp.stderr)
        return cp

    def metrics_text(self, timeout: float = 5.0) -> str:
        import httpx

        r = httpx.get(self.metrics_url, timeout=timeout, trust_env=False)
        r.raise_for_status()
        return r.text

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<GatewayProcess {self.name} {state} proxy={self.port} metrics={self.metrics_port} db={self.db_url}>"


def parse_json_output(text: str) -> Any:
    """JSON from CLI output, tolerating lines printed around it."""
    import json

    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text[i:])[0]
            except ValueError:
                continue
    raise ValueError(f"no JSON in output: {text[:500]!r}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _wait_port_closed(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.05)
