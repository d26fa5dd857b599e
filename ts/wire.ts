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
 * An integral number beyond what msgpack integers hold (uint64, int64) stays a float64.
 */
export function bigIntegers(value: unknown): unknown {
  if (typeof value === "number") {
    return Number.isInteger(value) && (value > 0xffffffff || value < -0x80000000) && value < 2 ** 64 && value >= -(2 ** 63) ? BigInt(value) : value;
  }
  if (Array.isArray(value)) return value.map(bigIntegers);
  if (isPlainObject(value)) {
    const out: Record<string, unknown> = {};
    for (const k in value) out[k] = bigIntegers(value[k]);
    return out;
  }
  return value;
}

/**
 * The deepest params the client sends: `{}` is 1 level, `{a: [1]}` 2, a Tensor 2
 * (its TensorRef map and shape array). The sidecar decodes what msgspec decodes, up
 * to Python's recursion limit (about 1000 levels with the envelope); the client
 * stays far below it and rejects deeper params (cycles too) with INVALID_PARAMS
 * before sending. See docs/protocol.md "No hanging call".
 */
export const MAX_PARAMS_DEPTH = 100;

/**
 * Where `value` nests deeper than `limit` msgpack levels (as the client would encode
 * it: arrays, maps, plain objects, class instances, Map and Set nest; typed arrays,
 * Dates and scalars are leaves), as a path like ["value", "0", "0", ...]; null when it
 * does not. The walk recurses at most `limit` deep (never overflows the stack) and a
 * cycle is reported as too deep; after 1000 nodes it remembers the depth each object
 * was seen at, so an object shared many times is not walked again and again.
 */
export function tooDeep(value: unknown, limit: number = MAX_PARAMS_DEPTH): string[] | null {
  if (!isNode(value)) return null;
  return walkDepth(value, 1, { limit, visits: 0, seen: null })?.reverse() ?? null;
}

interface DepthWalk {
  limit: number;
  visits: number;
  seen: Map<object, number> | null;
}

// Module-level functions, no closures: this runs on every call (ping included).
function walkDepth(v: object, depth: number, w: DepthWalk): string[] | null {
  if (v instanceof Tensor) return depth + 1 > w.limit ? [] : null; // its ref map, then its shape array
  if (depth > w.limit) return [];
  if (++w.visits > 1000) {
    w.seen ??= new Map();
    if ((w.seen.get(v) ?? 0) >= depth) return null;
    w.seen.set(v, depth);
  }
  let r: string[] | null = null;
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length && !r; i++) if (isNode(v[i])) r = depthOf(String(i), v[i], depth, w);
  } else if (v instanceof Map) {
    for (const [k, x] of v) if ((r = depthOf(String(k), k, depth, w) ?? depthOf(String(k), x, depth, w))) break;
  } else if (v instanceof Set) {
    for (const x of v) if ((r = depthOf("*", x, depth, w))) break;
  } else {
    for (const k in v) if (Object.hasOwn(v, k) && (r = depthOf(k, (v as Record<string, unknown>)[k], depth, w))) break;
  }
  return r;
}

function depthOf(key: string, x: unknown, depth: number, w: DepthWalk): string[] | null {
  if (!isNode(x)) return null;
  const r = walkDepth(x, depth + 1, w);
  if (r) r.push(key);
  return r;
}

/** Whether msgpack nests into `v` (a container; typed arrays, buffers and Dates are leaves). */
function isNode(v: unknown): v is object {
  return typeof v === "object" && v !== null && !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer) && !(v instanceof Date);
}
