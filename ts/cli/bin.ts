#!/usr/bin/env node
// The `nanotune` executable: package.json "bin" points at its build,
// dist/ts/cli/bin.js. From a checkout: `npx tsx ts/cli/bin.ts <command>`.
import { main } from "./index.ts";

process.exit(await main(process.argv.slice(2)));
