// protocol/: schema.json and python/nanotune/wire.py are fresh, golden vectors decode and re-encode bit-exactly,
// the wire helpers move tensors and big integers.
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { schemaJsonPath, schemaJsonText, wirePyPath, wirePyText } from "../../protocol/generate.ts";
import { ErrorBody, Event, PROTOCOL_VERSION, Reply, Request, errorCodes, events, methods, toJSON, type MethodName } from "../../protocol/schema.ts";
import { vectors } from "../../protocol/vectors/generate.ts";
import { ErrorCode, Tensor } from "../../ts/index.ts";
import { bigIntegers, decode, encode, refsToTensors, tensorsToRefs } from "../../ts/wire.ts";

describe("protocol/schema.json", () => {
  it("is what protocol/schema.ts generates (run `npm run protocol:generate` after editing the schema)", () => {
    expect(readFileSync(schemaJsonPath, "utf8")).toBe(schemaJsonText());
  });

  it("python/nanotune/wire.py is what protocol/schema.ts generates (run `npm run protocol:generate`)", () => {
    expect(readFileSync(wirePyPath, "utf8")).toBe(wirePyText());
  });

  it("wire.py follows the schema: a changed field or constraint changes the generated text", () => {
    const json = toJSON();
    const params = json.methods.train_step!.params as { properties: Record<string, Record<string, unknown>> };
    params.properties.lr = { ...params.properties.lr, minimum: 1 };
    const changed = wirePyText(json);
    expect(changed).not.toBe(wirePyText());
    expect(changed).toMatch(/class TrainStepParams\(Model, kw_only=True\):\n(    .*\n)*    lr: Annotated\[float, Meta\(ge=1\)\]/);
    expect(wirePyText()).toMatch(/micro_batch: Annotated\[int, Meta\(ge=1\)\] \| None = msgspec\.field\(default=None, name="microBatch"\)/);
  });

  it("lists every method with params, result and thread, and the error table", () => {
    const json = JSON.parse(schemaJsonText());
    expect(json.protocolVersion).toBe(PROTOCOL_VERSION);
    expect(Object.keys(json.methods).sort()).toEqual(Object.keys(methods).sort());
    expect(Object.keys(json.errorCodes)).toEqual(Object.keys(errorCodes));
    expect(Object.keys(ErrorCode)).toEqual(Object.keys(errorCodes));
    expect(json.methods["debug.busy"].params.required).toEqual(["seconds"]);
  });
});

describe("golden vectors", () => {
  const all = vectors();
  it("exist", () => expect(all.length).toBeGreaterThanOrEqual(8));

  for (const v of all) {
    it(`${v.name}: decodes to its value, re-encodes bit-exactly, and is a valid ${v.kind}`, () => {
      expect(decode(v.pyBytes)).toEqual(v.value);
      if (v.tsBytes) expect(decode(v.tsBytes)).toEqual(v.value);
      expect(encode(bigIntegers(decode(v.pyBytes))).equals(v.tsBytes ?? v.pyBytes)).toBe(true);
      const value = v.value as Record<string, unknown>;
      if (v.kind === "request") {
        const req = Request.parse(value);
        methods[req.method as MethodName].params.parse(req.params);
      } else if (v.kind === "reply:error") {
        Reply.parse(value);
        expect(Object.keys(errorCodes)).toContain(ErrorBody.parse(value.error).code);
      } else if (v.kind.startsWith("reply:")) {
        Reply.parse(value);
        // int64 fields arrive as numbers where safe (Note [integers])
        const decoded = decode(v.pyBytes) as { result: unknown };
        methods[v.kind.slice("reply:".length) as MethodName].result.parse(decoded.result);
      } else if (v.kind === "event") {
        const ev = Event.parse(value);
        events[ev.event as keyof typeof events].parse(ev.data);
      } else throw new Error(`unknown vector kind ${v.kind}`);
    });
  }
});

describe("wire helpers", () => {
  it("turn tensors into refs plus frames and back, without copying", () => {
    const a = new Float32Array([1, 2, 3, 4, 5, 6]);
    const frames: Uint8Array[] = [];
    const wire = tensorsToRefs({ x: [Tensor.from(a, [2, 3])], n: 1 }, frames) as { x: unknown[] };
    expect(wire.x[0]).toEqual({ dtype: "float32", shape: [2, 3], frame: 0 });
    expect(frames[0]!.buffer).toBe(a.buffer);
    const back = refsToTensors(wire, frames) as { x: Tensor[] };
    expect(back.x[0]!.toArray()).toEqual(a);
  });

  it("send integers beyond int32/uint32 as int64 and read them back as numbers where safe", () => {
    const bytes = encode(bigIntegers({ a: 2 ** 40, b: -(2 ** 40), c: 2 ** 32 - 1, d: 1.5 }));
    expect(decode(bytes)).toEqual({ a: 2 ** 40, b: -(2 ** 40), c: 2 ** 32 - 1, d: 1.5 });
    expect(bytes.includes(0xcb)).toBe(true); // 1.5 is float64
    expect(decode(encode(bigIntegers(2 ** 40)))).toBe(2 ** 40);
    expect(encode(bigIntegers(2 ** 40))[0]).toBe(0xd3); // int64, not float64
    expect(decode(encode(2n ** 63n))).toBe(2n ** 63n);
  });

  it("reject a tensor whose bytes do not fit its shape, naming both", () => {
    expect(() => new Tensor("float32", [2, 2], new Uint8Array(12))).toThrow(/float32 \[2, 2\] needs 16 bytes, got 12/);
  });
});
