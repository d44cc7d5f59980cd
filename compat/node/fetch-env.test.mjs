// Built-in fetch with nothing but the variables keygate run sets
// (HTTPS_PROXY and NODE_USE_ENV_PROXY=1).
import { test } from 'node:test';
import { assertOpenai } from './helpers.mjs';

test('global fetch honours HTTPS_PROXY via NODE_USE_ENV_PROXY', async () => {
  const r = await fetch('https://api.openai.com/v1/models', {
    headers: { Authorization: 'Bearer placeholder' },
    signal: AbortSignal.timeout(20000),
  });
  assertOpenai(await r.json());
});
