// The openai npm SDK (uses the built-in fetch). Node 20's fetch ignores the
// proxy variables, so the one documented start-up line sets the dispatcher.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EnvHttpProxyAgent, setGlobalDispatcher } from 'undici';
import OpenAI from 'openai';
import { assertOpenai } from './helpers.mjs';

setGlobalDispatcher(new EnvHttpProxyAgent());
const client = new OpenAI({ apiKey: 'placeholder', maxRetries: 0, timeout: 20000 });

test('chat completion', async () => {
  const { data, response } = await client.chat.completions
    .create({ model: 'gpt-test', messages: [{ role: 'user', content: 'hi' }] })
    .withResponse();
  assert.equal(response.status, 200);
  assertOpenai(data, '/v1/chat/completions');
});

test('chat completion, streaming', async () => {
  const stream = await client.chat.completions.create({
    model: 'gpt-test',
    messages: [{ role: 'user', content: 'hi' }],
    stream: true,
  });
  const parts = [];
  const times = [];
  for await (const chunk of stream) {
    const c = chunk.choices[0]?.delta?.content;
    if (c) {
      parts.push(c);
      times.push(Date.now());
    }
  }
  assert.ok(parts.length >= 3);
  // The upstream sends chunks 0.3 s apart: nothing buffered them.
  assert.ok(times.at(-1) - times[0] >= 400, String(times));
  assertOpenai(JSON.parse(parts.join('')), '/v1/chat/completions');
});
