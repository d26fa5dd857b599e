// npm run bench:bridge: the bridge's cost over raw ZeroMQ, measured in one run.
//  - ping: median round trip of 1,000 sequential `ping` calls over ipc, against a raw
//    zeromq.js DEALER <-> pyzmq ROUTER echo of a same-sized message;
//  - tensor: throughput of echoing a 64 MB float32 tensor (`debug.echo`, both ways),
//    against the raw echo of a 64 MB frame.
// Ratios are bridge / raw (time) and raw / bridge (throughput): 1.0 is free, target <= 1.5.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Dealer } from "zeromq";
import { Sidecar, Tensor } from "../ts/index.ts";
import { repoRoot } from "../ts/sidecar.ts";
import { encode } from "../ts/wire.ts";

const PINGS = 1000;
const ROUNDS = 8; // 64 MB echoes
const MB = 1024 * 1024;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function timeEach(n: number, fn: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await fn();
    out.push(performance.now() - t0);
  }
  return out;
}

/** The raw baseline: bench/bridge/echo.py, a pyzmq ROUTER that returns every message. */
async function startRawEcho() {
  const dir = mkdtempSync(join(tmpdir(), "nanotune-bench-"));
  const python = process.env.NANOTUNE_PYTHON ?? join(repoRoot, ".venv", "bin", "python");
  const child = spawn(python, [join(repoRoot, "bench", "bridge", "echo.py"), `ipc://${join(dir, "raw.sock")}`], { stdio: ["ignore", "pipe", "inherit"] });
  const endpoint = await new Promise<string>((resolve) => child.stdout!.setEncoding("utf8").once("data", (d: string) => resolve(d.trim())));
  const sock = new Dealer({ linger: 0 });
  sock.connect(endpoint);
  return {
    roundTrip: async (parts: Uint8Array[]) => {
      await sock.send(parts);
      return sock.receive();
    },
    close() {
      sock.close();
      child.kill("SIGTERM");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const payload = randomBytes(64 * MB);
const tensor = new Tensor("float32", [payload.byteLength / 4], payload);
const pingEnvelope = [encode({ v: 1, id: 1, method: "ping", params: {} })]; // the bytes of a bridge ping
const echoEnvelope = encode({ v: 1, id: 1, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [payload.byteLength / 4], frame: 0 } } });
const raw = await startRawEcho();
const sc = await Sidecar.start({ device: "cpu" });
const samples = { bridgePing: [] as number[], rawPing: [] as number[], bridgeEcho: [] as number[], rawEcho: [] as number[] };
try {
  // warm up both, then alternate blocks so that load from other processes hits both alike
  await timeEach(100, () => sc.call("ping", {}));
  await timeEach(100, () => raw.roundTrip(pingEnvelope));
  for (let block = 0; block < 10; block++) {
    samples.bridgePing.push(...(await timeEach(PINGS / 10, () => sc.call("ping", {}))));
    samples.rawPing.push(...(await timeEach(PINGS / 10, () => raw.roundTrip(pingEnvelope))));
  }
  await sc.call("debug.echo", { tensor });
  await raw.roundTrip([echoEnvelope, payload]);
  for (let round = 0; round < ROUNDS; round++) {
    samples.bridgeEcho.push(
      ...(await timeEach(1, async () => {
        const r = await sc.call("debug.echo", { tensor });
        if (r.tensor!.bytes.byteLength !== payload.byteLength) throw new Error("debug.echo returned a different size");
      })),
    );
    samples.rawEcho.push(...(await timeEach(1, () => raw.roundTrip([echoEnvelope, payload]))));
  }
} finally {
  await sc.close();
  raw.close();
}
const b = { ping: median(samples.bridgePing), echo: median(samples.bridgeEcho), endpoint: sc.endpoint };
const r = { ping: median(samples.rawPing), echo: median(samples.rawEcho) };
const mbps = (ms: number) => (2 * 64) / (ms / 1000); // both directions
const row = (name: string, bridgeV: string, rawV: string, ratio: number) =>
  console.log(`${name.padEnd(28)} ${bridgeV.padStart(14)} ${rawV.padStart(14)} ${ratio.toFixed(2).padStart(8)}x`);
console.log(`nanotune bridge vs raw ZeroMQ echo (${b.endpoint.split(":")[0]}, ${PINGS} pings, ${ROUNDS} x 64 MB; node ${process.version})`);
console.log(`${"".padEnd(28)} ${"bridge".padStart(14)} ${"raw echo".padStart(14)} ${"ratio".padStart(9)}`);
row("ping round trip (median)", `${(b.ping * 1000).toFixed(0)} us`, `${(r.ping * 1000).toFixed(0)} us`, b.ping / r.ping);
row("64 MB tensor echo (median)", `${b.echo.toFixed(1)} ms`, `${r.echo.toFixed(1)} ms`, b.echo / r.echo);
row("64 MB throughput", `${mbps(b.echo).toFixed(0)} MB/s`, `${mbps(r.echo).toFixed(0)} MB/s`, mbps(r.echo) / mbps(b.echo));
const worst = Math.max(b.ping / r.ping, b.echo / r.echo);
console.log(worst <= 1.5 ? `within 1.5x of raw (worst ratio ${worst.toFixed(2)}x)` : `NOT within 1.5x of raw (worst ratio ${worst.toFixed(2)}x)`);
