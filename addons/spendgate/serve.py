"""`spendgate serve`: mitmproxy embedded with the gateway's stages added in code.

Production runs this, not `mitmdump -s`: a script that fails to reload would be
unloaded by mitmproxy and traffic would pass ungoverned; here it cannot be.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig

from spendgate import logs
from spendgate.gateway import Gateway
from spendgate.settings import Settings

log = logging.getLogger("spendgate")


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    who, where = rest.rsplit("@", 1)
    return f"{scheme}://{who.split(':', 1)[0]}@{where}"


def startup_lines(settings: Settings, ca_path: str, schema: str | None) -> list[str]:
    """What `serve` says it is doing (contract, Start-up): addresses, config, database, providers, CA, next step."""
    p, m = settings.proxy, settings.metrics
    lines = [
        f"proxy listening on {p.listen} (developers set HTTPS_PROXY to it); metrics on http://{m.listen}/metrics",
        f"config: {settings.config_path.resolve() if settings.config_path else 'none found: built-in defaults'}",
        f"database: {_safe_url(settings.database.url)} (schema {schema or 'unknown'})",
    ]
    for prov in settings.providers:
        if not (prov.configured or prov.api_key):
            continue
        source = prov.api_key_source or "no api_key configured"
        state = "present" if prov.api_key else "MISSING: its requests will fail upstream until it is set"
        up = prov.upstream
        where = f", upstream {up.scheme}://{up.host}:{up.port}" if up else ""
        lines.append(f"provider {prov.name}: key from {source}: {state}{where}")
    if not any(prov.api_key for prov in settings.providers):
        lines.append("no provider has an upstream key: set e.g. OPENAI_API_KEY, or api_key under [providers.NAME]")
    lines.append(f"CA certificate: {ca_path} (clients must trust it; `spendgate onboard USER` prints the lines)")
    lines.append("next: `spendgate keys create USER [--cap USD --period month]`, then give USER the lines it prints")
    return lines


class _Dispatch(addonmanager.AddonManager):
    """mitmproxy's addon manager, finding each hook's handlers once instead of walking every addon
    on every event (the addons are fixed once the gateway runs)."""

    def __init__(self, m: master.Master) -> None:
        super().__init__(m)  # type: ignore[no-untyped-call]
        self._handlers: dict[str, list[Callable[..., Any]]] = {}

    def register(self, addon: Any) -> Any:
        self._handlers.clear()
        return super().register(addon)  # type: ignore[no-untyped-call]

    def remove(self, addon: Any) -> None:
        self._handlers.clear()
        super().remove(addon)  # type: ignore[no-untyped-call]

    def _for(self, name: str) -> list[Callable[..., Any]]:
        found = self._handlers.get(name)
        if found is None:
            found = []
            for a in addonmanager.traverse(self.chain):  # type: ignore[no-untyped-call]
                func = getattr(a, name, None)
                if func is not None and callable(func) and not isinstance(func, types.ModuleType):
                    found.append(func)
            self._handlers[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        for func in self._for(event.name):
            try:
                with addonmanager.safecall():
                    res = func(*event.args())
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return


class GatewayMaster(master.Master):
    """mitmproxy with only the addons a gateway needs: the proxy server, its layers and TLS, and
    start-up error checks. No flow store, dumper, playback, scripts, onboarding app or
    per-connection log lines: each would cost every request a little."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=False)
        self.addons = _Dispatch(self)
        self.addons.add(core.Core(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(),  # type: ignore[no-untyped-call]
                        next_layer.NextLayer(), tlsconfig.TlsConfig(), errorcheck.ErrorCheck())


def configure_mitmproxy(opts: options.Options, settings: Settings) -> None:
    """Options exist only once the default addons are loaded, so this runs after the master is built."""
    settings.proxy.confdir.mkdir(parents=True, exist_ok=True)
    opts.update(  # type: ignore[no-untyped-call]
        listen_host=settings.proxy.listen.host,
        listen_port=settings.proxy.listen.port,
        confdir=str(settings.proxy.confdir),
        connection_strategy="lazy",
        mode=["regular"],
        http3=False,
    )


async def _run(settings: Settings) -> None:
    logs.setup(settings.log.level, settings.log.format)
    gw = Gateway(settings)
    try:
        await asyncio.to_thread(gw.start)
    except OSError as e:  # e.g. the metrics address is taken: say so, not a traceback
        log.error("cannot start: %s (metrics listen %s)", e.strerror or e, settings.metrics.listen)
        await asyncio.to_thread(gw.stop)
        raise SystemExit(1) from None
    opts = options.Options()
    master = GatewayMaster(opts)
    configure_mitmproxy(opts, settings)
    master.addons.add(gw.pipeline())  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    ca = settings.proxy.confdir / "mitmproxy-ca-cert.pem"
    for line in startup_lines(settings, str(ca), gw.db.current_revision()):
        log.info("%s", line)
    # What start-up built (mitmproxy, SQLAlchemy, price data: ~10^5 objects) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it (~80 ms each,
    # which every request in flight waited for).
    # Python's default thresholds stay: with a young threshold of 10,000 (which halved the
    # collector's ~70 µs a request) the gateway's RSS grew ~15 KB a request, 300 MB -> 1 GB over
    # 50,000 requests (bench/soak.py); with 700 it stays flat.
    gc.collect()
    gc.freeze()
    try:
        await master.run()
    finally:
        await asyncio.to_thread(gw.stop)


def serve(settings: Settings) -> None:
    asyncio.run(_run(settings))
