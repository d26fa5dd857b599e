// `npm run build` (also run by `prepare`, so by npm pack / npm publish): compiles
// ts/ and protocol/ into dist/ with tsconfig.build.json. tsc rewrites relative
// `.ts` imports to `.js` in the JavaScript but leaves them in the .d.ts files;
// those are rewritten here so older TypeScript versions read them too.
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { execa } from "execa";
import { repoRoot } from "./python.mjs";

const dist = join(repoRoot, "dist");
rmSync(dist, { recursive: true, force: true }); // no stale files of removed sources in the package
const tsc = await execa("tsc", ["-p", "tsconfig.build.json"], { cwd: repoRoot, preferLocal: true, stdio: "inherit", reject: false });
if (tsc.exitCode !== 0) {
  console.error(`build: tsc failed (${tsc.exitCode ?? tsc.signal ?? tsc.originalMessage})`);
  process.exit(tsc.exitCode || 1);
}

const relativeTs = /((?:from|import)\s*\(?\s*["'])(\.\.?\/[^"']*?)\.ts(["'])/g;
for (const entry of readdirSync(dist, { recursive: true, withFileTypes: true })) {
  if (!entry.isFile() || !entry.name.endsWith(".d.ts")) continue;
  const file = join(entry.parentPath ?? entry.path, entry.name);
  const text = readFileSync(file, "utf8");
  const fixed = text.replace(relativeTs, "$1$2.js$3");
  if (fixed !== text) writeFileSync(file, fixed);
}
