"""`spendgate serve`: mitmproxy embedded with the gateway's stages added in code.

Production runs this, not `mitmdump -s`: a script that fails to reload would be
unloaded by mitmproxy and traffic would pass ungoverned; here it cannot be.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from mitmproxy import options
from mitmproxy.tools.dump import DumpMaster

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
    await asyncio.to_thread(gw.start)
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=False, with_dumper=False)
    configure_mitmproxy(opts, settings)
    master.addons.add(gw.pipeline())  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    ca = settings.proxy.confdir / "mitmproxy-ca-cert.pem"
    for line in startup_lines(settings, str(ca), gw.db.current_revision()):
        log.info("%s", line)
    try:
        await master.run()
    finally:
        await asyncio.to_thread(gw.stop)


def serve(settings: Settings) -> None:
    asyncio.run(_run(settings))
