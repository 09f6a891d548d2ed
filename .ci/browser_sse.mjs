// A real browser's EventSource against ringcast (headless Chromium via playwright-core):
// receives persistent events, loses its stream when the backend disconnects the customer,
// reconnects by itself with Last-Event-ID, and ends with every event exactly once, in order.
// Usage: node browser_sse.mjs ADDR TOKEN API_KEY CUSTOMER CHROMIUM_PATH
import { chromium } from 'playwright-core';

const [addr, token, apiKey, customer, executablePath] = process.argv.slice(2);
const base = `http://${addr}`;

async function publish(seq) {
  const r = await fetch(`${base}/v1/publish`, {
    method: 'POST',
    headers: { 'Authorization': `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({
      customers: [customer],
      event: { type: 'case_status_update', persistent: true, data: { seq } },
    }),
  });
  if (r.status !== 200) throw new Error(`publish ${seq}: ${r.status} ${await r.text()}`);
  return r.json();
}

async function waitFor(page, n, what) {
  const deadline = Date.now() + 15000;
  while (Date.now() < deadline) {
    const got = await page.evaluate(() => window.got.length);
    if (got >= n) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}: ${JSON.stringify(await page.evaluate(() => window.log))}`);
}

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
try {
  const page = await browser.newPage();
  // Same origin as the stream: the page is any ringcast URL.
  await page.goto(`${base}/healthz`);
  await page.evaluate((token) => {
    window.got = [];
    window.log = [];
    const es = new EventSource(`/v1/events/stream?token=${encodeURIComponent(token)}&events=case_`);
    es.onopen = () => window.log.push('open');
    es.onerror = () => window.log.push(`error(readyState=${es.readyState})`);
    es.addEventListener('connection_established', () => window.log.push('established'));
    es.addEventListener('case_status_update', (e) => {
      window.got.push({ seq: JSON.parse(e.data).seq, id: e.lastEventId });
    });
  }, token);
  await page.waitForFunction(() => window.log.includes('established'), null, { timeout: 15000 }).catch(async (e) => {
    throw new Error(`no connection_established: ${JSON.stringify(await page.evaluate(() => window.log))}`);
  });
  let handed = 0;
  for (const seq of [1, 2, 3]) handed += (await publish(seq)).delivered.sse;
  if (handed !== 3) throw new Error(`expected 3 live SSE deliveries, got ${handed}`);
  await waitFor(page, 3, 'the first three events');
  // The server closes the stream; the browser reconnects by itself after `retry:`.
  const d = await fetch(`${base}/v1/disconnect`, {
    method: 'POST',
    headers: { 'Authorization': `Bearer ${apiKey}` },
    body: JSON.stringify({ customers: [customer] }),
  }).then((r) => r.json());
  if (d.closed.sse !== 1) throw new Error(`disconnect closed ${JSON.stringify(d)}`);
  let queued = 0;
  for (const seq of [4, 5, 6]) queued += (await publish(seq)).queued;
  await waitFor(page, 6, 'the events published while the stream was down');
  const got = await page.evaluate(() => window.got);
  const log = await page.evaluate(() => window.log);
  const seqs = got.map((g) => g.seq);
  if (JSON.stringify(seqs) !== JSON.stringify([1, 2, 3, 4, 5, 6])) {
    throw new Error(`expected 1..6 once each, got ${JSON.stringify(seqs)} (log ${log})`);
  }
  if (log.filter((l) => l === 'open').length < 2) throw new Error(`no reconnect: ${log}`);
  if (queued < 1) throw new Error('every event went out live: the resume path was not exercised');
  if (!got.every((g) => g.id)) throw new Error('events without Last-Event-ID');
  console.log(`browser EventSource: 6/6 events in order, ${queued} stored while disconnected and replayed on resume; log ${log.join(' ')}`);
} finally {
  await browser.close();
}
