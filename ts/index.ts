// nanotune's public TS API (the bridge so far; the trainer joins later).
export { Sidecar, type SidecarOptions, type CallOptions, type Params, type Result, type HelloInfo, type SidecarEvent, type WithTensors } from "./sidecar.ts";
export { SidecarError, ErrorCode, errorCodes, type SidecarErrorOptions } from "./errors.ts";
export { Tensor, type DType, type TypedArrayOf } from "./tensor.ts";
export { PROTOCOL_VERSION, methods, events, TensorRef, type MethodName, type EventName } from "../protocol/schema.ts";
export { Trainer, type TrainerEvent, type TrainerInit } from "./train/trainer.ts";
export { TrainerConfig, ConfigError, parseConfig, type TrainerOptions, type ResolvedTrainerConfig } from "./train/config.ts";
export { schedules, type Schedule, type ScheduleLike } from "./train/schedules.ts";
export { policies, type MaskPolicy, type MaskDecision, type Criterion, type RefreshContext } from "./train/policies.ts";
