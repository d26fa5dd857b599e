// The bridge against one real sidecar process: handshake, control calls during a long
// compute call, cancellation, validation on both sides, tensors, malformed input.
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Dealer } from "zeromq";
import { PROTOCOL_VERSION, Sidecar, SidecarError, Tensor, errorCodes, type SidecarEvent } from "../../ts/index.ts";
import { decode, encode } from "../../ts/wire.ts";

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

  it("rejects a hello with another protocol version, naming both versions", async () => {
    const err = await rejection(sc.call("hello", { protocol: PROTOCOL_VERSION + 41 }));
    expect(err.code).toBe("PROTOCOL_MISMATCH");
    expect(err.message).toContain(`v${PROTOCOL_VERSION + 41}`);
    expect(err.message).toContain(`v${PROTOCOL_VERSION}`);
    expect(err.data).toEqual({ client: PROTOCOL_VERSION + 41, sidecar: PROTOCOL_VERSION });
  });

  it("answers ping and status while a 5 s compute call runs, and `cancel` ends it with CANCELLED", async () => {
    const busy = sc.call("debug.busy", { seconds: 5 });
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
    const busy = sc.call("debug.busy", { seconds: 5 }, { signal: ac.signal });
    await waitBusy();
    ac.abort(new Error("user pressed stop"));
    const err = await rejection(busy);
    expect(err.code).toBe("CANCELLED");
    expect((err.cause as Error).message).toBe("user pressed stop");
    expect((await sc.call("status", {})).busy).toBeNull();
    expect((await sc.call("debug.busy", { seconds: 0.01 })).iterations).toBeGreaterThan(0);
  });

  it("interrupts a compute call that never checks for cancellation", async () => {
    const busy = sc.call("debug.busy", { seconds: 30, cooperative: false }, { timeoutMs: 300 });
    const err = await rejection(busy);
    expect(err.code).toBe("TIMEOUT");
    expect(err.message).toMatch(/debug\.busy .* did not answer within 300 ms/);
    expect((await sc.call("status", {})).busy).toBeNull();
  });

  it("streams events while a call runs", async () => {
    const seen: SidecarEvent[] = [];
    const it = sc.events();
    const collecting = (async () => {
      for await (const ev of it) {
        seen.push(ev);
        if (seen.length === 3) break;
      }
    })();
    await sc.call("debug.busy", { seconds: 0.5, tickEveryS: 0.1 });
    await collecting;
    expect(seen.map((e) => e.event)).toEqual(["debug:tick", "debug:tick", "debug:tick"]);
    expect(seen[0]!.data.iteration).toBeGreaterThan(0);
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

  it("answers 1,000 malformed messages with errors that name what was wrong, and keeps its state", async () => {
    expect((await sc.call("debug.store", { key: "canary", value: { kept: [1, 2, 3] } })).previous).toBeNull();
    const before = await sc.call("status", {});
    const raw = new Dealer({ linger: 0, receiveTimeout: 10_000 });
    raw.connect(sc.endpoint);
    const rnd = (n: number) => Math.floor(Math.random() * n);
    const good = () => encode({ v: 1, id: 7, method: "ping", params: {} });
    const cases: (() => { frames: Uint8Array[]; expect: RegExp })[] = [
      () => ({ frames: [randomBytes(rnd(64))], expect: /./ }),
      () => ({ frames: [good().subarray(0, rnd(good().length - 1))], expect: /not valid msgpack|envelope|invalid request/ }),
      () => ({ frames: [encode(rnd(1000))], expect: /envelope must be a map/ }),
      () => ({ frames: [encode({ v: 1, id: 5, method: `no.such.${rnd(100)}`, params: {} })], expect: /unknown method 'no\.such\.\d+'/ }),
      () => ({ frames: [encode({ v: 1, method: "ping", params: {} })], expect: /envelope\.id/ }),
      () => ({ frames: [encode({ v: 1, id: 6, params: {} })], expect: /envelope\.method/ }),
      () => ({ frames: [encode({ v: "one", id: 7, method: "ping" })], expect: /envelope\.v/ }),
      () => ({ frames: [encode({ v: 1, id: 8, method: "ping", params: [1, 2] })], expect: /ping: invalid params at params: Expected `object`/ }),
      () => ({ frames: [encode({ v: 1, id: 9, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [4], frame: 0 } } })], expect: /frame 0 does not exist/ }),
      () => ({
        frames: [encode({ v: 1, id: 10, method: "debug.echo", params: { tensor: { dtype: "float32", shape: [4], frame: 0 } } }), randomBytes(3)],
        expect: /params\.tensor\.shape: float32 \[4\] needs 16 bytes but frame 0 has 3/,
      }),
      () => ({ frames: [encode({ v: 1, id: 11, method: "debug.echo", params: { tensor: { dtype: "complex64", shape: [1], frame: 0 } } })], expect: /params\.tensor\.dtype/ }),
      () => ({ frames: [encode({ v: 1, id: 12, method: "debug.busy", params: { seconds: "x" } })], expect: /debug\.busy: invalid params at params\.seconds: Expected `float`, got `str`/ }),
      () => ({ frames: [encode({ v: 1, id: 13, method: "debug.busy", params: {} })], expect: /params\.seconds: Object missing required field `seconds`/ }),
      () => ({ frames: [encode({ v: 1, id: 14, method: "status", params: { extra: 1 } })], expect: /params\.extra: Object contains unknown field `extra`/ }),
      () => ({ frames: [encode({ v: 99, id: 15, method: "ping", params: {} })], expect: /protocol v99 .* v1/ }),
    ];
    const N = 1000;
    const sent: RegExp[] = [];
    for (let i = 0; i < N; i++) {
      // a third random bytes (1-3 frames), a third truncated envelopes, a third the cases above
      const c =
        i % 3 === 0
          ? { frames: Array.from({ length: 1 + rnd(3) }, () => randomBytes(rnd(80))), expect: /./ }
          : i % 3 === 1
            ? cases[1]!()
            : cases[rnd(cases.length)]!();
      sent.push(c.expect);
      await raw.send(c.frames);
    }
    const codes = new Set(Object.keys(errorCodes));
    for (let i = 0; i < N; i++) {
      const [env] = await raw.receive();
      const reply = decode(env!) as { id: number | null; error?: { code: string; message: string } };
      expect(reply.error, `reply ${i} is an error`).toBeDefined();
      expect(codes.has(reply.error!.code)).toBe(true);
      expect(reply.error!.message).toMatch(sent[i]!);
    }
    raw.close();
    // the same process, still serving, state intact
    const after = await sc.call("status", {});
    expect(after.pid).toBe(before.pid);
    expect(after.rejected - before.rejected).toBe(N);
    expect((await sc.call("debug.store", { key: "canary", value: null })).previous).toEqual({ kept: [1, 2, 3] });
    expect(await sc.call("ping", {})).toEqual({});
  });
});

async function waitBusy() {
  for (;;) {
    if ((await sc.call("status", {})).busy) return;
    await new Promise((r) => setTimeout(r, 10));
  }
}
