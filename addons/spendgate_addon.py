"""Load Spendgate into stock mitmproxy tools, for development and debugging:

    mitmdump -s addons/spendgate_addon.py --set spendgate_config=spendgate.toml

Production is `spendgate serve` (see spendgate/serve.py for why).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mitmproxy import ctx, exceptions  # noqa: E402

from spendgate.gateway import Gateway  # noqa: E402
from spendgate.settings import ConfigError, load_settings  # noqa: E402
from spendgate.stages.pipeline import Pipeline  # noqa: E402


class SpendgateScript:
    """Builds the runtime once the `spendgate_config` option is known, then hands events to the pipeline."""

    def __init__(self) -> None:
        self.gw: Gateway | None = None
        self.pipeline: Pipeline | None = None

    def load(self, loader: Any) -> None:
        loader.add_option("spendgate_config", str, "", "Path of the Spendgate config file (TOML).")

    def configure(self, updated: set[str]) -> None:
        if "spendgate_config" not in updated and self.gw is not None:
            return
        try:
            settings = load_settings(ctx.options.spendgate_config or None)
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
        if any(p.upstream and not p.verify_upstream_tls for p in settings.providers) and not ctx.options.ssl_insecure:
            # Scripts run before mitmproxy's TLS set-up, so per-upstream relaxing is not possible here.
            ctx.options.update(ssl_insecure=True)
        if self.gw is not None:
            self.gw.stop()
        self.gw = Gateway(settings)
        self.gw.start()
        self.pipeline = self.gw.pipeline()

    def done(self) -> None:
        if self.gw is not None:
            self.gw.stop()

    async def _run(self, hook: str, arg: Any) -> None:
        fn = getattr(self.pipeline, hook, None)
        if fn is not None:
            r = fn(arg)
            if r is not None:
                await r

    async def tls_clienthello(self, data: Any) -> None:
        await self._run("tls_clienthello", data)

    async def tls_start_server(self, data: Any) -> None:
        await self._run("tls_start_server", data)

    async def server_connect(self, data: Any) -> None:
        await self._run("server_connect", data)

    async def http_connect(self, flow: Any) -> None:
        await self._run("http_connect", flow)

    async def requestheaders(self, flow: Any) -> None:
        await self._run("requestheaders", flow)

    async def request(self, flow: Any) -> None:
        await self._run("request", flow)

    async def responseheaders(self, flow: Any) -> None:
        await self._run("responseheaders", flow)

    async def response(self, flow: Any) -> None:
        await self._run("response", flow)

    async def error(self, flow: Any) -> None:
        await self._run("error", flow)


addons = [SpendgateScript()]
