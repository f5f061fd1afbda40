"""Demo (not a test): the official Node SDKs on this machine's Node, through a real gateway.

    .venv/bin/python -m tests.rig.demo_node_proxy

Starts the TLS mock provider and a ``spendgate serve``, mints a key, then runs
``tests/rig/node_sdks.cjs`` twice with only the developer's environment lines set:

1. without the preload: on Node < 24 fetch ignores HTTPS_PROXY and connects to the provider
   itself (here: no DNS, so it fails; on a workstation it would reach the real API);
2. with ``NODE_OPTIONS=--require addons/spendgate/onboarding_assets/node-proxy.cjs``: every
   call goes through the gateway, the mock sees the team's upstream key, and each call has its
   audit row.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.rig import tools
from tests.rig.gateway import REPO_ROOT, GatewayProcess
from tests.rig.mock_provider import MockProvider

CLIENT = REPO_ROOT / "tests" / "rig" / "node_sdks.cjs"


def run(env: dict[str, str], label: str) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([str(tools.node()), str(CLIENT), "both"], env=env, capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    print(f"--- {label}: exit {cp.returncode}")
    for line in (cp.stdout + cp.stderr).splitlines():
        print(f"    {line}")
    return cp


def main() -> int:
    try:
        modules = tools.node_modules()
    except tools.ToolUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    node_version = subprocess.run([str(tools.node()), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"node {node_version}; SDKs from {modules}")
    with MockProvider() as mock, tempfile.TemporaryDirectory(prefix="sg-node-demo-") as tmp:
        gw = GatewayProcess(Path(tmp) / "gw", mock.url, name="node-demo").start()
        try:
            key = gw.create_key("node-dev", team="web")["key"]
            env = gw.client_env(key, user="node-dev")
            env.update({"OPENAI_API_KEY": "spendgate", "ANTHROPIC_API_KEY": "spendgate", "NODE_PATH": str(modules)})
            env.pop("NODE_OPTIONS", None)

            run(env, "without the preload")
            print(f"    mock received {len(mock.requests)} requests")

            run(env | tools.node_proxy_env(), "with NODE_OPTIONS=--require node-proxy.cjs")
            for rec in mock.wait_for(3, timeout=10):
                sent = rec.header("authorization") or rec.header("x-api-key")
                print(f"    mock: {rec.method} {rec.path} provider={rec.provider} key={sent}")
            for row in gw.cli_json("audit", "--limit", "10"):
                print(f"    audit: user={row['user']} {row['endpoint_kind']} model={row['model_requested']} "
                      f"tokens={row['input_tokens']}/{row['output_tokens']} cost={row['cost_usd']} "
                      f"outcome={row['outcome']}")
        finally:
            gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
