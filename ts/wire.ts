// msgpack framing shared by the client and the tests: the codec settings from
// wire rules (docs/protocol.md), and the walks that move tensors and big integers across.
import { Packr } from "msgpackr";
import { Tensor } from "./tensor.ts";

/**
 * useRecords: false (plain msgpack maps, readable by any decoder); undefined -> nil;
 * int64 decoded as a number when it is a safe integer, else a BigInt.
 */
export const packr = new Packr({
  useRecords: false,
  encodeUndefinedAsNil: true,
  // "auto" exists since msgpackr 1.10; its .d.ts lags behind
  int64AsType: "auto" as unknown as "number",
  mapsAsObjects: true,
  // fixmap for small maps like every other encoder (msgpackr writes map16 otherwise),
  // so our bytes match the sidecar's: see protocol/vectors/README.md
  variableMapSize: true,
});

export const encode = (value: unknown): Buffer => packr.pack(value);
export const decode = (bytes: Uint8Array): unknown => packr.unpack(bytes);

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && Object.getPrototypeOf(v) === Object.prototype;

/** Replaces every Tensor in `value` by its TensorRef, appending its bytes to `frames`. */
export function tensorsToRefs(value: unknown, frames: Uint8Array[]): unknown {
  if (value instanceof Tensor) {
    frames.push(value.bytes);
    return { dtype: value.dtype, shape: [...value.shape], frame: frames.length - 1 };
  }
  if (Array.isArray(value)) return value.map((v) => tensorsToRefs(v, frames));
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const k in value) out[k] = tensorsToRefs(value[k], frames);
    return out;
  }
  return value;
}

/** Replaces every `{dtype, shape, frame}` map in `value` by a Tensor viewing that frame. */
export function refsToTensors(value: unknown, frames: readonly Uint8Array[]): unknown {
  if (Array.isArray(value)) return value.map((v) => refsToTensors(v, frames));
  if (isPlainObject(value)) {
    const keys = Object.keys(value);
    if (keys.length === 3 && typeof value.frame === "number" && typeof value.dtype === "string" && Array.isArray(value.shape)) {
      const frame = frames[value.frame];
      if (frame === undefined) throw new RangeError(`tensor refers to frame ${value.frame} but the message has ${frames.length}`);
      return new Tensor(value.dtype as Tensor["dtype"], value.shape as number[], frame);
    }
    const out: Record<string, unknown> = {};
    for (const k of keys) out[k] = refsToTensors(value[k], frames);
    return out;
  }
  return value;
}

/**
 * msgpackr writes integers outside int32/uint32 as float64, which the sidecar's
 * int fields reject; so those go as BigInt (int64 on the wire). Note [integers].
 */
export function bigIntegers(value: unknown): unknown {
  if (typeof value === "number") {
    return Number.isInteger(value) && (value > 0xffffffff || value < -0x80000000) ? BigInt(value) : value;
  }
  if (Array.isArray(value)) return value.map(bigIntegers);
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const k in value) out[k] = bigIntegers(value[k]);
    return out;
  }
  return value;
}
