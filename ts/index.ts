// nanotune's public API: what `import { ... } from "nanotune"` gives. The wire's zod
// tables stay inside (protocol/schema.ts); users get classes, functions and types.
export {
  Sidecar,
  type SidecarOptions,
  type CallOptions,
  type Params,
  type Result,
  type HelloInfo,
  type SidecarEvent,
  type WithTensors,
  type DistributedOptions,
  type DistributedInfo,
} from "./sidecar.ts";
export { NanotuneError, SidecarError, ConfigError, ErrorCode, errorCodes, isUserError, type NanotuneErrorOptions, type SidecarErrorOptions } from "./errors.ts";
export { Tensor, type DType, type TypedArrayOf } from "./tensor.ts";
export { PROTOCOL_VERSION, type MethodName, type EventName } from "../protocol/schema.ts";
export { Trainer, type TrainerInit, type RunOptions, type GenerateOptions, type Generation } from "./train/trainer.ts";
export {
  templates,
  renderTemplate,
  checkTemplate,
  renderedBySidecar,
  TEMPLATE_NAMES,
  ALPACA_PROMPT,
  ALPACA_PROMPT_NO_INPUT,
  type Template,
  type TemplateName,
  type TemplateFields,
} from "./templates.ts";
export type { TrainerEvent, TrainerEventType, RunEndReason, PolicyState, NonFiniteStep } from "./train/events.ts";
export { parseConfig, type TrainerOptions, type ResolvedTrainerConfig, type ScheduleJSON, type PolicyJSON } from "./train/config.ts";
export { schedules, type Schedule, type ScheduleLike, type ScheduleSpec } from "./train/schedules.ts";
export { policies, type MaskPolicy, type MaskDecision, type Criterion, type RefreshContext, type BuiltinPolicyOptions, type PolicySpec } from "./train/policies.ts";
export { sinks, type Sink, type ProgressOptions, type ConsoleOptions, type OtelOptions, type MlflowOptions, type DashboardOptions, type DashboardSink } from "./sinks/index.ts";
export type { SinkErrorEvent } from "./sinks/buffer.ts";
export type { TrainerControl, SampleWeightsOptions, WeightSample } from "./sinks/sink.ts";
