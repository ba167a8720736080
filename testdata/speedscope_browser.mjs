// Loads a speedscope JSON file in speedscope's own built app (its npm package) in a headless
// Chromium driven by puppeteer-core, opens the Sandwich view (a DOM table, sorted by self time
// by default) and prints, as JSON, its rows from the top, the profiles speedscope lists, and
// every page error or console error seen on the way.
// Usage: node speedscope_browser.mjs NODE_MODULES FILE CHROMIUM
// The app and the file are served from 127.0.0.1 on a free port: speedscope fetches
// `#profileURL=` only over http(s). Every step has its own time limit, and the whole run one
// (20 s): a stuck browser ends the script with exit code 5 instead of hanging the test.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const [nm, file, chromium] = process.argv.slice(2);
const require = createRequire(nm + '/');
const puppeteer = require('puppeteer-core');
const app = path.join(nm, 'speedscope', 'dist', 'release');
const STEP = 10000;

let browser = null;
const fail = async (code, msg) => {
  console.error(msg);
  // The browser talks over a pipe (below): it exits when this process does, even if close hangs.
  process.exit(code);
};
setTimeout(() => fail(5, 'speedscope did not render the profile within 20 s'), 20000).unref();

const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.json': 'application/json', '.wasm': 'application/wasm' };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const p = url.pathname === '/profile.json' ? file : path.join(app, path.normalize(url.pathname));
  if (!p.startsWith(app) && p !== file) { res.writeHead(403).end(); return; }
  fs.readFile(p, (err, data) => {
    if (err) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': types[path.extname(p)] || 'application/octet-stream' }).end(data);
  });
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const port = server.address().port;

const errors = [];
try {
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: 'shell',
    pipe: true,
    timeout: STEP,
    protocolTimeout: STEP,
    // Root in a container has no user namespace sandbox; WebGL (speedscope's flame graphs) in
    // software, as there is no GPU.
    args: ['--no-sandbox', '--disable-gpu', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP);
  page.on('pageerror', (e) => errors.push('pageerror: ' + e.message));
  page.on('console', (m) => { if (m.type() === 'error') errors.push('console: ' + m.text()); });
  // speedscope says "Unrecognized format!" and the like in an alert: no table will come.
  page.on('dialog', (d) => fail(7, `speedscope refused the file: ${d.message()}`));
  await page.setViewport({ width: 1400, height: 900 });
  await page.goto(`http://127.0.0.1:${port}/index.html#profileURL=/profile.json&view=sandwich`, { waitUntil: 'load' });
  // The Sandwich table: a header table (Total, Self, Symbol Name), its rows in the table after
  // it, each row: total, self (text like `358.70ms (33%)`), name (file in its tooltip). The
  // profile picker (a table of threads: #, Name, Total Weight) is in the DOM too.
  const read = () => {
    const tables = [...document.querySelectorAll('table')];
    const text = (c) => c.textContent.trim();
    const h = tables.findIndex((t) => [...t.querySelectorAll('th')].map(text).join('|') === 'Total|Self|Symbol Name');
    const body = h >= 0 ? tables[h + 1] : null;
    if (!body || !body.querySelector('tr td')) return null;
    const rows = [...body.querySelectorAll('tr')].slice(0, 10).map((r) => {
      const c = [...r.querySelectorAll('td')];
      return { total: text(c[0]), self: text(c[1]), name: text(c[2]), file: c[2].title || null };
    });
    const picker = tables.find((t) => [...t.querySelectorAll('th')].map(text).join('|') === '#|Name|Total Weight');
    const profiles = picker ? [...picker.querySelectorAll('tbody tr')].map((r) => text(r.querySelectorAll('td')[1])) : [];
    return { rows, profiles };
  };
  await page.waitForFunction(read);
  const { rows, profiles } = await page.evaluate(read);
  const title = await page.title();
  console.log(JSON.stringify({ title, rows, profiles, errors }));
  await browser.close();
  server.close();
  process.exit(0);
} catch (e) {
  await fail(6, `${e.message}\npage errors: ${JSON.stringify(errors)}`);
}
