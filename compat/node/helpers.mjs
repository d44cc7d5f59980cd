// Shared assertions: the real key arrived at the stand-in upstream, the
// placeholder and the proxy credentials did not.
import assert from 'node:assert/strict';

export const OPENAI_KEY = process.env.KEYGATE_COMPAT_OPENAI_KEY;

export function headersOf(echo) {
  const out = {};
  for (const [name, value] of echo.headers) (out[name.toLowerCase()] ??= []).push(value);
  return out;
}

export function assertOpenai(echo, path = '/v1/models') {
  const h = headersOf(echo);
  assert.deepEqual(h.authorization, [`Bearer ${OPENAI_KEY}`]);
  assert.equal(h['proxy-authorization'], undefined);
  assert.ok(!JSON.stringify(echo).includes('placeholder'), JSON.stringify(echo));
  assert.ok(echo.target.startsWith(path), echo.target);
}
