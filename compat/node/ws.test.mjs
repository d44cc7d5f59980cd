// ws through the proxy (CONNECT + TLS), with https-proxy-agent reading HTTPS_PROXY.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { HttpsProxyAgent } from 'https-proxy-agent';
import { assertOpenai } from './helpers.mjs';

test('ws wss:// echo through keygate', async () => {
  const ws = new WebSocket('wss://api.openai.com/v1/realtime?model=gpt-test', {
    agent: new HttpsProxyAgent(process.env.HTTPS_PROXY),
    headers: { Authorization: 'Bearer placeholder' },
    handshakeTimeout: 15000,
  });
  const messages = [];
  const done = new Promise((resolve, reject) => {
    ws.on('error', reject);
    ws.on('unexpected-response', (_req, res) => reject(new Error(`upgrade answered ${res.statusCode}`)));
    ws.on('message', (data) => {
      messages.push(data.toString());
      if (messages.length === 1) ws.send('ping-42');
      else resolve();
    });
  });
  const timer = setTimeout(() => ws.terminate(), 20000);
  try {
    await done;
  } finally {
    clearTimeout(timer);
    ws.close();
  }
  const first = JSON.parse(messages[0]);
  assert.equal(first.websocket, true);
  assertOpenai(first, '/v1/realtime');
  assert.equal(messages[1], 'ping-42');
});
