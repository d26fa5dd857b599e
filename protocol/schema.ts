// The wire contract between the TS client (ts/sidecar.ts) and the Python sidecar
// (python/nanotune/sidecar/). This file is the one source of truth: `npm run
// protocol:generate` writes protocol/schema.json (JSON Schema, for any language) and
// python/nanotune/wire.py (the sidecar's msgspec Structs, constraints included) from
// it, and tests/ts/protocol.test.ts fails when either is stale.
//
// Adding a method: add an entry to `methods` below (params, result, thread), run
// `npm run protocol:generate`, then write its handler on the Python side with
// `@method("name")` (python/nanotune/sidecar/dispatch.py); the sidecar refuses to
// start while a schema method has no handler. docs/protocol.md has the wire rules.
import { z } from "zod";
import { trainingMethods } from "./training.ts";

/** Bumped on any incompatible change to the envelope or a method's params/result. */
export const PROTOCOL_VERSION = 1;

/**
 * The error-code table. `origin` says which side raises it: "sidecar" codes
 * arrive in `{id, error}` replies, "client" codes are raised by the TS side.
 * `userError`: the user can fix it (bad input, config, arguments, setup); the
 * CLI exits 2 on these and 1 on the rest.
 */
export const errorCodes = {
  INVALID_REQUEST: { origin: "sidecar", userError: false, description: "The message is not a msgpack map with v, id, method and params, or its frames do not match." },
  INVALID_PARAMS: { origin: "sidecar", userError: true, description: "The params do not match the method's schema, or name a file, model or option that cannot be used; the message names the field." },
  UNKNOWN_METHOD: { origin: "sidecar", userError: false, description: "No method of that name is registered." },
  PROTOCOL_MISMATCH: { origin: "sidecar", userError: true, description: "Client and sidecar speak different protocol versions; the message names both." },
  BUSY: { origin: "sidecar", userError: false, description: "A compute call is already running; wait for it or cancel it (calls are never queued)." },
  CANCELLED: { origin: "sidecar", userError: false, description: "The call was cancelled (cancel method or AbortSignal)." },
  OUT_OF_MEMORY: { origin: "sidecar", userError: false, description: "The device (or host) ran out of memory during the call." },
  INTERNAL: { origin: "sidecar", userError: false, description: "An unexpected exception in the sidecar; data.traceback holds the Python traceback." },
  TIMEOUT: { origin: "client", userError: false, description: "The call's timeoutMs passed; the client asked the sidecar to cancel it." },
  SIDECAR_CRASHED: { origin: "client", userError: false, description: "The sidecar process exited while calls were pending; data holds the signal, exit code and last stderr lines." },
  START_FAILED: { origin: "client", userError: true, description: "The sidecar process could not be started or did not become ready in startTimeoutMs (no Python found: run `npx nanotune setup`)." },
  CLOSED: { origin: "client", userError: false, description: "The client was closed before or during the call." },
  INVALID_CONFIG: { origin: "client", userError: true, description: "Trainer options or a config file are wrong; data.issues names every wrong field by its path." },
  INVALID_ARGUMENT: { origin: "client", userError: true, description: "A call or command line is wrong (unknown command, missing argument, an option that does not fit the run); the message names it." },
  NON_FINITE: { origin: "sidecar", userError: false, description: "The step's loss or gradient norm is not finite; the step was not applied (weights, moments, mask and step unchanged); data holds step, loss and gradNorm." },
  SESSION_CHANGED: { origin: "sidecar", userError: false, description: "The call carries a session generation that is no longer current: another client loaded a model or created an optimizer since." },
  SIDECAR_UNRESPONSIVE: { origin: "client", userError: false, description: "The sidecar missed its heartbeats while a call was pending (stopped, or stuck outside Python); data.stacks holds its thread dump when it could give one." },
} as const;
export type ErrorCode = keyof typeof errorCodes;

const int = () => z.number().int();
const uint = () => z.number().int().nonnegative();

/** Element types a tensor frame may hold (torch names; bfloat16 has no numpy twin). */
export const DType = z.enum(["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"]);
export type DType = z.infer<typeof DType>;

/**
 * A tensor on the wire: its bytes travel as raw ZeroMQ frame number `frame`
 * after the envelope (0 = the first frame after it), C-contiguous, little-endian.
 */
export const TensorRef = z
  .strictObject({ dtype: DType, shape: z.array(uint()), frame: uint() })
  .meta({ title: "TensorRef" });
export type TensorRef = z.infer<typeof TensorRef>;

// ---- envelope ---------------------------------------------------------------

export const Request = z.strictObject({
  v: int().describe("protocol version of the sender"),
  id: uint().describe("request id, unique per connection; replies carry it back"),
  method: z.string(),
  params: z.record(z.string(), z.unknown()).optional().describe("absent means {}"),
});
export const ErrorBody = z.strictObject({
  code: z.string().describe("one of errorCodes"),
  message: z.string(),
  data: z.unknown().optional(),
  traceback: z.string().nullable().optional(),
});
export const Reply = z.union([
  z.strictObject({ id: uint(), result: z.unknown() }),
  z.strictObject({ id: uint().nullable().describe("null when the request's id could not be read"), error: ErrorBody }),
]);
export const Event = z.strictObject({ event: z.string(), data: z.unknown() });

// ---- methods ----------------------------------------------------------------

const Empty = z.strictObject({});

const CudaInfo = z
  .strictObject({
    name: z.string(),
    totalBytes: uint(),
    freeBytes: uint(),
  })
  .meta({ title: "CudaInfo" });

const RankInfo = z
  .strictObject({
    rank: uint(),
    localRank: uint(),
    host: z.string(),
    pid: uint(),
    device: z.string().describe('"cpu" or "cuda:N" on that rank'),
  })
  .meta({ title: "RankInfo" });

