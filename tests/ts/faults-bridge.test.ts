// Faults of the bridge, against real sidecar processes and real sockets (no mocks):
// strangers on the tcp endpoint, a stopped or stuck sidecar, a lost reply, kill -9
// during real training steps. Each test fails (or hangs) without the fix it covers:
// CURVE on tcp, the heartbeat, the lost-reply check, SIDECAR_CRASHED on exit.
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Dealer, curveKeyPair } from "zeromq";
import { Sidecar, SidecarError, Tensor } from "../../ts/index.ts";
import { decode, encode } from "../../ts/wire.ts";
import { alive, goneWithin, settled, waitFor } from "./fixtures/procs.ts";

const fixtures = join(dirname(fileURLToPath(import.meta.url)), "fixtures");
/** A sidecar that also loads tests/ts/fixtures/bridge_faults.py (test.hang_io; debug.store loses the reply for key "lose-my-reply"). */
const withFaults = { NANOTUNE_SIDECAR_MODULES: "bridge_faults", PYTHONPATH: fixtures };

async function rejection(p: Promise<unknown>): Promise<SidecarError> {
  const r = await settled(p);
  if (r.ok) throw new Error(`expected the call to reject, it returned ${JSON.stringify(r.value)}`);
  expect(r.error).toBeInstanceOf(SidecarError);
  return r.error as SidecarError;
}

/** Sends a ping on a raw DEALER with the given socket options; what came back within `ms` (null: nothing). */
async function strangerPing(endpoint: string, options: ConstructorParameters<typeof Dealer>[0], ms: number): Promise<unknown> {
  const sock = new Dealer({ linger: 0, receiveTimeout: ms, sendTimeout: ms, ...options });
  sock.connect(endpoint);
  try {
    await sock.send(encode({ v: 1, id: 1, method: "ping", params: {} }));
    const [env] = await sock.receive();
    return decode(env!);
  } catch (e) {
    if ((e as { code?: string }).code === "EAGAIN") return null; // receiveTimeout (or sendTimeout) passed
    throw e;
  } finally {
    sock.close();
  }
}

describe("tcp is CURVE: only our client gets in", () => {
  let sc: Sidecar;
  beforeAll(async () => {
    // heartbeat off: its status calls would blur the exact `served` count below
    sc = await Sidecar.start({ device: "cpu", transport: "tcp", heartbeatMs: Infinity, onStderr: () => undefined });
  });
  afterAll(async () => {
    await sc?.close();
  });

  it("reports tcp + curve at hello, and a raw DEALER without our keys (none, wrong client keys, wrong server key) gets no answer in 2 s while the client works", async () => {
    expect(sc.endpoint).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
    expect(sc.info).toMatchObject({ transport: "tcp", security: "curve" });
    const before = await sc.call("status", {});
    const mine = curveKeyPair();
    const strangers = Promise.all([
      strangerPing(sc.endpoint, {}, 2000), // no CURVE at all (NULL mechanism)
      strangerPing(sc.endpoint, { curveServerKey: sc.curveServerKey!, curvePublicKey: mine.publicKey, curveSecretKey: mine.secretKey }, 2000), // not our client key
      strangerPing(sc.endpoint, { curveServerKey: curveKeyPair().publicKey, curvePublicKey: mine.publicKey, curveSecretKey: mine.secretKey }, 2000), // wrong server key
    ]);
    // meanwhile the real client, on the same sidecar, is answered
    for (let i = 0; i < 20; i++) expect(await sc.call("ping", {})).toEqual({});
    expect(await strangers).toEqual([null, null, null]);
    const after = await sc.call("status", {});
    expect(after.pid).toBe(before.pid);
    expect(after.served - before.served).toBe(21); // our 20 pings and the first status: no stranger's ping was served
  });

  it.runIf(existsSync("/proc/self/cmdline"))("hands the keys over on stdin: neither argv (ps) nor the environment holds them", () => {
    const cmdline = readFileSync(`/proc/${sc.pid}/cmdline`, "utf8");
    expect(cmdline).toContain("--keys-from-stdin");
    for (const where of [cmdline, readFileSync(`/proc/${sc.pid}/environ`, "utf8")]) {
      expect(where).not.toContain(sc.curveServerKey!);
    }
  });
});

describe("heartbeat", () => {
  let sc: Sidecar;
  beforeAll(async () => {
    sc = await Sidecar.start({ device: "cpu", heartbeatMs: 100, heartbeatMisses: 3, env: withFaults });
  });
  afterAll(async () => {
    await sc?.close();
  });

  it("does not fire during a long compute call that never yields (the I/O thread answers the heartbeats)", async () => {
    const r = await sc.call("debug.busy", { seconds: 3, cooperative: false });
    expect(r.seconds).toBeGreaterThanOrEqual(3);
    expect(await sc.call("ping", {})).toEqual({});
  });

  it("rejects a compute call whose reply was lost with INTERNAL 'lost reply' naming it, and the sidecar keeps serving", async () => {
    const err = await rejection(sc.call("debug.store", { key: "lose-my-reply", value: 1 })); // the fixture routes its reply to nobody
    expect(err.code).toBe("INTERNAL");
    expect(err.message).toMatch(/^debug\.store \(id \d+\): lost reply: the sidecar is not running it \(status: idle\)/);
    expect(err.method).toBe("debug.store");
    expect(await sc.call("ping", {})).toEqual({});
    expect((await sc.call("status", {})).busy).toBeNull();
  });
});

