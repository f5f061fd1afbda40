// The official Node SDKs as a developer's script uses them: built with defaults, so the key,
// proxy and CA come from the environment only. One call per SDK (plus a stream for openai).
//
//   node tests/rig/node_sdks.cjs [openai|anthropic|both]
//
// `require('openai')` resolves through NODE_PATH (tools.node_modules()). Each connection fetch
// makes is printed to stderr as "[fetch] ORIGIN via ADDRESS:PORT" (the TCP peer actually
// connected to) or "[fetch] ORIGIN failed: CODE", so a caller can tell a request that went to the
// proxy from one that went straight to the provider. Exit code 1 on any error.
'use strict';

const dc = require('diagnostics_channel');
const origin = (p) => `${p.hostname}:${p.port || (p.protocol === 'https:' ? 443 : 80)}`;
dc.subscribe('undici:client:connected', ({ connectParams, socket }) => {
  console.error(`[fetch] ${origin(connectParams)} via ${socket.remoteAddress}:${socket.remotePort}`);
});
dc.subscribe('undici:client:connectError', ({ connectParams, error }) => {
  console.error(`[fetch] ${origin(connectParams)} failed: ${error.code || error.message}`);
});

const OpenAI = require('openai');
const Anthropic = require('@anthropic-ai/sdk');

async function main(which) {
  if (which !== 'anthropic') {
    const openai = new OpenAI({ maxRetries: 0, timeout: 20000 });
    const r = await openai.chat.completions.create({
      model: 'gpt-4o-mini',
      messages: [{ role: 'user', content: 'say hi' }],
    });
    console.log(`openai: ${r.choices[0].message.content}`);
    const stream = await openai.chat.completions.create({
      model: 'gpt-4o-mini',
      stream: true,
      stream_options: { include_usage: true },
      messages: [{ role: 'user', content: 'say hi' }],
    });
    let text = '';
    for await (const chunk of stream) text += (chunk.choices[0] && chunk.choices[0].delta.content) || '';
    console.log(`openai stream: ${text}`);
  }
  if (which !== 'openai') {
    const anthropic = new Anthropic({ maxRetries: 0, timeout: 20000 });
    const m = await anthropic.messages.create({
      model: 'claude-sonnet-4-20250514',
      max_tokens: 64,
      messages: [{ role: 'user', content: 'say hi' }],
    });
    console.log(`anthropic: ${m.content[0].text}`);
  }
}

main(process.argv[2] || 'both').catch((e) => {
  let cause = e.cause;
  while (cause && cause.cause) cause = cause.cause;
  console.log(`ERROR ${e.constructor.name}: ${e.message}${cause ? ` (cause: ${cause.code || cause.message})` : ''}`);
  process.exitCode = 1;
});
