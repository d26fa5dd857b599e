// Tensors on the wire: the envelope holds `{dtype, shape, frame}` (a TensorRef) and
// the bytes travel as raw ZeroMQ frame number `frame` after it, little-endian,
// C-contiguous. A Tensor here is those bytes plus dtype and shape; no copy is made
// when sending, and a received Tensor views the received frame.
import type { DType } from "../protocol/schema.ts";
import { NanotuneError } from "./errors.ts";

export type { DType };

const ITEMSIZE: Record<DType, number> = {
  float32: 4, float64: 8, float16: 2, bfloat16: 2, int8: 1, uint8: 1, int16: 2, int32: 4, int64: 8, bool: 1,
};

/** The typed array that holds each dtype (float16/bfloat16: the raw 16-bit patterns). */
export interface TypedArrayOf {
  float32: Float32Array; float64: Float64Array; float16: Uint16Array; bfloat16: Uint16Array;
  int8: Int8Array; uint8: Uint8Array; int16: Int16Array; int32: Int32Array; int64: BigInt64Array; bool: Uint8Array;
}
const CTOR = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, bfloat16: Uint16Array,
  int8: Int8Array, uint8: Uint8Array, int16: Int16Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array,
} as const;

type AnyTypedArray = TypedArrayOf[DType];

export class Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  /** The raw bytes (a view; not copied). */
  readonly bytes: Uint8Array;

  constructor(dtype: D, shape: readonly number[], bytes: Uint8Array) {
    if (!(dtype in ITEMSIZE)) throw new NanotuneError("INVALID_ARGUMENT", `Tensor: unknown dtype ${JSON.stringify(dtype)}; use one of ${Object.keys(ITEMSIZE).join(", ")}`);
    const numel = shape.reduce((a, b) => a * b, 1);
    if (shape.some((n) => !Number.isInteger(n) || n < 0)) throw new NanotuneError("INVALID_ARGUMENT", `Tensor: shape must hold non-negative integers, got [${shape.join(", ")}]`);
    if (numel * ITEMSIZE[dtype] !== bytes.byteLength) {
      throw new NanotuneError("INVALID_ARGUMENT", `Tensor: ${dtype} [${shape.join(", ")}] needs ${numel * ITEMSIZE[dtype]} bytes, got ${bytes.byteLength}`);
    }
    this.dtype = dtype;
    this.shape = shape;
    this.bytes = bytes;
  }

  /** Wraps a typed array (no copy); shape defaults to 1-D. float16/bfloat16 need an explicit dtype. */
  static from<D extends DType>(array: TypedArrayOf[D], shape?: readonly number[], dtype?: D): Tensor<D> {
    const d = (dtype ?? dtypeOf(array)) as D;
    return new Tensor(d, shape ?? [array.length], new Uint8Array(array.buffer, array.byteOffset, array.byteLength));
  }

  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  /** The elements as a typed array: a view when the bytes are aligned, else a copy. */
  toArray(): TypedArrayOf[D] {
    const Ctor = CTOR[this.dtype] as unknown as { new (b: ArrayBufferLike, o: number, n: number): AnyTypedArray; BYTES_PER_ELEMENT: number };
    let b = this.bytes;
    if (b.byteOffset % Ctor.BYTES_PER_ELEMENT !== 0) b = b.slice();
    return new Ctor(b.buffer, b.byteOffset, b.byteLength / Ctor.BYTES_PER_ELEMENT) as TypedArrayOf[D];
  }
}

function dtypeOf(a: AnyTypedArray): DType {
  if (a instanceof Float32Array) return "float32";
  if (a instanceof Float64Array) return "float64";
  if (a instanceof Int8Array) return "int8";
  if (a instanceof Uint8Array) return "uint8";
  if (a instanceof Int16Array) return "int16";
  if (a instanceof Int32Array) return "int32";
  if (a instanceof BigInt64Array) return "int64";
  throw new NanotuneError("INVALID_ARGUMENT", `Tensor.from: pass the dtype for a ${a.constructor.name} (float16 and bfloat16 travel as Uint16Array)`);
}