describe("heartbeat beside bulk data", () => {
  it("does not fire while 128 MB tensors cross tcp with CURVE (~1 s each way) under a 250 ms x 2 heartbeat", async () => {
    // The beats travel on a connection of their own with their own ZeroMQ I/O threads: on
    // the main socket they would wait behind each tensor (CURVE encrypts a whole message
    // at once), silent for longer than the heartbeat's window.
    const sc = await Sidecar.start({ device: "cpu", transport: "tcp", heartbeatMs: 250, heartbeatMisses: 2 });
    try {
      const bytes = randomBytes(128 * 1024 * 1024);
      const t0 = performance.now();
      for (let i = 0; i < 2; i++) {
        const r = await sc.call("debug.echo", { tensor: new Tensor("float32", [bytes.length / 4], bytes) });
        expect(r.tensor!.bytes.byteLength).toBe(bytes.length);
      }
      console.log(`2 x 128 MB echo over tcp+CURVE: ${(performance.now() - t0).toFixed(0)} ms, heartbeat window 500 ms`);
    } finally {
      await sc.close();
    }
  });
});

describe("an unresponsive sidecar", () => {
  it("SIGSTOP: pending calls reject with SIDECAR_UNRESPONSIVE within the heartbeat, 'looks stopped', and the process is killed", async () => {
    const heartbeatMs = 200;
    const heartbeatMisses = 3;
    const sc = await Sidecar.start({ device: "cpu", heartbeatMs, heartbeatMisses });
    const socketDir = dirname(sc.endpoint.slice("ipc://".length));
    try {
      const pending = sc.call("debug.busy", { seconds: 60 });
      await waitFor("the call to run", async () => (await sc.call("status", {})).busy);
      process.kill(sc.pid, "SIGSTOP");
      const t0 = performance.now();
      const err = await rejection(pending);
      const ms = performance.now() - t0;
      expect(err.code).toBe("SIDECAR_UNRESPONSIVE");
      expect(err.message).toMatch(/answered no heartbeat .* while debug\.busy \(id \d+\) was pending; it looks stopped \(state T/);
      expect(err.data).toMatchObject({ pid: sc.pid, stacks: null, stopped: true });
      // heartbeatMisses heartbeats unanswered: between (misses - 1) and (misses + 1) periods
      // after the stop, plus slack for a loaded machine; never a hang
      console.log(`SIGSTOP -> SIDECAR_UNRESPONSIVE: ${ms.toFixed(0)} ms (heartbeat ${heartbeatMs} ms x ${heartbeatMisses})`);
      expect(ms).toBeGreaterThanOrEqual((heartbeatMisses - 1) * heartbeatMs);
      expect(ms).toBeLessThan((heartbeatMisses + 1) * heartbeatMs + 1500);
      expect(await goneWithin(sc.pid, 5000)).toBeLessThan(5000); // SIGKILLed though stopped
      expect(((await settled(sc.call("ping", {}))) as { error: SidecarError }).error.code).toBe("SIDECAR_UNRESPONSIVE");
      expect(existsSync(socketDir)).toBe(false);
    } finally {
      if (alive(sc.pid)) process.kill(sc.pid, "SIGKILL");
      await sc.close();
    }
  });

  it("stuck I/O thread: SIDECAR_UNRESPONSIVE with its thread dump in data.stacks, and the process is killed", async () => {
    const sc = await Sidecar.start({ device: "cpu", heartbeatMs: 200, heartbeatMisses: 3, env: withFaults, onStderr: () => undefined });
    try {
      const err = await rejection(sc.request("test.hang_io", {}));
      expect(err.code).toBe("SIDECAR_UNRESPONSIVE");
      expect(err.message).toMatch(/while test\.hang_io \(id \d+\) was pending; its threads' stacks are in data\.stacks/);
      const { stacks, stopped } = err.data as { stacks: string; stopped: boolean };
      expect(stopped).toBe(false);
      expect(stacks).toMatch(/Thread 0x/);
      expect(stacks).toMatch(/in hang_io/); // the frame that blocks the I/O thread
      expect(await goneWithin(sc.pid, 5000)).toBeLessThan(5000);
    } finally {
      if (alive(sc.pid)) process.kill(sc.pid, "SIGKILL");
      await sc.close();
    }
  });
});

describe("kill -9 during real training steps", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "nanotune-faults-"));
    const rows = Array.from({ length: 64 }, (_, i) => JSON.stringify({ text: `example ${i}: the quick brown fox jumps over the lazy dog ${i * 7}` }));
    writeFileSync(join(dir, "data.jsonl"), rows.join("\n") + "\n");
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each([0, 30, 150])("SIDECAR_CRASHED within 1 s of kill -9, %i ms into a train_step loop", async (offsetMs) => {
    const sc = await Sidecar.start({ device: "cpu", env: { NANOTUNE_CACHE: join(dir, "cache") }, onStderr: () => undefined });
    try {
      await sc.call("load_model", { path: "tiny-llama" });
      await sc.call("load_dataset", { path: join(dir, "data.jsonl"), cutoff: 32 });
      await sc.call("create_optimizer", { name: "nanoadam", lr: 1e-3, density: 0.1 });
      let steps = 0;
      const loop = (async () => {
        for (;;) {
          await sc.call("train_step", { lr: 1e-3, microBatch: 2 });
          steps++;
        }
      })();
      await waitFor("a first step", () => steps > 0);
      await new Promise((r) => setTimeout(r, offsetMs));
      const t0 = performance.now();
      process.kill(sc.pid, "SIGKILL");
      const err = await rejection(loop);
      const ms = performance.now() - t0;
      console.log(`kill -9 after ${steps} steps (+${offsetMs} ms): SIDECAR_CRASHED in ${ms.toFixed(0)} ms`);
      expect(err.code).toBe("SIDECAR_CRASHED");
      expect(err.message).toMatch(/was killed by SIGKILL/);
      expect((err.data as { signal: string }).signal).toBe("SIGKILL");
      expect(ms).toBeLessThan(1000);
    } finally {
      await sc.close();
    }
  });
});