const DistributedInfo = z
  .strictObject({
    worldSize: uint(),
    nnodes: uint(),
    backend: z.string().describe("the process group's backend: gloo (CPU) or nccl (CUDA)"),
    ranks: z.array(RankInfo).describe("every rank, in rank order"),
  })
  .meta({ title: "DistributedInfo" });

/**
 * Every method: its params and result, and the thread that serves it: "io"
 * methods are answered at once by the sidecar's I/O thread, even while a
 * "compute" call runs; compute calls run one at a time (a second one gets BUSY).
 */
export const methods = {
  hello: {
    thread: "io",
    description: "Handshake: checks the protocol version and reports the runtime.",
    params: z.strictObject({ protocol: int(), client: z.string().optional() }),
    result: z.strictObject({
      protocol: int(),
      sidecar: z.string().describe("nanotune package version"),
      python: z.string(),
      torch: z.string(),
      pid: uint(),
      device: z.string().describe('"cpu" or "cuda:N"'),
      dtype: z.string().describe("default parameter dtype on that device"),
      cuda: CudaInfo.nullable(),
      methods: z.array(z.string()),
      transport: z.enum(["ipc", "tcp"]).describe("what the sidecar is bound on"),
      security: z.enum(["ipc-private-dir", "curve"]).describe("ipc: a socket in a 0700 directory; tcp: ZeroMQ CURVE, only our client's key"),
      distributed: DistributedInfo.nullable().optional().describe("a sidecar group launched by torchrun: its ranks; null: one process"),
    }),
  },
  ping: {
    thread: "io",
    description: "Liveness; answered by the I/O thread at once.",
    params: Empty,
    result: Empty,
  },
  status: {
    thread: "io",
    description: "What the sidecar is doing now.",
    params: Empty,
    result: z.strictObject({
      pid: uint(),
      uptimeS: z.number(),
      ready: z.boolean().describe("torch imported and method modules loaded"),
      busy: z.strictObject({ id: uint(), method: z.string(), runningS: z.number(), cancelling: z.boolean() }).meta({ title: "BusyInfo" }).nullable(),
      served: uint().describe("requests answered so far"),
      rejected: uint().describe("requests answered with an error so far"),
    }),
  },
  cancel: {
    thread: "io",
    description: "Cancels the running compute call (only if its id matches, when id is given).",
    params: z.strictObject({ id: uint().optional() }),
    result: z.strictObject({ cancelled: z.boolean(), id: uint().nullable() }),
  },
  shutdown: {
    thread: "io",
    description: "Replies, then exits the sidecar process.",
    params: Empty,
    result: Empty,
  },
  "debug.busy": {
    thread: "compute",
    description: "Diagnostic: computes (small matmuls) for `seconds`, checking for cancellation between steps; emits debug:tick.",
    params: z.strictObject({
      seconds: z.number().nonnegative(),
      tickEveryS: z.number().positive().optional().describe("emit debug:tick this often (default: never)"),
      cooperative: z.boolean().optional().describe("false: never call check_cancelled (tests the forced cancel)"),
    }),
    result: z.strictObject({ iterations: uint(), seconds: z.number() }),
  },
  "debug.echo": {
    thread: "io",
    description: "Diagnostic: returns value and tensor as received (the tensor zero-copy).",
    params: z.strictObject({ value: z.unknown().optional(), tensor: TensorRef.optional() }),
    result: z.strictObject({ value: z.unknown(), tensor: TensorRef.nullable() }),
  },
  "debug.store": {
    thread: "compute",
    description: "Diagnostic: stores value under key in the sidecar's shared state, returns the previous value.",
    params: z.strictObject({ key: z.string(), value: z.unknown().optional() }),
    result: z.strictObject({ previous: z.unknown() }),
  },
  ...trainingMethods(TensorRef),
} as const satisfies Record<string, { thread: "io" | "compute"; description: string; params: z.ZodType; result: z.ZodType }>;
export type MethodName = keyof typeof methods;

/** Unsolicited events `{event, data}`: name -> data schema. */
export const events = {
  "debug:tick": z.strictObject({ iteration: uint(), elapsedS: z.number() }),
  /** generate with stream: each new piece of text, in order (index from 0), for the call `id`. */
  "generate:token": z.strictObject({ id: uint(), index: uint(), text: z.string() }),
  /** A rank of a sidecar group died; rank 0 sends this, then the whole group goes down. */
  "rank:lost": z.strictObject({
    rank: uint(),
    host: z.string(),
    pid: uint(),
    reason: z.string().describe("what rank 0 saw: the process is gone, or its heartbeat stopped"),
  }),
} as const satisfies Record<string, z.ZodType>;
export type EventName = keyof typeof events;

/** The JSON written to protocol/schema.json (what the Python side is tested against). */
export function toJSON() {
  const js = (s: z.ZodType) => {
    const { $schema: _drop, ...rest } = z.toJSONSchema(s, { io: "input" }) as Record<string, unknown>;
    return rest;
  };
  return {
    $comment: "Generated from protocol/schema.ts by `npm run protocol:generate`; do not edit.",
    protocolVersion: PROTOCOL_VERSION,
    errorCodes,
    dtypes: DType.options,
    envelope: { request: js(Request), reply: js(Reply), event: js(Event), tensorRef: js(TensorRef) },
    methods: Object.fromEntries(
      Object.entries(methods).map(([name, m]) => [
        name,
        { thread: m.thread, description: m.description, params: js(m.params), result: js(m.result) },
      ]),
    ),
    events: Object.fromEntries(Object.entries(events).map(([name, s]) => [name, js(s)])),
  };
}
