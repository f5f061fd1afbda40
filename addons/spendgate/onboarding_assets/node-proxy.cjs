// Spendgate: make Node's built-in fetch() honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY.
//
// Why: Node 18-23's fetch (an undici bundled inside Node) ignores the proxy variables, so the
// official SDKs (`openai`, `@anthropic-ai/sdk`, which call fetch) go straight to the provider and
// bypass the gateway - with whatever key the developer has set. Node >= 24 does this itself
// with NODE_USE_ENV_PROXY=1. Node's bundled undici is not importable, but fetch looks its
// dispatcher up in a process-global slot that the npm `undici` package's setGlobalDispatcher()
// writes, so an EnvHttpProxyAgent from that package routes fetch through the proxy (with the
// HTTPS_PROXY user:password sent as Proxy-Authorization). Trust comes from NODE_EXTRA_CA_CERTS,
// which applies to every TLS connection Node makes.
//
// Use:   NODE_OPTIONS="--require /path/to/node-proxy.cjs"
// Needs: the npm package undici (>= 6.13; 7.x on Node >= 20.18), found next to this file
//        (./node_modules/undici), through NODE_PATH, in the global npm root
//        (`npm install -g undici@7`), or at $SPENDGATE_UNDICI (a path to the package).
// It covers fetch only: node:http/https clients (axios, got, node-fetch) need their own agent.
'use strict';

(function spendgateNodeProxy() {
  const env = process.env;
  const proxy = env.HTTPS_PROXY || env.https_proxy || env.HTTP_PROXY || env.http_proxy;
  if (!proxy) return;
  const [major] = process.versions.node.split('.').map(Number);
  if (major >= 24 && env.NODE_USE_ENV_PROXY === '1') return; // Node's own support is on

  const path = require('path');
  const candidates = [];
  if (env.SPENDGATE_UNDICI) candidates.push(path.resolve(env.SPENDGATE_UNDICI));
  candidates.push(path.join(__dirname, 'node_modules', 'undici'));
  candidates.push('undici'); // NODE_PATH, or a node_modules above this file
  const prefix = env.npm_config_prefix || env.PREFIX;
  if (prefix) candidates.push(path.join(prefix, 'lib', 'node_modules', 'undici'));
  const exeDir = path.dirname(process.execPath);
  candidates.push(path.join(exeDir, '..', 'lib', 'node_modules', 'undici')); // POSIX global root
  candidates.push(path.join(exeDir, 'node_modules', 'undici')); // Windows global root

  let undici = null;
  for (const c of candidates) {
    try {
      const mod = require(c);
      if (mod && typeof mod.EnvHttpProxyAgent === 'function' && typeof mod.setGlobalDispatcher === 'function') {
        undici = mod;
        break;
      }
    } catch (_) {
      // not there; try the next place
    }
  }
  if (!undici) {
    process.emitWarning(
      'undici (>= 6.13) not found: fetch() will NOT go through HTTPS_PROXY. ' +
        'Install it with `npm install -g undici@7` or set SPENDGATE_UNDICI to its path.',
      { code: 'SPENDGATE_NO_UNDICI' },
    );
    return;
  }
  undici.setGlobalDispatcher(new undici.EnvHttpProxyAgent());
})();
