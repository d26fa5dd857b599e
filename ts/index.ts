// nanotune's public TS API (the bridge so far; the trainer joins later).
export { Sidecar, type SidecarOptions, type CallOptions, type Params, type Result, type HelloInfo, type SidecarEvent, type WithTensors } from "./sidecar.ts";
export { SidecarError, ErrorCode, errorCodes, type SidecarErrorOptions } from "./errors.ts";
export { Tensor, type DType, type TypedArrayOf } from "./tensor.ts";
export { PROTOCOL_VERSION, methods, events, TensorRef, type MethodName, type EventName } from "../protocol/schema.ts";
