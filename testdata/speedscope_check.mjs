// Checks a speedscope JSON file against speedscope's own published schema (from its npm
// package) and prints, as JSON, the frame with the most self weight over all profiles.
// Usage: node speedscope_check.mjs NODE_MODULES FILE
import { createRequire } from 'node:module';
import fs from 'node:fs';
const [nm, file] = process.argv.slice(2);
const require = createRequire(nm + '/');
const Ajv = require('ajv');
const schema = JSON.parse(fs.readFileSync(nm + '/speedscope/dist/release/file-format-schema.json'));
const doc = JSON.parse(fs.readFileSync(file));
const ajv = new Ajv({ strict: false });
const validate = ajv.compile({ ...schema, $ref: '#/definitions/FileFormat.File' });
if (!validate(doc)) { console.error(JSON.stringify(validate.errors)); process.exit(2); }
const self = new Map();
for (const p of doc.profiles) {
  if (p.samples.length !== p.weights.length) { console.error('samples/weights differ'); process.exit(3); }
  p.samples.forEach((s, i) => {
    for (const f of s) if (!(f >= 0 && f < doc.shared.frames.length)) { console.error('bad frame', f); process.exit(4); }
    const leaf = s[s.length - 1];
    self.set(leaf, (self.get(leaf) || 0) + p.weights[i]);
  });
}
const [top] = [...self.entries()].sort((a, b) => b[1] - a[1]);
const total = [...self.values()].reduce((a, b) => a + b, 0);
console.log(JSON.stringify({ top: doc.shared.frames[top[0]], share: top[1] / total, profiles: doc.profiles.length }));
