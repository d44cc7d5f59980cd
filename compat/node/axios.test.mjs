// axios reads HTTPS_PROXY itself and sends absolute-form `https://` requests
// to the proxy (no CONNECT); keygate forwards them over TLS and injects.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import axios from 'axios';
import { assertOpenai } from './helpers.mjs';

test('axios GET and POST through HTTPS_PROXY', async () => {
  const get = await axios.get('https://api.openai.com/v1/models', {
    headers: { Authorization: 'Bearer placeholder' },
    timeout: 20000,
  });
  assert.equal(get.status, 200);
  assertOpenai(get.data);

  const post = await axios.post(
    'https://api.openai.com/v1/chat/completions',
    { model: 'gpt-test', messages: [{ role: 'user', content: 'hi' }] },
    { headers: { Authorization: 'Bearer placeholder' }, timeout: 20000 },
  );
  assertOpenai(post.data, '/v1/chat/completions');
  assert.ok(post.data.body_len > 20);
});

test('axios SSE stream (absolute-form https://, not buffered)', async () => {
  const r = await axios.post(
    'https://api.openai.com/v1/chat/completions',
    { model: 'gpt-test', messages: [], stream: true },
    { headers: { Authorization: 'Bearer placeholder' }, responseType: 'stream', timeout: 20000 },
  );
  assert.match(r.headers['content-type'], /^text\/event-stream/);
  let buf = '';
  const parts = [];
  const times = [];
  for await (const chunk of r.data) {
    buf += chunk.toString();
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!event.startsWith('data: {')) continue;
      const content = JSON.parse(event.slice(6)).choices[0].delta.content;
      if (content) {
        parts.push(content);
        times.push(Date.now());
      }
    }
  }
  assert.ok(times.at(-1) - times[0] >= 400, String(times));
  assertOpenai(JSON.parse(parts.join('')), '/v1/chat/completions');
});

test('axios 4 MiB upload (absolute-form https://)', async () => {
  const body = Buffer.alloc(4 * 1024 * 1024, 0x61);
  const r = await axios.post('https://api.openai.com/v1/files', body, {
    headers: { Authorization: 'Bearer placeholder', 'Content-Type': 'application/octet-stream' },
    maxBodyLength: Infinity,
    timeout: 30000,
  });
  assertOpenai(r.data, '/v1/files');
  assert.equal(r.data.body_len, body.length);
});
