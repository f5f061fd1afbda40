"""Load Spendgate into stock mitmproxy tools, for development and debugging:

    mitmdump -s addons/spendgate_addon.py --set spendgate_config=spendgate.toml

The config decides the listen address (`[proxy] listen`) and the CA (`[proxy] confdir`), as for
`spendgate serve`. mitmdump opens its own listener (default *:8080, ungoverned) before it loads a script; the
script then moves the proxy to the config's address, which opens only once the gateway is ready.
If 8080 is taken, mitmdump exits before loading the script: add `--listen-port` with any free port.

Production is `spendgate serve` (see spendgate/serve.py for why).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mitmproxy import ctx, exceptions, http  # noqa: E402

from spendgate.gateway import Gateway  # noqa: E402
from spendgate.serve import configure_mitmproxy  # noqa: E402
from spendgate.settings import ConfigError, Settings, load_settings  # noqa: E402
from spendgate.stages.pipeline import Pipeline  # noqa: E402

log = logging.getLogger("spendgate")


def listen_mode(settings: Settings) -> str:
    """The proxy mode with the config's address in it: a server started elsewhere is a different mode."""
    return f"regular@{settings.proxy.listen.host}:{settings.proxy.listen.port}"


class SpendgateScript:
    """Builds the gateway once the `spendgate_config` option is known and adds its pipeline at the end
    of mitmproxy's addon chain, where `serve` has it: after mitmproxy's own TLS set-up, which the
    pipeline's TLS stage adjusts (a script's own hooks run before it)."""

    def __init__(self) -> None:
        self.gw: Gateway | None = None
        self.pipeline: Pipeline | None = None
        self._configuring = False

    def load(self, loader: Any) -> None:
        loader.add_option("spendgate_config", str, "", "Path of the Spendgate config file (TOML).")

    def configure(self, updated: set[str]) -> None:
        # Our own option updates below come back here: only a new config rebuilds the gateway.
        if self._configuring or ("spendgate_config" not in updated and self.gw is not None):
            return
        try:
            settings = load_settings(ctx.options.spendgate_config or None)
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None  # type: ignore[no-untyped-call]
        self._configuring = True
        try:
            configure_mitmproxy(ctx.options, settings)  # same listen address, CA and strategy as `serve`
            ctx.options.update(mode=[listen_mode(settings)])  # type: ignore[no-untyped-call]
        finally:
            self._configuring = False
        self._stop()
        gw = Gateway(settings)
        gw.start()  # blocks the event loop (database, tokenizer, prices), as `configure` runs there; dev-only
        self.gw, self.pipeline = gw, gw.pipeline()
        ctx.master.addons.add(self.pipeline)  # type: ignore[no-untyped-call]
        log.info("spendgate (mitmproxy script) on %s, metrics on %s, config %s", settings.proxy.listen,
                 settings.metrics.listen, settings.config_path or "built-in defaults")

    def running(self) -> None:
        # mitmdump may bring its servers up before this script has loaded (on its default *:8080).
        # Setting the mode again makes it restart any server that is not at the config's address.
        if self.gw is not None:
            self._configuring = True
            try:
                ctx.options.update(mode=[listen_mode(self.gw.settings)])  # type: ignore[no-untyped-call]
            finally:
                self._configuring = False

    def done(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.pipeline is not None:
            ctx.master.addons.remove(self.pipeline)  # type: ignore[no-untyped-call]
            self.pipeline = None
        if self.gw is not None:
            self.gw.stop()
            self.gw = None

    # Fail closed while no gateway is built (a config that failed to load): nothing passes ungoverned.
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def _refuse(self, flow: http.HTTPFlow) -> None:
        if self.pipeline is None and flow.response is None:
            flow.response = http.Response.make(503, b"Spendgate is not configured; see the mitmproxy log.\n",
                                               {"content-type": "text/plain"})


addons = [SpendgateScript()]
