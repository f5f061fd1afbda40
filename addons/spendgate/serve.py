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

from spendgate.gateway import Gateway
from spendgate.settings import Settings

log = logging.getLogger("spendgate")


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
        termlog_verbosity="info",
    )


async def _run(settings: Settings) -> None:
    gw = Gateway(settings)
    await asyncio.to_thread(gw.start)
    opts = options.Options()
    master = DumpMaster(opts, with_termlog=True, with_dumper=False)
    configure_mitmproxy(opts, settings)
    master.addons.add(gw.pipeline())  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    log.info("spendgate proxy on %s, metrics on %s", settings.proxy.listen, settings.metrics.listen)
    try:
        await master.run()
    finally:
        await asyncio.to_thread(gw.stop)


def serve(settings: Settings) -> None:
    asyncio.run(_run(settings))
