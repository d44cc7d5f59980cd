// fetch with undici's EnvHttpProxyAgent (reads HTTPS_PROXY / NO_PROXY).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EnvHttpProxyAgent, fetch as undiciFetch, setGlobalDispatcher } from 'undici';
import { assertOpenai } from './helpers.mjs';

setGlobalDispatcher(new EnvHttpProxyAgent());

test('built-in fetch with setGlobalDispatcher(new EnvHttpProxyAgent())', async () => {
  const r = await fetch('https://api.openai.com/v1/models', {
    headers: { Authorization: 'Bearer placeholder' },
    signal: AbortSignal.timeout(20000),
  });
  assert.equal(r.status, 200);
  assertOpenai(await r.json());
});

test('undici fetch, POST body', async () => {
  const r = await undiciFetch('https://api.openai.com/v1/chat/completions', {
    method: 'POST',
    headers: { Authorization: 'Bearer placeholder', 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-test', messages: [] }),
    signal: AbortSignal.timeout(20000),
  });
  const echo = await r.json();
  assertOpenai(echo, '/v1/chat/completions');
  assert.ok(echo.body_len > 10);
});
