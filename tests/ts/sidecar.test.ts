// The bridge against one real sidecar process: handshake, control calls during a long
// compute call, cancellation, validation on both sides, tensors, malformed input.
// Timing: nothing here races the clock. Tests wait for the state they need (waitFor,
// with generous deadlines) instead of sleeping, and long calls are cancelled once the
// test has seen what it wants rather than sized to outlast it.
import { randomBytes } from "node:crypto";
import { statSync } from "node:fs";
import { dirname } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Dealer } from "zeromq";
import { PROTOCOL_VERSION, Sidecar, SidecarError, Tensor, errorCodes, type SidecarEvent } from "../../ts/index.ts";
import { MAX_PARAMS_DEPTH, decode, encode } from "../../ts/wire.ts";
import { settled, waitFor } from "./fixtures/procs.ts";

let sc: Sidecar;
beforeAll(async () => {
  sc = await Sidecar.start({ device: "cpu" });
});
afterAll(async () => {
  await sc?.close();
});

async function rejection(p: Promise<unknown>): Promise<SidecarError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(SidecarError);
    return e as SidecarError;
  }
  throw new Error("expected the call to reject");
}

describe("Sidecar", () => {
  it("says hello with protocol version, torch, device and its methods", async () => {
    const info = await sc.hello();
    expect(info.protocol).toBe(PROTOCOL_VERSION);
    expect(info.torch).toMatch(/^\d+\.\d+/);
    expect(info.device).toBe("cpu");
    expect(info.dtype).toBe("float32");
    expect(info.cuda).toBeNull();
    expect(info.pid).toBe(sc.pid);
    expect(info.methods).toEqual(expect.arrayContaining(["ping", "status", "cancel", "shutdown", "debug.busy"]));
  });

  it("serves ipc from a private directory: hello says ipc-private-dir, the dir is 0700 and the socket 0600", async () => {
    expect(sc.endpoint).toMatch(/^ipc:\/\//);
    expect(sc.info).toMatchObject({ transport: "ipc", security: "ipc-private-dir" });
    expect(sc.curveServerKey).toBeNull();
    const path = sc.endpoint.slice("ipc://".length);
    expect(statSync(dirname(path)).mode & 0o777).toBe(0o700);
    expect(statSync(path).mode & 0o077).toBe(0); // nothing for group or others
  });

  it("rejects a hello with another protocol version, naming both versions", async () => {
    const err = await rejection(sc.call("hello", { protocol: PROTOCOL_VERSION + 41 }));
    expect(err.code).toBe("PROTOCOL_MISMATCH");
    expect(err.message).toContain(`v${PROTOCOL_VERSION + 41}`);
    expect(err.message).toContain(`v${PROTOCOL_VERSION}`);
    expect(err.data).toEqual({ client: PROTOCOL_VERSION + 41, sidecar: PROTOCOL_VERSION });
  });

  it("answers ping and status while a compute call runs, and `cancel` ends it with CANCELLED", async () => {
    const busy = sc.call("debug.busy", { seconds: 60 }); // cancelled below: long only so it surely still runs
    await waitBusy();
    const t0 = performance.now();
    await sc.call("ping", {});
    const pingMs = performance.now() - t0;
    const status = await sc.call("status", {});
    expect(status.busy?.method).toBe("debug.busy"); // ping came back while the call still ran
    console.log(`ping during a compute call: ${pingMs.toFixed(2)} ms`);
    const second = await rejection(sc.call("debug.busy", { seconds: 1 }));
    expect(second.code).toBe("BUSY");
    expect(second.message).toMatch(/busy with debug\.busy/);
    expect(await sc.call("cancel", { id: status.busy!.id })).toEqual({ cancelled: true, id: status.busy!.id });
    const err = await rejection(busy);
    expect(err.code).toBe("CANCELLED");
    expect(await sc.call("debug.busy", { seconds: 0.05 })).toMatchObject({ seconds: expect.any(Number) });
  });

  it("ends a compute call with CANCELLED when its AbortSignal aborts, then serves the next call", async () => {
    const ac = new AbortController();
    const busy = sc.call("debug.busy", { seconds: 60 }, { signal: ac.signal });
    await waitBusy();
    ac.abort(new Error("user pressed stop"));
    const err = await rejection(busy);
    expect(err.code).toBe("CANCELLED");
    expect((err.cause as Error).message).toBe("user pressed stop");
    // the client waits up to 3 s for the sidecar to confirm; on a busy machine it may
    // confirm later, so wait for the sidecar to be idle rather than assume it is
    await waitIdle();
    expect((await sc.call("debug.busy", { seconds: 0.01 })).iterations).toBeGreaterThan(0);
  });

  it("interrupts a compute call that never checks for cancellation", async () => {
    const busy = sc.call("debug.busy", { seconds: 30, cooperative: false }, { timeoutMs: 300 });
    const err = await rejection(busy);
    expect(err.code).toBe("TIMEOUT");
    expect(err.message).toMatch(/debug\.busy .* did not answer within 300 ms/);
    // the forced cancel lands 2 s after the cancel, then the sidecar is idle again
    await waitIdle();
  });

  it("streams events while a call runs", async () => {
    const seen: SidecarEvent[] = [];
    const it = sc.events();
    const ac = new AbortController();
    // runs until the test has seen 3 ticks (a fixed 0.5 s call ticks less when starved of CPU)
    const busy = sc.call("debug.busy", { seconds: 60, tickEveryS: 0.05 }, { signal: ac.signal });
    for await (const ev of it) {
      seen.push(ev);
      if (seen.length === 3) break;
    }
    const stillRunning = (await sc.call("status", {})).busy?.method;
    ac.abort();
    expect((await rejection(busy)).code).toBe("CANCELLED");
    expect(stillRunning).toBe("debug.busy"); // the events came while the call ran
    expect(seen.map((e) => e.event)).toEqual(["debug:tick", "debug:tick", "debug:tick"]);
    const first = seen[0]!;
    expect(first.event === "debug:tick" && first.data.iteration).toBeGreaterThan(0);
    await waitIdle();
  });

  it("names the wrong field of bad params (checked in TS before sending)", async () => {
    const err = await rejection(sc.call("debug.busy", { seconds: "soon" as unknown as number }));
    expect(err.code).toBe("INVALID_PARAMS");
    expect(err.message).toMatch(/^debug\.busy: invalid params at params\.seconds: /);
    expect((err.data as { field: string }).field).toBe("params.seconds");
  });

  it("round-trips a 64 MB float32 tensor bit-exactly (NaN payloads included)", async () => {
    const bytes = randomBytes(64 * 1024 * 1024); // random bits: every float32 pattern, NaNs too
    const t = new Tensor("float32", [4096, 4096], bytes);
    const r = await sc.call("debug.echo", { tensor: t, value: { note: "x" } });
    expect(r.value).toEqual({ note: "x" });
    expect(r.tensor!.dtype).toBe("float32");
    expect(r.tensor!.shape).toEqual([4096, 4096]);
    expect(Buffer.compare(Buffer.from(r.tensor!.bytes.buffer, r.tensor!.bytes.byteOffset, r.tensor!.bytes.byteLength), bytes)).toBe(0);
  });

  it("round-trips every dtype, empty tensors and big integers", async () => {
    for (const dtype of ["float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"] as const) {
      const bytes = dtype === "bool" ? new Uint8Array([1, 0, 1, 1, 0, 0]) : new Uint8Array(randomBytes(6 * { float64: 8, float16: 2, bfloat16: 2, int8: 1, uint8: 1, int16: 2, int32: 4, int64: 8 }[dtype]));
      const r = await sc.call("debug.echo", { tensor: new Tensor(dtype, [2, 3], bytes) });
      expect(r.tensor!.dtype).toBe(dtype);
      expect(Array.from(r.tensor!.bytes)).toEqual(Array.from(bytes));
    }
    const empty = await sc.call("debug.echo", { tensor: new Tensor("float32", [0, 5], new Uint8Array(0)) });
    expect(empty.tensor!.shape).toEqual([0, 5]);
    const big = [2 ** 31, 2 ** 32, 2 ** 40, -(2 ** 40), Number.MAX_SAFE_INTEGER, 2n ** 63n - 1n];
    expect((await sc.call("debug.echo", { value: big })).value).toEqual([2 ** 31, 2 ** 32, 2 ** 40, -(2 ** 40), Number.MAX_SAFE_INTEGER, 2n ** 63n - 1n]);
  });

  it("rejects (never throws) params it cannot send: nested deeper than MAX_PARAMS_DEPTH, cyclic, not encodable", async () => {
    const nest = (levels: number): unknown => {
      let v: unknown = 1;
      for (let i = 0; i < levels; i++) v = [v];
      return v;
    };
    // params {value: ...} are 1 level, so value may nest MAX_PARAMS_DEPTH - 1 levels
    const ok = nest(MAX_PARAMS_DEPTH - 1);
    expect((await sc.call("debug.echo", { value: ok })).value).toEqual(ok);
    const cyclic: Record<string, unknown> = { a: 1 };
    cyclic.self = cyclic;
    const bad: [string, unknown, RegExp][] = [
      ["101 levels", { value: nest(MAX_PARAMS_DEPTH) }, /params nest deeper than 100 levels \(MAX_PARAMS_DEPTH; or they are cyclic\) at params\.value\.0\.0/],
      ["100,000 levels", { value: nest(100_000) }, /params nest deeper than 100 levels/],
      ["a cycle", { value: cyclic }, /params nest deeper than 100 levels .* at params\.value\.self\.self/],
      ["a BigInt beyond uint64", { value: 2n ** 64n }, /params cannot be encoded as msgpack: .*too large/],
      ["a symbol", { value: Symbol("s") }, /params cannot be encoded as msgpack/],
    ];
    for (const [what, params, message] of bad) {
      let p: Promise<unknown> | undefined;
      expect(() => (p = sc.request("debug.echo", params)), what).not.toThrow();
      const r = await settled(p!);
      expect(r.ok, what).toBe(false);
      const err = (r as { error: SidecarError }).error;
      expect(err.code, what).toBe("INVALID_PARAMS");
      expect(err.message, what).toMatch(message);
    }
    // a typed call too, and the untyped request with a method that is not a string
    expect((await rejection(sc.call("debug.echo", { value: cyclic }))).code).toBe("INVALID_PARAMS");
    expect((await rejection(sc.request(42 as unknown as string, {}))).code).toBe("INVALID_ARGUMENT");
    // an integral number beyond uint64 travels as a float64 (the sidecar's int fields reject it by name)
    expect((await sc.call("debug.echo", { value: 1e300 })).value).toBe(1e300);
    expect(await sc.call("ping", {})).toEqual({});
  });

  it("answers 10,000 malformed messages on a raw socket, each with an error naming what was wrong (and its id when readable), while the client's calls all settle", async () => {
    expect((await sc.call("debug.store", { key: "canary", value: { kept: [1, 2, 3] } })).previous).toBeNull();
    const before = await sc.call("status", {});
    const raw = new Dealer({ linger: 0, receiveTimeout: 20_000 });
    raw.connect(sc.endpoint);
    const rnd = (n: number) => Math.floor(Math.random() * n);
    const ANY = Symbol("any id"); // random bytes: whatever id (almost surely null)
    type Case = { frames: Uint8Array[]; id: number | bigint | null | typeof ANY; expect: RegExp; ok?: boolean };
    // msgpack written by hand: what msgpackr cannot (or should not) write
    const str = (t: string) => Buffer.concat([Buffer.from([0xa0 | t.length]), Buffer.from(t)]);
    const uint32 = (n: number) => Buffer.from([0xce, n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255]);
    /** {id, v, method, params: {value: [[...]]}} nested `depth` levels below params, id first or last */
    const deep = (id: number, depth: number, idLast: boolean) => {
      const idPart = Buffer.concat([str("id"), uint32(id)]);
      const body = Buffer.concat([
        str("v"), Buffer.from([1]), str("method"), str("debug.echo"),
        str("params"), Buffer.from([0x81]), str("value"), Buffer.alloc(depth - 2, 0x91), Buffer.from([0xc0]),
      ]);
      return Buffer.concat([Buffer.from([0x84]), idLast ? body : idPart, idLast ? idPart : body]);
    };
    let next = 1_000_000;
    const cases: (() => Case)[] = [
      // truncated envelopes: the id (written first) is readable once the cut is past it
      () => {
        const id = next++;
        const full = encode({ id, v: 1, method: "ping", params: { pad: "x".repeat(rnd(40)) } });
        const cut = rnd(full.length - 1);
        return { frames: [full.subarray(0, cut)], id: cut >= encode({ id }).length ? id : null, expect: /not valid msgpack|invalid request/ };
      },
      () => ({ frames: [encode(rnd(1000))], id: null, expect: /envelope must be a map/ }),
      () => ({ frames: [encode([1, 2, 3])], id: null, expect: /envelope must be a map, got array/ }),
      () => ({ frames: [Buffer.alloc(0)], id: null, expect: /not valid msgpack/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: `no.such.${rnd(100)}`, params: {} })], id: next - 1, expect: /unknown method 'no\.such\.\d+'/ }),
      () => ({ frames: [encode({ v: 1, method: "ping", params: {} })], id: null, expect: /envelope\.id/ }),
      () => ({ frames: [encode({ v: 1, id: next++, params: {} })], id: next - 1, expect: /envelope\.method/ }),
      () => ({ frames: [encode({ v: "one", id: next++, method: "ping" })], id: next - 1, expect: /envelope\.v/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: 5, params: [] })], id: next - 1, expect: /envelope\.method/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "ping", params: [1, 2] })], id: next - 1, expect: /ping: invalid params at params: Expected `object`/ }),
      () => ({ frames: [encode({ v: 1, id: "seven", method: "ping" })], id: null, expect: /envelope\.id/ }),
      // ids: negative (not a uint: no id to answer with), beyond 2^53, the largest uint64
      () => ({ frames: [encode({ v: 1, id: -1 - rnd(1000), method: "ping", params: {} })], id: null, expect: /envelope\.id: Expected `int` >= 0/ }),
      () => ({ frames: [encode({ v: 1, id: 2n ** 53n + BigInt(next++), method: "ping", params: {} })], id: 2n ** 53n + BigInt(next - 1), expect: /^$/, ok: true }),
      () => ({ frames: [encode({ v: 1, id: 2n ** 64n - BigInt(next++), method: "ping", params: {} })], id: 2n ** 64n - BigInt(next - 1), expect: /^$/, ok: true }),
      // deep nesting: 100 levels decode (and echo back), 1000 and 100,000 do not; the id is read either way
      () => ({ frames: [deep(next++, 100, rnd(2) === 1)], id: next - 1, expect: /^$/, ok: true }),
      () => ({ frames: [deep(next++, 1000, rnd(2) === 1)], id: next - 1, expect: /nested deeper than the sidecar decodes/ }),
      () => ({ frames: [deep(next++, 100_000, rnd(20) === 1)], id: next - 1, expect: /nested deeper than the sidecar decodes/ }),
      // frames and tensor refs: missing, extra, negative dims or index, sizes that do not match
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [4], frame: 0 } } })], id: next - 1, expect: /frame 0 does not exist/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "ping", params: {} }), randomBytes(8), randomBytes(3)], id: next - 1, expect: /^$/, ok: true }),
      () => ({
        frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [4], frame: 0 } } }), randomBytes(3)],
        id: next - 1,
        expect: /params\.tensor\.shape: float32 \[4\] needs 16 bytes but frame 0 has 3/,
      }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [-4], frame: 0 } } }), randomBytes(16)], id: next - 1, expect: /params\.tensor\.shape\[0\]: Expected `int` >= 0/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "uint8", shape: [2], frame: -1 } } }), randomBytes(2)], id: next - 1, expect: /params\.tensor\.frame: Expected `int` >= 0/ }),
      () => ({
        frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "float64", shape: [2 ** 31, 2 ** 31], frame: 0 } } }), randomBytes(8)],
        id: next - 1,
        expect: /needs 36893488147419103232 bytes but frame 0 has 8/,
      }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.echo", params: { tensor: { dtype: "complex64", shape: [1], frame: 0 } } })], id: next - 1, expect: /params\.tensor\.dtype/ }),
      // params of the wrong type for a method's schema, compute methods included
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.busy", params: { seconds: "x" } })], id: next - 1, expect: /debug\.busy: invalid params at params\.seconds: Expected `float`, got `str`/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "debug.busy", params: {} })], id: next - 1, expect: /params\.seconds: Object missing required field `seconds`/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "train_step", params: { lr: -1 } })], id: next - 1, expect: /params\.lr: Expected `float` >= 0/ }),
      () => ({ frames: [encode({ v: 1, id: next++, method: "status", params: { extra: 1 } })], id: next - 1, expect: /params\.extra: Object contains unknown field `extra`/ }),
      () => ({ frames: [encode({ v: 99, id: next++, method: "ping", params: {} })], id: next - 1, expect: /protocol v99 .* v1/ }),
    ];
    const N = 10_000;
    const sent: Case[] = [];
    const real: { what: string; p: ReturnType<typeof settled> }[] = []; // settled(): observed at once, checked at the end
    const t0 = performance.now();
    for (let i = 0; i < N; i++) {
      // a quarter random bytes (1-3 frames), the rest the cases above
      const c: Case = i % 4 === 0 ? { frames: Array.from({ length: 1 + rnd(3) }, () => randomBytes(rnd(80))), id: ANY, expect: /./ } : cases[rnd(cases.length)]!();
      sent.push(c);
      await raw.send(c.frames);
      if (i % 50 === 0) {
        // the real client's calls, interleaved (not awaited here): io and compute ones
        const k = (i / 50) % 4;
        if (k === 0) real.push({ what: "ping", p: settled(sc.call("ping", {})) });
        else if (k === 1) real.push({ what: "status", p: settled(sc.call("status", {})) });
        else if (k === 2) real.push({ what: "echo", p: settled(sc.call("debug.echo", { value: { i }, tensor: Tensor.from(new Float32Array([i, 1, 2])) })) });
        else real.push({ what: "store", p: settled(sc.call("debug.store", { key: "fuzz", value: i })) });
      }
    }
    const codes = new Set(Object.keys(errorCodes));
    const replies = new Map<string, { error?: { code: string; message: string }; result?: unknown }>();
    let nullIds = 0;
    for (let i = 0; i < N; i++) {
      const [env] = await raw.receive();
      const reply = decode(env!) as { id: number | bigint | null; error?: { code: string; message: string }; result?: unknown };
      if (reply.error) expect(codes.has(reply.error.code), reply.error.code).toBe(true);
      if (reply.id === null) nullIds++;
      else replies.set(String(reply.id), reply);
    }
    // every request got one reply; each whose id was readable got it back, with the expected error
    let expectedNull = 0;
    for (const c of sent) {
      if (c.id === ANY) continue;
      if (c.id === null) {
        expectedNull++;
        continue;
      }
      const r = replies.get(String(c.id));
      expect(r, `a reply for id ${c.id}`).toBeDefined();
      if (c.ok) expect(r!.error, `id ${c.id}: ${JSON.stringify(r!.error)}`).toBeUndefined();
      else expect(r!.error?.message, `id ${c.id}`).toMatch(c.expect);
    }
    expect(nullIds).toBeGreaterThanOrEqual(expectedNull);
    raw.close();
    // every real call settled: io calls answered, compute calls answered or BUSY (the raw socket's never are compute)
    const outcomes = await Promise.all(real.map(async ({ what, p }) => ({ what, r: await p })));
    for (const { what, r } of outcomes) {
      if (!r.ok) expect(`${what}: ${(r.error as SidecarError).code}`).toBe(`${what}: BUSY`);
      expect(what === "store" || r.ok, what).toBe(true);
    }
    console.log(`10,000 malformed messages + ${real.length} real calls: ${(performance.now() - t0).toFixed(0)} ms`);
    // the same process, still serving, state intact
    const after = await sc.call("status", {});
    expect(after.pid).toBe(before.pid);
    expect((await sc.call("debug.store", { key: "canary", value: null })).previous).toEqual({ kept: [1, 2, 3] });
    expect(await sc.call("ping", {})).toEqual({});
  });
});

const waitBusy = () => waitFor("the compute call to start", async () => (await sc.call("status", {})).busy);
const waitIdle = () => waitFor("the sidecar to be idle", async () => (await sc.call("status", {})).busy === null);
